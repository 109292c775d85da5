"""``eval``: score a model on the lab's tasks, a tasks folder, the paper's benchmarks or
held-out losses, into a results file and the registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dtm.cli.common import model_permissions
from dtm.errors import ConfigError
from dtm.lab import default_lab_dir
from dtm.score_file import score_to_file

SHOWN = ("acc", "exact_match", "loss", "bits_per_byte")  # the metrics printed per task


def cmd_eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        from dtm.evaluate import known_tasks  # lazy: torch

        print("\n".join(known_tasks(args.tasks_dir)))
        return 0
    if not args.model or not (args.tasks or args.heldout) or not args.out:
        raise ConfigError("give --model, --tasks (or --heldout) and --out (or --list-tasks).")
    out = Path(args.out)
    results = score_to_file(
        args.model,
        [t.strip() for t in (args.tasks or "").split(",") if t.strip()],
        out,
        adapters=list(args.adapter or []),
        engine=args.engine,
        lab=args.lab,
        default_lab=default_lab_dir(),
        tasks_dir=args.tasks_dir,
        heldout=list(args.heldout or []),
        limit=args.limit,
        batch_size=args.batch_size,
        allow_code=args.allow_code_execution,
        seed=args.seed,
        label=args.label or "",
        group=args.group,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    for task, metrics in results.items():
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k.startswith(SHOWN) and not k.endswith("_stderr")
        }
        print(f"{task}: {json.dumps(shown)} (n={metrics.get('n')})")
    print(f"wrote {out}; the scores are in the registry too")
    return 0


def eval_parser(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--model", default=None, help="model folder, hub id, or `lab`")
    ev.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="peft adapter folder; give it several times to score their average merge",
    )
    ev.add_argument("--tasks", default=None, help="comma-separated task names")
    ev.add_argument(
        "--tasks-dir",
        dest="tasks_dir",
        default=None,
        help="a folder of lm-evaluation-harness task YAMLs (dataset_path: json, local files)",
    )
    ev.add_argument(
        "--heldout",
        action="append",
        default=None,
        metavar="FILE",
        help="instruction data (or a .txt corpus) whose mean response-token loss is added "
        "as heldout:<file stem>; give it several times",
    )
    ev.add_argument("--engine", choices=["quick", "full"], default="quick")
    ev.add_argument("--limit", type=int, default=None, help="first N items of each task")
    ev.add_argument("--lab", default=None, help="the lab folder whose tasks lab_* are")
    ev.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="rows per batch (default: 64 for the full engine, 256 for the quick one)",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--label", default=None, help="a name for the model in the registry")
    ev.add_argument("--group", default=None, help="the experiment or launch it belongs to")
    ev.add_argument(
        "--allow-code-execution",
        dest="allow_code_execution",
        action="store_true",
        help="run humaneval/mbpp, which execute model code",
    )
    model_permissions(ev)
    ev.add_argument(
        "--list-tasks",
        dest="list_tasks",
        action="store_true",
        help="print the known task names, the lab's first",
    )
    ev.add_argument("--out", default=None, help="results.json: {task: {metric: value}}")
    ev.set_defaults(func=cmd_eval)


PARSERS = {"eval": eval_parser}
