"""An experiment's ``status.json``: the stage, each stage's fraction, when it began and
how long it took, the process id and the training jobs, so that a page can follow a run
that another process does (``Progress`` writes it, ``read_status`` reads it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dtm.errors import DataError
from dtm.experiment.config import experiment_dir
from dtm.store import ProgressFile, pid_alive

STAGES = ("lab", "disperse", "train", "merge", "evaluate")


class Progress:
    """``stage(name)`` enters a stage; ``__call__(what, fraction)`` (the library's
    progress callback) moves the current stage; ``done()`` / ``failed(error)`` end it."""

    def __init__(self, name: str, echo=None) -> None:
        path = experiment_dir(name) / "status.json"
        if path.exists():  # a hand-edited status is reported, never overwritten
            read_status_file(path)
        self.echo = echo
        self.file = ProgressFile(path)
        self.state = self.file.state
        self.state.update(
            {
                "experiment": name,
                "pid": os.getpid(),
                "state": "running",
                "started": time.time(),
                "stage": None,
                "detail": "",
                "stages": {s: {"state": "waiting", "fraction": 0.0} for s in STAGES},
                "error": None,
            }
        )
        self._write()

    def _write(self, force: bool = True) -> None:
        self.file.update(force=force)

    def stage(self, name: str) -> None:
        """Enter stage ``name``; each stage records when it began and, once left, its
        ``seconds`` (Home's estimate of the next run is made from them)."""
        cur = self.state["stage"]
        now = time.time()
        if cur and cur != name:
            self.state["stages"][cur].update(state="done", fraction=1.0)
            self._took(cur, now)
        self.state["stage"] = name
        self.state["stages"][name].update(state="running", began=now)
        self._write()

    def _took(self, stage: str, now: float) -> None:
        s = self.state["stages"][stage]
        if "began" in s:
            s["seconds"] = round(now - s["began"], 1)

    def __call__(self, what: str, fraction: float) -> None:
        cur = self.state["stage"]
        if cur:
            self.state["stages"][cur]["fraction"] = round(float(fraction), 4)
        self.state["detail"] = what
        if self.echo:
            self.echo(what, fraction)
        self._write(force=fraction >= 1.0)

    def jobs(self, ids: list[str]) -> None:
        """The experiment's training jobs (ids), for its pictures: a job another
        experiment submitted first (the same run) keeps that experiment's group."""
        self.state["jobs"] = list(ids)
        self._write()

    def done(self) -> None:
        now = time.time()
        for name, s in self.state["stages"].items():
            if s["state"] == "running":
                s.update(state="done", fraction=1.0)
                self._took(name, now)
        self.state.update(state="done", detail="", ended=now)
        self._write()

    def failed(self, error: str) -> None:
        cur = self.state["stage"]
        if cur:
            self.state["stages"][cur]["state"] = "failed"
        self.state.update(state="failed", error=error)
        self._write()


def read_status(name: str) -> dict | None:
    """The run's ``status.json`` (None when there is none); a ``running`` run whose
    process is gone reads as ``interrupted``. A file that is not a status as ``Progress``
    writes it (hand-edited, or foreign) raises ``DataError`` and is left as it is."""
    p = experiment_dir(name) / "status.json"
    if not p.exists():
        return None
    st = read_status_file(p)
    if st.get("state") == "running" and not pid_alive(st.get("pid")):
        st["state"] = "interrupted"
    return st


def read_status_file(path: Path) -> dict:
    """A ``status.json``, checked: ``DataError`` naming the file and the field when it
    is not one."""

    keep = "it was left as it is: delete it (or move it aside) to start the run afresh."
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); {keep}") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {keep}"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}).") from None

    def bad(field: str, want: str) -> DataError:
        return DataError(f"{path}: {field} must be {want}; {keep}")

    if not isinstance(st, dict):
        raise bad("the file", "a JSON object (a run's status)")
    if not isinstance(st.get("state"), str):
        raise bad("state", "text (running, done, failed, ...)")
    pid = st.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise bad("pid", "a process id (an integer) or null")
    for key in ("started", "updated"):
        v = st.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, "a time in seconds (a number)")
    for key in ("stage", "detail", "error"):
        if st.get(key) is not None and not isinstance(st[key], str):
            raise bad(key, "text or null")
    stages = st.get("stages", {})
    if not isinstance(stages, dict):
        raise bad("stages", "an object of {stage: {state, fraction}}")
    for name, s in stages.items():
        if not isinstance(s, dict) or not isinstance(s.get("state", ""), str):
            raise bad(f"stages.{name}", "an object {state, fraction}")
        f = s.get("fraction", 0.0)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise bad(f"stages.{name}.fraction", "a number from 0 to 1")
    return st
