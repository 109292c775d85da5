"""The embedded alignment-tax lab: a synthetic world, a tiny Llama pretrained on it, a
TULU-shaped instruction set with injected biases whose ground truth is recorded, and lab
benchmarks. ``build.build_lab`` makes one; this module finds, builds in the background
and reports on the dashboard's default lab (``<cache>/lab/default-seed0-v<version>``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dtm.store import ProgressFile, cache_dir, pid_alive

LAB_VERSION = 2  # bump when the lab's content changes: a new folder is built


def default_lab_dir(seed: int = 0, size: str = "default") -> Path:
    name = f"{size}-seed{seed}-v{LAB_VERSION}"
    return cache_dir() / "lab" / name


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


def ensure_default_lab(seed: int = 0, size: str = "default", retry: bool = False) -> dict:
    """Start a background build of the default lab unless it is ready or being built.
    Exactly one build runs even when several sessions ask at once (an exclusive lock
    file). Returns ``lab_status``."""
    lab_dir = default_lab_dir(seed, size)
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
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return lab_status(lab_dir)  # another session claimed it a moment ago
    try:
        log = open(lab_dir.with_name(lab_dir.name + ".log"), "w")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "dtm",
            "lab",
            "build",
            "--seed",
            str(seed),
            "--size",
            size,
            "--force",
            "--out",
            str(lab_dir),
            "--progress-file",
            str(prog),
        ]
        from dtm.jobs.local import spawn_detached

        proc = spawn_detached(cmd, log)
        log.close()
        ProgressFile(prog, state="building", pid=proc.pid, fraction=0.0, stage="starting").update(
            force=True, started=time.time()
        )
        os.write(fd, str(proc.pid).encode())
    finally:
        os.close(fd)
    return lab_status(lab_dir)
