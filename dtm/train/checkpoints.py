"""The one parser of a run's ``checkpoints/checkpoint-N`` folders (the Trainer's names)."""

from __future__ import annotations

import shutil
from pathlib import Path


def checkpoints(folder: str | Path, *, complete: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of each checkpoint in ``folder``, by step; ``complete`` keeps only
    those the Trainer finished writing (they hold ``trainer_state.json``)."""
    out = []
    for p in Path(folder).glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (not complete or (p / "trainer_state.json").exists()):
            out.append((int(step), p))
    return sorted(out)


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_step(path: str | Path | None) -> int:
    """The step of a checkpoint folder (0 for None)."""
    return int(Path(path).name.removeprefix("checkpoint-")) if path else 0


def drop_checkpoints(folder: str | Path, *, from_step: int | None = None) -> None:
    """Remove the checkpoints at or after ``from_step``, or (None) the incomplete ones."""
    for step, p in checkpoints(folder, complete=False):
        if (from_step is not None and step >= from_step) or (
            from_step is None and not (p / "trainer_state.json").exists()
        ):
            shutil.rmtree(p, ignore_errors=True)
