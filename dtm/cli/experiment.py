"""``run``: a whole experiment from a YAML file, headless."""

from __future__ import annotations

import argparse

from dtm.cli.common import progress_bar
from dtm.errors import DTMError
from dtm.experiment import describe, experiment_dir, load_experiment, plan, run_experiment


def cmd_run(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    if args.backend:
        exp.backend = args.backend
    print(describe(exp, plan(exp)))
    if args.dry_run:
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


def run_parser(r: argparse.ArgumentParser) -> None:
    r.add_argument("experiment", help="an experiment file, e.g. experiments/lab.yaml")
    r.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan; load nothing"
    )
    r.add_argument("--no-wait", action="store_true", help="submit the jobs and return")
    r.add_argument("--backend", default=None, help="local or ray:ADDRESS (overrides the file)")
    r.set_defaults(func=cmd_run)


PARSERS = {"run": run_parser}
