"""The body of a group job's process: its members trained together (``dtm.train.group``)
with each member's row in the registry kept up to date: state, progress, metrics, end."""

from __future__ import annotations

import time

from dtm.errors import Stopped
from dtm.jobs.base import Job, JobStore
from dtm.jobs.queue import checkpoint_step, claim, pump
from dtm.train.config import read_config
from dtm.train.group import train_group
from dtm.train.loop import request_stop


def run_group(store: JobStore, job: Job, *, resume: bool = False) -> dict:
    """Train the group ``job``'s members; SIGTERM (a cancel) saves every member's
    checkpoint and stops. A resumed group skips the members that are done."""
    from dtm.jobs.runner import hook_for  # lazy: the evaluators import torch

    members = store.list(parent=job.id)
    by_out = {str(m.run_dir): m for m in members}
    cfgs = [read_config(c) for c in job.config["members"]]
    rows = [by_out[c.out] for c in cfgs]
    claim(store, job)
    now = time.time()
    for r in rows:
        if r.state != "done" or not resume:
            first = checkpoint_step(r.run_dir) if resume else 0
            store.update(r.id, state="running", started=now, step=first, first_step=first)
    steps = {r.id: r.step if r.state == "done" else 0 for r in rows}
    totals = {r.id: r.total_steps or 0 for r in rows}
    last = [0.0]

    def on_step(i: int, step: int, total: int) -> None:
        r = rows[i]
        steps[r.id], totals[r.id] = step, total
        t = time.time()
        if t - last[0] > 1.0 or step == total:
            last[0] = t
            for rid in steps:
                if totals[rid]:
                    store.update(rid, step=steps[rid], total_steps=totals[rid])
            store.update(job.id, step=sum(steps.values()), total_steps=sum(totals.values()))
            if store.get(job.id).state == "stopping":
                request_stop()

    def on_record(i: int, rec: dict) -> None:
        store.log_metrics(rows[i].id, rec)
        print(
            f"{rows[i].name} step {rec['step']}: train_loss {rec['train_loss']} "
            f"val_loss {rec['val_loss']:.4f} probe_loss {rec['probe_loss']:.4f} "
            f"tokens/s {rec['tokens_per_s']}",
            flush=True,
        )

    def on_done(i: int) -> None:
        store.update(rows[i].id, state="done", error=None, ended=time.time())

    stages: set[str] = set()

    def progress(stage: str, frac: float) -> None:
        if stage.split(" member")[0] not in stages:
            stages.add(stage.split(" member")[0])
            print(stage, flush=True)

    def end_open(state: str, error: str | None) -> None:
        for r in store.list(parent=job.id):
            if r.state != "done":
                step = checkpoint_step(r.run_dir) if state == "cancelled" else r.step
                store.update(r.id, state=state, error=error, ended=time.time(), step=step)

    try:
        res = train_group(
            cfgs,
            progress=progress,
            resume=resume,
            on_record=on_record,
            on_step=on_step,
            on_done=on_done,
            hook_for=hook_for,
        )
    except Stopped as e:
        store.update(job.id, state="cancelled", error=str(e), ended=time.time())
        end_open("cancelled", str(e))
        raise
    except BaseException as e:
        err = f"{type(e).__name__}: {e}"
        store.update(job.id, state="failed", error=err, ended=time.time())
        end_open("failed", err)
        raise
    else:
        store.update(job.id, state="done", error=None, ended=time.time())
        return {**res, "out": str(job.run_dir), "members": [c.out for c in cfgs]}
    finally:
        pump(store)
