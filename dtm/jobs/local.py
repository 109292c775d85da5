"""The local backend: each job is a detached ``python -m dtm train`` process.

The process runs in its own session (a closed browser, a restarted Streamlit server or
a finished ``dtm`` command does not take it down), writes to ``<run>/log.txt``, and
records its own state in the registry. A job that dies without doing so (``kill -9``)
is found by ``refresh``: its pid is gone, or belongs to another process now (the
process start time, from ``/proc``, no longer matches), and it becomes ``interrupted``.

The queue: on a machine with GPUs, one job per visible GPU (``DTM_GPU_JOBS``, default 1,
jobs share a GPU when set higher); a job goes to the GPU with the fewest jobs of this
queue (the lowest index among equals, ``dtm.store.jobs.place``), its process sees only
that one (``CUDA_VISIBLE_DEVICES``) and its row records the GPU's index; the jobs beyond
wait, queued, for a GPU to come free. A job process is told the queue's GPUs
(``DTM_GPUS``), so the next job it starts as it ends is placed among all of them, not
only its own. On a machine without a GPU, ``DTM_CPU_JOBS`` (default 1) jobs run at once,
each then given its share of the cores (``OMP_NUM_THREADS``): two torch processes that
each use every core slow each other about 7x on 2 cores.
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

from dtm.errors import ConfigError
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


def visible_gpus() -> list[str]:
    """The GPUs this queue places jobs on, as CUDA device ids: ``DTM_GPUS`` (what a job
    process is given by the queue that started it), else ``CUDA_VISIBLE_DEVICES`` (up to
    its first empty or negative entry, as CUDA reads it), else every GPU torch sees."""
    listed = os.environ.get("DTM_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if listed is not None:
        out = []
        for d in (d.strip() for d in listed.split(",")):
            if not d or d.startswith("-"):
                break
            out.append(d)
        return out
    try:
        import torch  # lazy: torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def gpu_slots() -> list[int]:
    """Indices of the visible GPUs (``visible_gpus``)."""
    return list(range(len(visible_gpus())))


def _count(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={text!r}: give a whole number of jobs, at least 1.")
    return value


def jobs_per_gpu() -> int:
    """How many jobs of this queue share one GPU (``DTM_GPU_JOBS``, default 1)."""
    return _count("DTM_GPU_JOBS", 1)


def max_parallel() -> int:
    """How many local jobs run at once: ``jobs_per_gpu`` per visible GPU, or
    ``DTM_CPU_JOBS`` (default 1) on a machine without one."""
    gpus = gpu_slots()
    return len(gpus) * jobs_per_gpu() if gpus else _count("DTM_CPU_JOBS", 1)


def job_env(
    environ: dict, cache: str, gpu: int | None, gpus: list[str], parallel: int, cpus: int
) -> dict:
    """The environment of a job process: ``environ`` with ``DTM_CACHE``; on GPU slot
    ``gpu`` of the queue's ``gpus`` (CUDA ids) that GPU alone (``CUDA_VISIBLE_DEVICES``)
    and the queue's GPUs (``DTM_GPUS``); on a CPU running ``parallel`` jobs at once, each
    its share of the ``cpus`` cores unless ``OMP_NUM_THREADS`` is set."""
    env = {**environ, "DTM_CACHE": cache}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus[gpu]
        env["DTM_GPUS"] = ",".join(gpus)
    elif parallel > 1 and "OMP_NUM_THREADS" not in environ:
        # Parallel CPU jobs share the cores: with all threads each they slow each other
        # ~7x; split, they beat one after another (docs/benchmarks.md).
        env["OMP_NUM_THREADS"] = str(max(1, cpus // parallel))
    return env


class LocalBackend:
    name = "local"

    def start(self, store: JobStore, job: Job) -> None:
        cmd = [sys.executable, "-m", "dtm", "train", "--job", job.id]
        if job.resume:
            cmd.append("--resume")
        gpus = visible_gpus() if job.gpu is not None else []
        env = job_env(
            dict(os.environ),
            str(store.registry.root),
            job.gpu,
            gpus,
            max_parallel(),
            os.cpu_count() or 1,
        )
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
