"""The body of a job's process (``python -m dtm train --job ID``): the job's run
trained (``dtm.jobs.runner``) or its group's members trained together
(``dtm.jobs.group``), with its state, progress, metrics and end in the registry."""

from __future__ import annotations

import time

from dtm.errors import Stopped
from dtm.jobs.base import JobStore
from dtm.jobs.group import run_group
from dtm.jobs.queue import checkpoint_step, claim, pump
from dtm.train.config import read_config
from dtm.train.loop import request_stop


def run_job(job_id: str, *, resume: bool = False) -> dict:
    """The body of a job process: train the job's configuration, recording state,
    progress and metrics in the registry, and one line per record in its log. SIGTERM
    asks for a checkpoint and a stop."""
    from dtm.jobs.runner import run_training  # lazy: the evaluators import torch

    store = JobStore()
    job = store.get(job_id)
    if job.kind == "group":
        return run_group(store, job, resume=resume)
    cfg = read_config(job.config)
    first = checkpoint_step(job.run_dir) if resume else 0
    claim(store, job, step=first, first_step=first)
    last = [0.0]

    def on_step(step: int, total: int) -> None:
        now = time.time()
        if now - last[0] > 1.0 or step == total:
            last[0] = now
            store.update(job.id, step=step, total_steps=total)
            if store.get(job.id).state == "stopping":  # cancelled through the registry
                request_stop()

    def on_record(rec: dict) -> None:
        store.log_metrics(job.id, rec)
        member = f"member {rec['member']} " if "member" in rec else ""
        print(
            f"{member}step {rec['step']}: train_loss {rec['train_loss']} "
            f"val_loss {rec['val_loss']:.4f} probe_loss {rec['probe_loss']:.4f} "
            f"tokens/s {rec['tokens_per_s']}",
            flush=True,
        )

    stages: set[str] = set()

    def progress(stage: str, frac: float) -> None:
        if stage not in stages:
            stages.add(stage)
            print(stage, flush=True)

    try:
        res = run_training(
            cfg, progress=progress, resume=resume, on_record=on_record, on_step=on_step
        )
    except Stopped as e:
        store.update(job.id, state="cancelled", error=str(e), ended=time.time())
        raise
    except BaseException as e:
        store.update(job.id, state="failed", error=f"{type(e).__name__}: {e}", ended=time.time())
        raise
    else:
        store.update(job.id, state="done", error=None, ended=time.time())
        return {**res, "out": cfg.out}
    finally:
        pump(store)  # this job's slot is free: start the next one
