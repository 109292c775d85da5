"""``merge``: merge LoRA sub-models into one adapter or model, with given weights (K
numbers, or blocks of K from the bottom layer up, ``;``-separated) or weights found by a
search, by gradient descent (``--learn``) or by LM-Cocktail."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtm.cli.common import model_permissions, progress_bar
from dtm.errors import ConfigError
from dtm.lab import default_lab_dir
from dtm.merge.blocks import base_layer_count, check_blocks, format_weights, parse_weights
from dtm.merge.export import merge_to_folder
from dtm.merge.methods import METHODS, add_merge_arguments, merge_params_from_args
from dtm.merge.objective import merge_objective


def _weights(args: argparse.Namespace) -> list | None:
    """``--weights`` (K numbers, or a K x B table) and ``--blocks``, checked before any
    model loads (naming the flag; the layer count read from the base's config.json),
    with the flags that exclude them."""
    n_layers = base_layer_count(args.base)
    if args.blocks is not None:
        try:
            check_blocks(args.blocks, n_layers)
        except ConfigError as e:
            raise ConfigError(f"--blocks {args.blocks}: {e}") from None
    weights = None
    if args.weights:
        weights = parse_weights(args.weights, len(args.adapters), args.blocks, n_layers)
        if args.blocks and args.blocks > 1 and not any(isinstance(w, list) for w in weights):
            weights = [[w] * args.blocks for w in weights]  # the same in every block
    finders = [f for f in ("search", "cocktail", "learn") if getattr(args, f)]
    if finders and weights is not None:
        raise ConfigError(
            f"--weights with --{finders[0]}: it finds the weights; give one or the other."
        )
    if len(finders) > 1:
        raise ConfigError(
            f"{' and '.join('--' + f for f in finders)}: choose one way to find the weights."
        )
    if args.cocktail and args.blocks not in (None, 1):
        raise ConfigError("--blocks with --cocktail: LM-Cocktail gives one weight per adapter.")
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
    find = next((f for f in ("search", "cocktail", "learn") if getattr(args, f)), None)
    if find == "learn":
        if not args.heldout or args.tasks:
            raise ConfigError(
                "--learn minimises a held-out loss by gradient descent: give --heldout FILE "
                "(and no --tasks: a task's score has no gradient)."
            )
        if METHODS[args.method].kind != "linear":
            linear = ", ".join(n for n, m in METHODS.items() if m.kind == "linear")
            raise ConfigError(
                f"--learn with --method {args.method}: the gradient flows through each "
                f"layer's LoRA scales, which only a linear method uses; choose {linear}."
            )
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: give at least 1.")
    blocks = args.blocks or (1 if find == "search" else 3)
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
        blocks=blocks,
        steps=args.steps,
        seed=args.param_seed,
        temperature=args.temperature,
        full=args.full,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        progress=progress_bar() if find in ("search", "learn") else None,
    )
    out, found, weights = res["out"], res["found"], res["weights"]
    if find == "search":
        uniform, best = found["points"][0], found["best"]
        print(
            f"searched {len(found['points'])} points: best {best['score']:.4f} at "
            f"{format_weights(_rounded(best['weights'], 3))} (uniform {uniform['score']:.4f})"
        )
    elif find == "learn":
        first, best = found["path"][0], found["best"]
        print(
            f"learned {found['blocks']} block(s) in {found['steps']} steps: held-out loss "
            f"{best['loss']:.4f} at {format_weights(_rounded(best['weights'], 3))} "
            f"(uniform {first['loss']:.4f})"
        )
    elif find == "cocktail":
        print(
            f"held-out losses {[round(x, 4) for x in found['losses']]} -> weights "
            f"{[round(w, 4) for w in weights]} (T={args.temperature})"
        )
    if found is not None:
        print(f"wrote {out}/{res['found_file'].name}")
    kind = "full merged weights" if args.full else "a peft adapter"
    shown = format_weights(_rounded(weights, 4))
    print(f"merged {len(args.adapters)} adapters ({args.method}, weights {shown}) into {kind}")
    print(f"wrote {out} and {out}/recipe.json; Compare lists it as {res['saved']['label']!r}")
    return 0


def _rounded(weights, digits: int):
    if weights and isinstance(weights[0], list):
        return [[round(x, digits) for x in row] for row in weights]
    return [round(x, digits) for x in weights]


def merge_parser(mg: argparse.ArgumentParser) -> None:
    mg.add_argument("--base", required=True, help="the base model the adapters were trained on")
    mg.add_argument("--adapters", nargs="+", required=True, help="peft adapter folders")
    mg.add_argument(
        "--weights",
        default=None,
        help="comma-separated, one per adapter; by block of layers: blocks separated by ';' "
        "from the bottom layer up, each with one weight per adapter (0.6,0.3,0.1;0.1,0.2,0.7)",
    )
    mg.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="split the layers into B contiguous blocks, each with its own weights "
        "(--search: default 1; --learn: default 3; at most the number of layers)",
    )
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
        "--learn",
        action="store_true",
        help="learn the K x B weights by gradient descent on the --heldout loss (adapters "
        "fixed; each block's weights a softmax); writes OUTDIR/learn.json and exports the best",
    )
    find.add_argument("--steps", type=int, default=30, help="--learn's gradient steps")
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
    find.add_argument(
        "--budget",
        type=int,
        default=None,
        help="evaluations, starts included (default 10 per weight, K x B, at least 40)",
    )
    find.add_argument("--limit", type=int, default=40, help="items per task / held-out rows")
    find.add_argument("--temperature", type=float, default=5.0, help="LM-Cocktail's T")
    find.add_argument("--lab", default=None, help="the lab whose tasks lab_* are")
    model_permissions(mg)
    mg.add_argument("--out", required=True, help="a new folder")
    mg.set_defaults(func=cmd_merge)


PARSERS = {"merge": merge_parser}
