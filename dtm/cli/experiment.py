"""``run``: a whole experiment from a YAML file, headless."""

from __future__ import annotations

import argparse

from dtm.cli.common import progress_bar
from dtm.errors import DTMError
from dtm.experiment import (
    DEFAULT_GPU_GIB,
    describe,
    experiment_dir,
    load_experiment,
    memory_lines,
    plan,
    run_experiment,
)


def cmd_run(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    if args.backend:
        exp.backend = args.backend
    jobs = plan(exp)
    print(describe(exp, jobs))
    if args.dry_run:
        print("\n".join(memory_lines(exp, jobs, args.gpu_memory)))
        return 0
    command = f"python -m dtm run {args.experiment}"
    out = experiment_dir(exp.name)
    try:
        res = run_experiment(exp, command=command, wait=not args.no_wait, echo=progress_bar())
    except DTMError:
        if (out / "results.md").exists():
            print((out / "results.md").read_text(encoding="utf-8"))
        raise
    print(res["jobs_table"])
    if args.no_wait:
        print(f"wrote {out / 'jobs.md'}; the jobs run on")
        return 0
    print(res["results"])
    print(f"wrote {out / 'results.md'} and results.json")
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: give the GPU's memory in GiB, e.g. 80")
    return value


def run_parser(r: argparse.ArgumentParser) -> None:
    r.add_argument("experiment", help="an experiment file, e.g. experiments/lab.yaml")
    r.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan; load nothing"
    )
    r.add_argument(
        "--gpu-memory",
        type=_positive,
        default=DEFAULT_GPU_GIB,
        metavar="GIB",
        help=f"the dry run's GPU memory in GiB (default {DEFAULT_GPU_GIB:g}): each job's "
        "estimate, whether it fits, what auto chooses",
    )
    r.add_argument("--no-wait", action="store_true", help="submit the jobs and return")
    r.add_argument("--backend", default=None, help="local or ray:ADDRESS (overrides the file)")
    r.set_defaults(func=cmd_run)


PARSERS = {"run": run_parser}
