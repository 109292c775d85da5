"""Jobs in the registry: one row per training run, whichever backend runs it.

States: ``queued`` -> ``starting`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``;
``stopping`` while a cancel waits for the checkpoint; ``interrupted`` when the process
died without saying how it ended (``kill -9``, a reboot). ``cancelled``, ``interrupted``
and ``failed`` jobs can be resumed (from their last checkpoint) or retried (from scratch).
A job's id is the hash of its training configuration, so submitting the same
configuration twice finds the first job instead of starting a second.

A group run (kind ``group``: several runs over one base in one process, see
``dtm.train.group``) is one job in the queue; each of its members also has a row (its
``parent`` is the group's id), with its own state, progress, metrics and run folder, which
the group's process keeps up to date. The queue starts only rows without a parent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from dtm.store.jobs import ACTIVE, FINAL, RESTARTABLE, Job, JobStore  # noqa: F401  (the jobs table)


class Backend(Protocol):
    """What runs jobs. ``start`` launches a claimed job; ``refresh`` brings the states of
    this backend's unfinished jobs up to date; ``cancel`` asks a running job to stop."""

    name: str

    def start(self, store: JobStore, job: Job) -> None: ...

    def refresh(self, store: JobStore, jobs: list[Job]) -> None: ...

    def cancel(self, store: JobStore, job: Job) -> None: ...

    def logs(self, job: Job, tail: int) -> str: ...


def read_tail(path: Path, tail: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail))
        return f.read().decode("utf-8", errors="replace")
