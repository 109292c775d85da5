"""``merge``: merge LoRA sub-models into one adapter or model, with given weights or
weights found by a search or LM-Cocktail."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtm.cli.common import model_permissions, progress_bar
from dtm.errors import ConfigError
from dtm.lab import default_lab_dir
from dtm.merge.export import merge_to_folder
from dtm.merge.methods import METHODS, add_merge_arguments, check_weights, merge_params_from_args
from dtm.merge.objective import merge_objective


def _weights(args: argparse.Namespace) -> list[float] | None:
    """``--weights``, checked before any model loads (naming the flag), with the flags
    that exclude it."""
    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {args.weights}: not comma-separated numbers.") from None
    if weights is not None:
        try:
            check_weights(weights, len(args.adapters), normalise=False)
        except ConfigError as e:
            raise ConfigError(f"--weights {args.weights}: {e}") from None
    if (args.search or args.cocktail) and weights is not None:
        raise ConfigError("--weights with --search/--cocktail: they find the weights; give one.")
    if args.search and args.cocktail:
        raise ConfigError("--search and --cocktail: choose one way to find the weights.")
    return weights


def _objective(args: argparse.Namespace):
    return merge_objective(
        args.base,
        len(args.adapters),
        cocktail=args.cocktail,
        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()],
        tasks_dir=args.tasks_dir,
        heldout=list(args.heldout or []),
        lab=args.lab,
        limit=args.limit,
        budget=args.budget,
        temperature=args.temperature,
        default_lab=default_lab_dir(),
    )


def cmd_merge(args: argparse.Namespace) -> int:
    weights = _weights(args)
    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # checked before a search spends its budget (the export checks it again)
        raise ConfigError(f"--out {args.out}: not empty; choose a new folder.")
    find = "search" if args.search else "cocktail" if args.cocktail else None
    objective = _objective(args) if find else None
    params = merge_params_from_args(args.method, args)
    res = merge_to_folder(
        args.base,
        args.adapters,
        args.out,
        method=args.method,
        weights=weights,
        params=params,
        find=find,
        objective=objective,
        budget=args.budget,
        seed=args.param_seed,
        temperature=args.temperature,
        full=args.full,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        progress=progress_bar() if find == "search" else None,
    )
    out, found, weights = res["out"], res["found"], res["weights"]
    if find == "search":
        uniform, best = found["points"][0], found["best"]
        print(
            f"searched {len(found['points'])} points: best {best['score']:.4f} at "
            f"{[round(w, 3) for w in best['weights']]} (uniform {uniform['score']:.4f})"
        )
    elif find == "cocktail":
        print(
            f"held-out losses {[round(x, 4) for x in found['losses']]} -> weights "
            f"{[round(w, 4) for w in weights]} (T={args.temperature})"
        )
    if found is not None:
        print(f"wrote {out}/{res['found_file'].name}")
    kind = "full merged weights" if args.full else "a peft adapter"
    shown = [round(w, 4) for w in weights]
    print(f"merged {len(args.adapters)} adapters ({args.method}, weights {shown}) into {kind}")
    print(f"wrote {out} and {out}/recipe.json; Compare lists it as {res['saved']['label']!r}")
    return 0


def merge_parser(mg: argparse.ArgumentParser) -> None:
    mg.add_argument("--base", required=True, help="the base model the adapters were trained on")
    mg.add_argument("--adapters", nargs="+", required=True, help="peft adapter folders")
    mg.add_argument("--weights", default=None, help="comma-separated, one per adapter")
    mg.add_argument("--method", default="average", choices=list(METHODS))
    add_merge_arguments(mg)
    mg.add_argument("--full", action="store_true", help="write full merged weights (HF format)")
    find = mg.add_argument_group("finding the weights")
    find.add_argument(
        "--search",
        action="store_true",
        help="maximise the mean headline of --tasks (held-out losses as -loss) over the "
        "weight simplex (Optuna CMA-ES); writes OUTDIR/search.json and exports the best",
    )
    find.add_argument(
        "--cocktail",
        action="store_true",
        help="LM-Cocktail's weights: softmax(-loss/T) of each adapter's --heldout loss",
    )
    find.add_argument("--tasks", default=None, help="comma-separated: lab or --tasks-dir tasks")
    find.add_argument("--tasks-dir", dest="tasks_dir", default=None, help="task YAML folder")
    find.add_argument(
        "--heldout",
        action="append",
        default=None,
        metavar="FILE",
        help="instruction data (or a .txt corpus) whose loss enters as -loss",
    )
    find.add_argument("--budget", type=int, default=40, help="evaluations, starts included")
    find.add_argument("--limit", type=int, default=40, help="items per task / held-out rows")
    find.add_argument("--temperature", type=float, default=5.0, help="LM-Cocktail's T")
    find.add_argument("--lab", default=None, help="the lab whose tasks lab_* are")
    model_permissions(mg)
    mg.add_argument("--out", required=True, help="a new folder")
    mg.set_defaults(func=cmd_merge)


PARSERS = {"merge": merge_parser}
