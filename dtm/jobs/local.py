"""The local backend: each job is a detached ``python -m dtm train`` process.

The process runs in its own session (a closed browser, a restarted Streamlit server or
a finished ``dtm`` command does not take it down), writes to ``<run>/log.txt``, and
records its own state in the registry. A job that dies without doing so (``kill -9``)
is found by ``refresh``: its pid is gone, or belongs to another process now (the
process start time, from ``/proc``, no longer matches), and it becomes ``interrupted``.

The queue: at most one job per visible GPU, or ``DTM_CPU_JOBS`` (default 1) jobs on a
machine without one, each then given its share of the cores (``OMP_NUM_THREADS``): two
torch processes that each use every core slow each other about 7x on 2 cores.
Whoever notices a free slot (a job ending, ``dtm jobs``, the dashboard) starts the next
queued job; the claim is one ``BEGIN IMMEDIATE`` transaction, so two sessions never start
the same job or more jobs than there are slots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dtm.jobs.base import ACTIVE, Job, JobStore, read_tail
from dtm.store import pid_alive, proc_start_time

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_children: list[subprocess.Popen] = []  # reaped on refresh so no zombie lingers


def spawn_detached(cmd: list[str], log, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session from the project root, its output to the open
    file ``log`` (never to a pipe nobody reads). The child is reaped on ``refresh``."""
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=PROJECT_ROOT,
        env=env,
    )
    _children.append(proc)
    return proc


def gpu_slots() -> list[int]:
    """Indices of the visible GPUs (``CUDA_VISIBLE_DEVICES`` respected)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [i for i, d in enumerate(vis.split(",")) if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


def max_parallel() -> int:
    gpus = gpu_slots()
    return len(gpus) if gpus else max(1, int(os.environ.get("DTM_CPU_JOBS", "1")))


class LocalBackend:
    name = "local"

    def start(self, store: JobStore, job: Job) -> None:
        cmd = [sys.executable, "-m", "dtm", "train", "--job", job.id]
        if job.resume:
            cmd.append("--resume")
        env = {**os.environ, "DTM_CACHE": str(store.registry.root)}
        if job.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(_visible_id(job.gpu))
        elif max_parallel() > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Parallel CPU jobs share the cores: with all threads each they slow each other
            # ~7x; split, they beat one after another (docs/benchmarks.md).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max_parallel()))
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== attempt {job.attempts + 1}: {' '.join(cmd[1:])}\n")
            log.flush()
            proc = spawn_detached(cmd, log, env)
        store.update(job.id, pid=proc.pid, proc_start=proc_start_time(proc.pid))

    def refresh(self, store: JobStore, jobs: list[Job]) -> None:
        for p in list(_children):
            if p.poll() is not None:
                _children.remove(p)
        now = time.time()
        for job in jobs:
            if job.state not in ACTIVE:
                continue
            if job.pid is None:
                if now - job.updated > 60:  # claimed, but its launcher died first
                    store.update(job.id, only_if=("starting",), state="interrupted", ended=now)
                continue
            if _alive(job):
                continue
            # Gone without recording an end. Re-check the state in the same UPDATE: it
            # may have finished cleanly a moment ago.
            end = "cancelled" if job.state == "stopping" else "interrupted"
            msg = None if end == "cancelled" else "the process ended without finishing"
            store.update(job.id, only_if=(job.state,), state=end, ended=now, error=msg, pid=None)

    def cancel(self, store: JobStore, job: Job) -> None:
        if job.pid is not None and _alive(job):
            store.update(job.id, only_if=ACTIVE, state="stopping")
            try:
                os.killpg(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:
            self.refresh(store, [job])

    def logs(self, job: Job, tail: int) -> str:
        return read_tail(job.log_path, tail)


def _alive(job: Job) -> bool:
    return pid_alive(job.pid, job.proc_start)


def _visible_id(slot: int) -> str:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    return vis.split(",")[slot].strip() if vis else str(slot)
