"""The training commands: ``train`` (a run, a group, or a job of the registry) and
``jobs`` (the background jobs)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import yaml

from dtm import jobs, threads
from dtm.cli.common import progress_bar
from dtm.errors import ConfigError
from dtm.models import check_base_path
from dtm.train import check_config, request_stop, run_id
from dtm.train.flags import add_arguments, config_from_args


def _train_config(args: argparse.Namespace):
    """A TrainConfig from ``--config FILE`` (JSON or YAML) overridden by the flags."""
    values = _read_mapping(args.config) if args.config else {}
    return config_from_args(args, values, args.config or "")


def _read_mapping(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from e
    try:
        data = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of names to values.")
    return data


def _install_stop_handlers() -> None:
    """SIGTERM, or a first Ctrl-C, asks the trainer to checkpoint and stop."""

    def on_int(signum, frame):
        print("stopping after this step (checkpoint); Ctrl-C again to abort", file=sys.stderr)
        request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    signal.signal(signal.SIGINT, on_int)


def cmd_train(args: argparse.Namespace) -> int:
    _install_stop_handlers()
    if args.job:
        threads.claim("training")
        res = jobs.run_job(args.job, resume=args.resume)
        out, rid = res["out"], args.job
    else:
        cfg = _train_config(args)
        check_config(cfg)  # a bad input is told before the evaluators (torch) load
        check_base_path(cfg.base, allow_pickle=cfg.allow_pickle)
        threads.claim("training")  # imports torch: after the input is checked
        from dtm.jobs.runner import run_training  # lazy: torch (the evaluators)

        res = run_training(cfg, progress=progress_bar(), resume=args.resume)
        out, rid = cfg.out, run_id(cfg)
    if res["metrics"] and isinstance(res["metrics"][0], list):  # a group: one line each
        for recs, folder in zip(res["metrics"], res.get("members") or [None] * 99, strict=False):
            last = recs[-1]
            print(
                f"{folder or 'member'}: {len(recs)} logged steps; final train "
                f"{last['train_loss']}, val {last['val_loss']:.4f}, loss ratio "
                f"{last['loss_ratio']}"
            )
        print(f"group {rid}: {len(res['metrics'])} members in {res['seconds']} s; wrote {out}")
        return 0
    last = res["metrics"][-1]
    print(
        f"run {rid}: {len(res['metrics'])} logged steps in {res['seconds']} s; final train "
        f"{last['train_loss']}, val {last['val_loss']:.4f}, loss ratio {last['loss_ratio']}"
    )
    print(f"wrote {out}/adapter, {out}/metrics.jsonl")
    return 0


def _job_line(j) -> str:
    eta = j.eta_seconds()
    return (
        f"{j.id[:12]}  {j.state:<11} {j.name:<14} {j.step}/{j.total_steps or '?'}"
        f"{'' if eta is None else f'  eta {eta:.0f}s'}  {j.backend}  {j.run_dir}"
        + (f"  (in group {j.parent[:12]})" if j.parent else "")
        + (f"\n    {j.error}" if j.error and j.state in jobs.RESTARTABLE else "")
    )


def _wait(args: argparse.Namespace) -> int:
    store = jobs.JobStore()
    ids = [store.get(i).id for i in args.ids]
    deadline = time.time() + args.timeout if args.timeout else None
    while True:
        rows = {j.id: j for j in jobs.refresh(store)}
        if all(rows[i].state in jobs.FINAL for i in ids):
            break
        if deadline and time.time() > deadline:
            print("timed out", file=sys.stderr)
            return 1
        time.sleep(args.poll)
    for i in ids:
        print(f"{i}: {rows[i].state}" + (f" ({rows[i].error})" if rows[i].error else ""))
    return 0 if all(rows[i].state == "done" for i in ids) else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.jobs_command == "list":
        rows = jobs.refresh()
        if args.group:
            rows = [j for j in rows if j.group == args.group]
        if not rows:
            print("no jobs")
        for j in rows:
            print(_job_line(j))
        return 0
    if args.jobs_command == "cancel":
        job = jobs.cancel(args.id)
        print(f"{job.id}: {job.state}")
        return 0
    if args.jobs_command in ("resume", "retry"):
        job = jobs.restart(args.id, resume=args.jobs_command == "resume")
        print(f"{job.id}: {job.state}")
        return 0
    if args.jobs_command == "logs":
        job = jobs.JobStore().get(args.id)
        print(jobs.backend_for(job.backend).logs(job, args.tail), end="")
        return 0
    if args.jobs_command == "wait":
        return _wait(args)
    raise AssertionError(args.jobs_command)


def train_parser(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--config", default=None, help="JSON or YAML file of TrainConfig values (flags win)"
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --out"
    )
    t.add_argument("--job", default=None, help=argparse.SUPPRESS)  # run a registry job
    add_arguments(t)  # one flag per TrainConfig field, with its help
    t.set_defaults(func=cmd_train)


def jobs_parser(j: argparse.ArgumentParser) -> None:
    j_sub = j.add_subparsers(dest="jobs_command", required=True)
    jl = j_sub.add_parser("list", help="every job with its state and progress")
    jl.add_argument("--group", default=None, help="only the jobs of one experiment")
    for name, text in [
        ("cancel", "stop a job (a running one saves a checkpoint first)"),
        ("resume", "continue a cancelled, interrupted or failed job from its checkpoint"),
        ("retry", "run a cancelled, interrupted or failed job again from scratch"),
    ]:
        c = j_sub.add_parser(name, help=text)
        c.add_argument("id", help="job id (a unique prefix is enough)")
    jg = j_sub.add_parser("logs", help="the tail of a job's log")
    jg.add_argument("id")
    jg.add_argument("--tail", type=int, default=4000, help="bytes from the end")
    jw = j_sub.add_parser("wait", help="wait until jobs end; exit 0 when all are done")
    jw.add_argument("ids", nargs="+")
    jw.add_argument("--timeout", type=float, default=None)
    jw.add_argument("--poll", type=float, default=2.0)
    for c in j_sub.choices.values():
        c.set_defaults(func=cmd_jobs)


PARSERS = {"train": train_parser, "jobs": jobs_parser}
