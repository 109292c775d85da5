"""Compute threads shared between this dashboard's processes on one machine.

A lab build, a training job, a dispersal and an experiment's scoring each run torch on
every core by default; two of them at once then ask for twice the cores, and torch's
threads wait on each other: a small lab that builds in 20 s alone took 369 s beside a
training job, and 27 s once each took its share (``python -m bench.teach --part build``,
docs/benchmarks.md). So each compute process
``claim``\\ s its share: it registers itself in a folder every process of this user sees
(``$DTM_CPU_DIR``, default ``<tmp>/dtm-cpu-<uid>``), and takes ``cores // n`` threads (at
least 1), n the live processes registered there, itself included. ``rebalance()``,
called from the training and pretraining loops (at most every 2 s), takes the share
again as processes come and go. ``DTM_THREADS=N`` fixes the count instead.

The thread count does not change the numbers: a lab built with 1 thread and with 2 has
the same weights, bit for bit (tests/test_threads.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from dtm.store import pid_alive, proc_start_time

_EVERY = 2.0  # seconds between rebalances
_state: dict = {"file": None, "threads": None, "checked": 0.0}


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def folder() -> Path:
    d = os.environ.get("DTM_CPU_DIR") or Path(tempfile.gettempdir()) / f"dtm-cpu-{os.getuid()}"
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def live() -> list[dict]:
    """The registered processes still running (a stale file is removed)."""
    out = []
    for f in folder().glob("*.json"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(info.get("pid"), info.get("start")):
            out.append(info)
        else:
            with contextlib.suppress(OSError):
                f.unlink()
    return out


def share(n: int, total: int | None = None) -> int:
    """Threads for each of ``n`` compute processes on ``total`` cores (at least 1)."""
    return max(1, (total or cores()) // max(1, n))


def _fixed() -> int | None:
    v = os.environ.get("DTM_THREADS", "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


def _set(n: int) -> None:
    """``n`` compute threads: torch's now, or (torch not imported yet: a command still
    checking its input) the count torch starts with."""
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    elif torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _state["threads"] = n


def claim(role: str) -> int:
    """Register this process as a compute process (``role``: what it does) and take its
    share of the cores; released when the process ends. Returns the thread count."""
    fixed = _fixed()
    if _state["file"] is None and fixed is None:
        pid = os.getpid()
        f = folder() / f"{pid}.json"
        f.write_text(json.dumps({"pid": pid, "start": proc_start_time(pid), "role": role}))
        _state["file"] = f
        atexit.register(release)
    _state["checked"] = time.monotonic()
    _set(fixed or share(len(live())))
    return _state["threads"]


def rebalance() -> None:
    """Take the share again (at most every 2 s; nothing when this process claimed none)."""
    if _state["file"] is None or time.monotonic() - _state["checked"] < _EVERY:
        return
    _state["checked"] = time.monotonic()
    _set(share(len(live())))


def release() -> None:
    f = _state["file"]
    _state["file"] = None
    if f is not None:
        with contextlib.suppress(OSError):
            f.unlink()


@contextlib.contextmanager
def computing(role: str):
    """A claim for the length of a block (a process that computes now and then: the
    experiment's scoring, a dispersal from the dashboard)."""
    held = _state["file"] is not None
    claim(role)
    try:
        yield
    finally:
        if not held:
            release()
