"""What there is to merge: the finished sub-models of each group of jobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MergeSource:
    """One launch's sub-models (by cluster), its base model, and its finished baselines."""

    group: str
    base: str
    subs: list[tuple[str, Path]]  # (name, adapter folder), by cluster
    baselines: dict[str, tuple[str, Path]]  # job name -> (run kind, e.g. "sft"; adapter folder)
    lab: str | None  # the lab whose benchmarks score it, when trained on the lab
    clustering: str | None = None  # the sub-models' clustering, as recorded at submit


def merge_sources(store) -> list[MergeSource]:
    """Groups with at least two finished ``sub`` jobs on one base model, newest first."""
    by_group: dict[tuple[str, str], list] = {}
    for j in store.list(states=("done",)):
        by_group.setdefault((j.group or "", j.config["base"]), []).append(j)
    out = []
    for (group, base), jobs in by_group.items():
        subs = sorted((j for j in jobs if j.kind == "sub"), key=lambda j: j.config["cluster"])
        if len(subs) < 2:
            continue
        baselines = {j.name: (j.kind, j.run_dir / "adapter") for j in jobs if j.kind != "sub"}
        lab = next((j.config.get("eval_lab") for j in jobs if j.config.get("eval_lab")), None)
        out.append(
            MergeSource(
                group,
                base,
                [(j.name, j.run_dir / "adapter") for j in subs],
                baselines,
                lab,
                subs[0].clustering,
            )
        )
    out.sort(key=lambda s: -max(p.stat().st_mtime for _, p in s.subs))
    return out
