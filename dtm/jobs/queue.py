"""The job queue: submit, pump (start queued jobs where slots are free), refresh,
cancel, restart, and a job process's claim of its row."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

from dtm.errors import ConfigError, Stopped
from dtm.jobs.base import ACTIVE, FINAL, RESTARTABLE, Job, JobStore
from dtm.jobs.local import LocalBackend, gpu_slots, jobs_per_gpu, max_parallel
from dtm.models import check_base_path
from dtm.store import input_key, proc_start_time, write_json_atomic
from dtm.train.checkpoints import checkpoints
from dtm.train.config import TrainConfig, check_config, read_config, run_id
from dtm.train.group import check_members
from dtm.train.loop import request_stop
from dtm.train.memory import Machine, model_shape, this_machine
from dtm.train.split import split_members


def backend_for(spec: str):
    """``"local"`` or ``"ray:ADDRESS"`` -> a backend object."""
    if spec == "local":
        return LocalBackend()
    if spec.startswith("ray:"):
        from dtm.jobs.ray_backend import RayBackend  # lazy: ray (seconds to import)

        return RayBackend(spec[4:])
    raise ConfigError(f"backend {spec!r}: use 'local' or 'ray:ADDRESS'.")


def default_backend() -> str:
    addr = os.environ.get("DTM_RAY_ADDRESS")
    return f"ray:{addr}" if addr else "local"


def submit(
    cfg: TrainConfig,
    *,
    name: str | None = None,
    group: str | None = None,
    backend: str | None = None,
    store: JobStore | None = None,
    clustering: str | None = None,
) -> tuple[Job, bool]:
    """Queue a training run; returns (job, created). A configuration already submitted
    returns its existing job (whatever its state) and starts nothing. ``clustering``
    names the clustering a sub-model belongs to (recorded, never parsed back from paths);
    an existing job without one takes it."""
    store = store or JobStore()
    check_config(cfg)
    backend = backend or default_backend()
    backend_for(backend)  # validates the spec (and that Ray is importable)
    if not backend.startswith("ray"):  # a Ray cluster's workers may see other folders
        check_base_path(cfg.base, allow_pickle=cfg.allow_pickle)  # before a job is queued
    jid = run_id(cfg)
    run_dir = store.registry.root / "runs" / jid
    cfg = TrainConfig(**{**asdict(cfg), "out": str(run_dir)})
    name = name or (f"sub {cfg.cluster}" if cfg.kind == "sub" else cfg.kind)
    job = _new_job(jid, cfg.kind, name, group, asdict(cfg), backend, run_dir, clustering)
    job, created = store.add(job)
    if not created and clustering and not job.clustering:
        store.update(job.id, clustering=clustering)
    if created:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "job.json", job.config)
        pump(store)
    return store.get(job.id), created


def _new_job(jid, kind, name, group, config, backend, run_dir, clustering=None, parent=None):
    now = time.time()
    return Job(
        id=jid,
        kind=kind,
        name=name,
        group=group,
        config=config,
        state="queued",
        backend=backend,
        ref=None,
        pid=None,
        proc_start=None,
        gpu=None,
        run_dir=run_dir,
        resume=False,
        step=0,
        first_step=0,
        total_steps=None,
        attempts=0,
        error=None,
        created=now,
        started=None,
        updated=now,
        ended=None,
        clustering=clustering,
        parent=parent,
    )


def submit_group(
    members: list[tuple[str, TrainConfig, str | None, str]],
    *,
    name: str = "group",
    group: str | None = None,
    backend: str | None = None,
    store: JobStore | None = None,
) -> tuple[Job, list[Job], bool]:
    """Queue several runs as one group job (``dtm.train.group``: one process, one base).
    ``members``: ``(name, config, clustering, folder)`` each, ``folder`` its run folder
    inside the group's (``cluster-0``, ``kmeans/cluster-0``, ``sft``). Returns (the group
    job, its member rows, created); the same members submitted again find the first
    group."""
    store = store or JobStore()
    backend = backend or default_backend()
    backend_for(backend)
    for _, cfg, _, _ in members:
        check_config(cfg)
    if not backend.startswith("ray"):
        check_base_path(members[0][1].base, allow_pickle=members[0][1].allow_pickle)
    gid = input_key("group", {"members": [run_id(cfg) for _, cfg, _, _ in members]})
    run_dir = store.registry.root / "runs" / gid
    rows, configs = [], []
    for mname, cfg, clustering, folder in members:
        cfg = TrainConfig(**{**asdict(cfg), "out": str(run_dir / folder)})
        mid = input_key("member", {"group": gid, "run": run_id(cfg)})
        configs.append(asdict(cfg))
        rows.append(
            _new_job(
                mid, cfg.kind, mname, group, asdict(cfg), backend, Path(cfg.out), clustering, gid
            )
        )
    check_members([read_config(c) for c in configs])
    job = _new_job(gid, "group", name, group, {"members": configs}, backend, run_dir)
    job, created = store.add(job)
    if created:
        for r in rows:
            store.add(r)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "job.json", job.config)
        pump(store)
    return store.get(job.id), store.list(parent=job.id), created


def submit_together(
    members: list[tuple[str, TrainConfig, str | None, str]],
    *,
    name: str = "group",
    group: str | None = None,
    backend: str | None = None,
    store: JobStore | None = None,
    shape: dict | None = None,
    machine: Machine | None = None,
) -> list[tuple[Job, list[Job], bool]]:
    """Queue ``members`` (as ``submit_group`` takes them) as the fewest group jobs that
    each fit on one GPU of ``machine`` (``dtm.train.split``), in order: one group, as
    ``submit_group`` makes it, when they fit together or the memory is not known; else
    ``NAME 1/n``, ``NAME 2/n``, ... Returns ``(group job, its member rows, created)`` of
    each. ``machine`` defaults to the one the jobs run on where it is known: this one for
    the local backend (no GPU: no split), none for Ray (its workers' GPUs are not known
    here: no split). ``shape`` is an ``estimate.shape`` mapping for a base that is not a
    local folder."""
    store = store or JobStore()
    backend = backend or default_backend()
    cfgs = [cfg for _, cfg, _, _ in members]
    for cfg in cfgs:  # every member's config before any part is queued
        check_config(cfg)
    check_members([replace(c, out=m[3]) for c, m in zip(cfgs, members, strict=True)])
    if machine is None:
        machine = this_machine() if backend == "local" else Machine(gpu=False)
    parts = split_members(cfgs, model_shape(cfgs[0].base, shape), machine)
    if len(parts) == 1:
        return [submit_group(members, name=name, group=group, backend=backend, store=store)]
    return [
        submit_group(
            [members[i] for i in part],
            name=f"{name} {k}/{len(parts)}",
            group=group,
            backend=backend,
            store=store,
        )
        for k, part in enumerate(parts, 1)
    ]


def pump(store: JobStore | None = None) -> list[Job]:
    """Start queued jobs while there are free slots; returns the jobs started. Ray jobs
    are all handed to Ray at once (Ray's scheduler queues them by resources)."""
    store = store or JobStore()
    limit = max_parallel()
    gpus = gpu_slots()
    claimed = store.claim_queued(limit, len(gpus), jobs_per_gpu() if gpus else 1)
    started = []
    for jid in claimed:
        job = store.get(jid)
        try:
            backend_for(job.backend).start(store, job)
        except Exception as e:  # a launch failure is the job's failure, not the caller's
            store.update(jid, state="failed", error=f"could not start: {e}", ended=time.time())
            continue
        started.append(store.get(jid))
    return started


def refresh(store: JobStore | None = None) -> list[Job]:
    """Reconcile every unfinished job with its backend (dead processes become
    ``interrupted``), start queued jobs where slots are free, and return all jobs."""
    store = store or JobStore()
    open_jobs = [j for j in store.list(states=("queued", *ACTIVE)) if j.parent is None]
    by_backend: dict[str, list[Job]] = {}
    for j in open_jobs:
        by_backend.setdefault(j.backend, []).append(j)
    for spec, jobs in by_backend.items():
        try:
            backend_for(spec).refresh(store, jobs)
        except Exception as e:  # an unreachable cluster must not hide the other jobs
            for j in jobs:
                store.update(j.id, error=f"cannot reach {spec}: {e}")
    _settle_members(store)
    pump(store)
    return store.list()


def _settle_members(store: JobStore) -> None:
    """A member row still open whose group ended (a killed process) takes the group's
    end state and error."""
    groups = {j.id: j for j in store.list() if j.kind == "group"}
    for m in store.list(states=("queued", *ACTIVE)):
        g = groups.get(m.parent) if m.parent else None
        if g is not None and g.state in FINAL:
            state = g.state if g.state != "done" else "failed"
            store.update(
                m.id,
                only_if=(m.state,),
                state=state,
                error=g.error or f"its group {g.id[:12]} ended",
                ended=g.ended or time.time(),
            )


def cancel(job_id: str, store: JobStore | None = None) -> Job:
    """Stop a job: a queued one at once; a running one saves a checkpoint first."""
    store = store or JobStore()
    job = store.get(job_id)
    if job.parent:  # a member stops with its group (one process trains them all)
        cancel(job.parent, store)
        return store.get(job.id)
    if job.state in FINAL:
        raise ConfigError(f"job {job.id} is already {job.state}.")
    if job.state == "queued" and store.update(
        job.id, only_if=("queued",), state="cancelled", ended=time.time()
    ):
        for m in store.list(parent=job.id, states=("queued",)):
            store.update(m.id, only_if=("queued",), state="cancelled", ended=time.time())
        return store.get(job.id)
    backend_for(job.backend).cancel(store, job)
    return store.get(job.id)


def restart(job_id: str, *, resume: bool, store: JobStore | None = None) -> Job:
    """Queue a cancelled, interrupted or failed job again: ``resume`` continues from its
    last checkpoint, otherwise it starts from scratch (its old log is kept)."""
    store = store or JobStore()
    job = store.get(job_id)
    if job.parent:  # a member is resumed or retried with its group
        restart(job.parent, resume=resume, store=store)
        return store.get(job.id)
    if job.state not in RESTARTABLE:
        raise ConfigError(
            f"job {job.id} is {job.state}; only {', '.join(RESTARTABLE)} jobs can be "
            f"{'resumed' if resume else 'retried'}."
        )
    store.update(
        job.id,
        only_if=RESTARTABLE,
        state="queued",
        resume=int(resume),
        attempts=job.attempts + 1,
        error=None,
        ended=None,
        pid=None,
    )
    for m in store.list(parent=job.id):
        if m.state != "done" or not resume:  # a retry trains every member afresh
            store.update(m.id, state="queued", error=None, ended=None)
    pump(store)
    return store.get(job.id)


def claim(store: JobStore, job: Job, **fields) -> None:
    """Mark ``job`` running in this process (SIGTERM then asks for a checkpoint and a
    stop); ``Stopped`` when it was cancelled while it waited (a Ray job pending on
    resources)."""
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    claimed = store.update(
        job.id,
        only_if=("queued", "starting"),
        state="running",
        pid=os.getpid(),
        proc_start=proc_start_time(os.getpid()),
        started=time.time(),
        error=None,
        **fields,
    )
    if not claimed:
        raise Stopped(f"job {job.id} is {store.get(job.id).state}; not started.")


def checkpoint_step(run_dir: Path) -> int:
    found = checkpoints(run_dir / "checkpoints", complete=False)
    return found[-1][0] if found else 0
