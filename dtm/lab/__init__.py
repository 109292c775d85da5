"""The embedded alignment-tax lab: a synthetic world, a tiny Llama pretrained on it, a
TULU-shaped instruction set with injected biases whose ground truth is recorded, and lab
benchmarks. ``build.build_lab`` makes one; this module finds, builds in the background
and reports on the dashboard's default lab (``<cache>/lab/bias-default-seed0-v<version>``:
preset, size, seed). ``presets`` holds the presets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dtm.errors import ConfigError
from dtm.jobs.local import spawn_detached
from dtm.lab.presets import DEFAULT_PRESET
from dtm.lab.presets import preset as get_preset
from dtm.store import ProgressFile, cache_dir, pid_alive, safe_name

LAB_VERSION = 5  # bump when the lab's content changes: a new folder is built


def default_lab_dir(seed: int = 0, size: str = "default", preset: str | None = None) -> Path:
    name = f"{preset or DEFAULT_PRESET}-{size}-seed{seed}-v{LAB_VERSION}"
    return cache_dir() / "lab" / name


def pace_path(lab: str | Path) -> Path:
    """Where a lab's measured pace is kept (``dtm.lab.pace``): beside its folder."""
    lab = Path(lab)
    return lab.with_name(lab.name + ".pace.json")


def read_pace(lab: str | Path) -> dict | None:
    """The lab's measured pace (``dtm.lab.pace``), or None when it was not measured."""
    try:
        return json.loads(pace_path(lab).read_text())
    except (OSError, ValueError):
        return None


def lab_status(lab_dir: Path | None = None) -> dict:
    """``{"state": "ready" | "building" | "failed" | "missing", ...}`` with ``fraction``
    and ``stage`` while building, ``error`` and ``log`` when failed."""
    lab_dir = lab_dir or default_lab_dir()
    if (lab_dir / "lab.json").exists():
        return {"state": "ready", "path": str(lab_dir)}
    prog = lab_dir.with_name(lab_dir.name + ".progress.json")
    if not prog.exists():
        return {"state": "missing", "path": str(lab_dir)}
    try:
        info = json.loads(prog.read_text())
    except (OSError, json.JSONDecodeError):
        info = {"state": "building", "fraction": 0.0, "stage": "starting"}
    log = lab_dir.with_name(lab_dir.name + ".log")
    if info.get("state") == "failed" or (
        info.get("state") == "building" and not pid_alive(int(info.get("pid", -1)))
    ):
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return {
            "state": "failed",
            "path": str(lab_dir),
            "error": info.get("error") or "the build process ended without finishing",
            "log": tail,
        }
    return {
        "state": "building",
        "path": str(lab_dir),
        "fraction": info.get("fraction", 0.0),
        "stage": info.get("stage", ""),
    }


def ensure_default_lab(
    seed: int = 0, size: str = "default", retry: bool = False, preset: str | None = None
) -> dict:
    """Start a background build of the default lab unless it is ready or being built.
    Exactly one build runs even when several sessions ask at once (an exclusive lock
    file). Returns ``lab_status``."""

    preset = get_preset(preset or DEFAULT_PRESET).name
    lab_dir = default_lab_dir(seed, size, preset)
    status = lab_status(lab_dir)
    if status["state"] == "ready" or (status["state"] == "building"):
        return status
    if status["state"] == "failed" and not retry:
        return status
    lab_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = lab_dir.with_name(lab_dir.name + ".lock")
    prog = lab_dir.with_name(lab_dir.name + ".progress.json")
    if status["state"] == "failed":
        lock.unlink(missing_ok=True)
        prog.unlink(missing_ok=True)
    # the project's shipped weights when it ships them for this lab (seconds, not minutes),
    # then this machine's pace on it (Home's first estimate of a story)
    args = ["--seed", str(seed), "--size", size, "--preset", preset, "--force"]
    args += ["--shipped", "--pace"]
    return _spawn_build(lab_dir, args)


def custom_labs_dir() -> Path:
    return cache_dir() / "lab" / "custom"


def start_custom_lab(
    name: str,
    *,
    preset: str,
    knobs: dict | None = None,
    rows: int | None = None,
    seed: int = 0,
    size: str = "default",
    dialogues: str | None = None,
) -> dict:
    """Build a lab of one's own (other knobs, rows or pretraining dialogues) in the
    background, under ``<cache>/lab/custom/<name>``. A name already used, built or
    building, is refused: nothing overwrites another lab. Returns ``lab_status``."""

    get_preset(preset)
    if not name or safe_name(name) != name:
        raise ConfigError(
            f"lab name {name!r}: use letters, digits, '-', '_' or '.' (e.g. {safe_name(name)!r})."
        )
    lab_dir = custom_labs_dir() / name
    if lab_dir.exists() or lab_status(lab_dir)["state"] != "missing":
        raise ConfigError(f"a lab named {name!r} exists already ({lab_dir}): choose another name.")
    lab_dir.parent.mkdir(parents=True, exist_ok=True)
    args = ["--seed", str(seed), "--size", size, "--preset", preset]
    for k, v in (knobs or {}).items():
        args += ["--knob", f"{k}={v}"]
    if rows:
        args += ["--rows", str(rows)]
    if dialogues:
        args += ["--dialogues", dialogues]
    return _spawn_build(lab_dir, args)


def custom_labs() -> list[dict]:
    """Every lab of one's own: ``lab_status`` plus ``name`` (and ``info``, lab.json, once
    built), newest first."""
    root = custom_labs_dir()
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    names |= {p.name.removesuffix(".progress.json") for p in root.glob("*.progress.json")}
    out = []
    for n in names:
        st = lab_status(root / n) | {"name": n}
        if st["state"] == "ready":
            try:
                st["info"] = json.loads((root / n / "lab.json").read_text())
            except (OSError, json.JSONDecodeError):
                st["info"] = {}
        out.append(st)

    def started(s: dict) -> float:
        log = root / (s["name"] + ".log")
        return log.stat().st_mtime if log.exists() else 0.0

    return sorted(out, key=started, reverse=True)


def _spawn_build(lab_dir: Path, args: list[str]) -> dict:
    """One background ``dtm lab build ARGS --out LAB_DIR``, claimed by an exclusive lock
    file beside the folder, its progress in ``<name>.progress.json``."""
    lock = lab_dir.with_name(lab_dir.name + ".lock")
    prog = lab_dir.with_name(lab_dir.name + ".progress.json")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return lab_status(lab_dir)  # another session claimed it a moment ago
    try:
        log = open(lab_dir.with_name(lab_dir.name + ".log"), "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "dtm", "lab", "build", *args]
        cmd += ["--out", str(lab_dir), "--progress-file", str(prog)]

        proc = spawn_detached(cmd, log)
        log.close()
        ProgressFile(prog, state="building", pid=proc.pid, fraction=0.0, stage="starting").update(
            force=True, started=time.time()
        )
        os.write(fd, str(proc.pid).encode())
    finally:
        os.close(fd)
    return lab_status(lab_dir)
