"""The lab commands: ``lab build``, ``lab measure``, ``lab check-shipped`` and ``lab ship``."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from pathlib import Path

from dtm import threads
from dtm.cli.common import progress_bar
from dtm.errors import ConfigError
from dtm.lab.build import build_lab
from dtm.lab.pace import measure_pace
from dtm.lab.presets import preset
from dtm.lab.shipped import TOLERANCE, check_shipped, ship, shipped_record
from dtm.lab.world import DIALOGUES
from dtm.store import ProgressFile, write_json_atomic


def cmd_lab_build(args: argparse.Namespace) -> int:
    threads.claim("lab build")
    bar = progress_bar()
    progress = bar
    if args.progress_file:
        file = ProgressFile(args.progress_file, state="building", pid=os.getpid())

        def progress(stage: str, frac: float) -> None:
            bar(stage, frac)
            file.update(force=frac >= 1.0, stage=stage, fraction=frac)

    record = None
    if args.shipped:
        record = shipped_record(args.preset, args.size, args.seed)
        custom = args.knob or args.rows or args.steps or args.dialogues
        if record is not None and custom:
            print("not using the shipped weights: --knob, --rows, --steps or --dialogues given")
            record = None
    try:
        summary = build_lab(
            args.out,
            shipped=record,
            seed=args.seed,
            size=args.size,
            preset=args.preset,
            knobs=_lab_knobs(args),
            rows_per_family=args.rows,
            steps=args.steps,
            dialogues=args.dialogues,
            force=args.force,
            progress=progress,
        )
    except Exception as e:
        if args.progress_file:
            write_json_atomic(
                args.progress_file, {"state": "failed", "error": f"{type(e).__name__}: {e}"}
            )
        raise
    if args.pace:  # after the lab is published: it is ready meanwhile
        try:
            pace = measure_pace(args.out)
            print(
                f"this machine's pace: {pace['step_seconds']:.3f} s a training step, "
                f"{pace['eval_seconds']:.1f} s to score every lab benchmark"
            )
        except Exception as e:  # the lab is built; an estimate is not worth failing it
            print(f"could not measure this machine's pace: {type(e).__name__}: {e}")
    if "shipped" in summary["pretraining"]:
        print(f"the pretrained weights are the shipped ones ({record['path']})")
    print(
        f"built the {args.size} {args.preset} lab (seed {args.seed}) in {summary['seconds']} s: "
        f"{summary['world']['facts']} facts, {summary['model']['parameters']:,} parameters, "
        f"{summary['sft']['train_rows']} train / {summary['sft']['val_rows']} val rows"
    )
    print(f"wrote {args.out}")
    return 0


def cmd_lab_check_shipped(args: argparse.Namespace) -> int:
    threads.claim("lab check-shipped")
    res = check_shipped(
        args.preset,
        args.size,
        args.seed,
        steps=args.steps,
        tolerance=args.tolerance,
        progress=progress_bar(),
    )
    print("step  shipped loss  built loss  difference")
    for r in res["rows"]:
        mark = "" if r["within"] else "  (over the tolerance)"
        print(
            f"{r['step']:>4}  {r['shipped']:>12.4f}  {r['built']:>10.4f}  {r['difference']:>9.2%}"
            + mark
        )
    worst = max((r["difference"] for r in res["rows"]), default=float("nan"))
    print(
        f"tokenizer {'identical' if res['tokenizer'] else 'DIFFERENT'}; largest loss difference "
        f"{worst:.2%} (tolerance {res['tolerance']:.0%}) over {len(res['rows'])} logged steps; "
        f"{res['seconds']} s"
    )
    if not res["ok"]:
        print("the shipped weights are not what this code builds: rebuild and ship them again")
    return 0 if res["ok"] else 1


def cmd_lab_ship(args: argparse.Namespace) -> int:
    weights = ship(args.lab)
    print(f"wrote {weights} and {weights.with_suffix('.json')}")
    return 0


def _lab_knobs(args: argparse.Namespace):
    """The preset's bias knobs with each ``--knob NAME=VALUE`` replaced; None when none."""
    if not args.knob:
        return None
    knobs = preset(args.preset).knobs
    types = {f.name: f.type for f in fields(knobs)}
    changes = {}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ConfigError(
                f"--knob {item!r}: expected NAME=VALUE with NAME one of {', '.join(types)}."
            )
        kind = types[name] if isinstance(types[name], str) else types[name].__name__
        try:
            if kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                changes[name] = value.lower() in ("true", "1")
            else:
                changes[name] = {"float": float, "int": int}.get(kind, str)(value)
        except ValueError:
            raise ConfigError(f"--knob {item!r}: {name} takes a {kind} value.") from None
        if kind == "float" and not 0.0 <= changes[name] <= 1.0:
            raise ConfigError(f"--knob {item!r}: {name} is a rate in [0, 1].")
        if kind == "int" and changes[name] < 0:
            raise ConfigError(f"--knob {item!r}: {name} must not be negative.")
    return replace(knobs, **changes)


def cmd_lab_measure(args: argparse.Namespace) -> int:
    from dtm.lab.measure import measure_lab  # lazy: torch (lab build does not need it)

    threads.claim("lab measure")

    if not (Path(args.lab) / "lab.json").exists():
        raise ConfigError(f"--lab {args.lab}: not a built lab (no lab.json).")
    overrides = {"lr": args.lr} if args.lr else {}
    summary = measure_lab(
        args.lab,
        args.out,
        steps=args.steps,
        log_every=args.log_every,
        seed=args.seed,
        progress=progress_bar(),
        **overrides,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"SFT took {summary['sft_seconds']} s; wrote {args.out}/results.json, report.md")
    return 0


def lab_parser(lab: argparse.ArgumentParser) -> None:
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lb = lab_sub.add_parser("build", help="build the synthetic world, base model, data, benchmarks")
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument(
        "--size",
        default="default",
        choices=["small", "default"],
        help="small: for tests, well under a minute; default: the dashboard's lab",
    )
    lb.add_argument(
        "--preset",
        default="bias",
        choices=["bias", "interference"],
        help="bias: the paper's mechanism by construction (default); interference: the first lab",
    )
    lb.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="replace one of the preset's bias knobs (repeatable), e.g. favourite=0.3",
    )
    lb.add_argument(
        "--rows", type=int, default=None, help="train rows per family (default: the preset's)"
    )
    lb.add_argument("--steps", type=int, default=None, help="pretraining steps (default by size)")
    lb.add_argument(
        "--dialogues",
        default=None,
        choices=DIALOGUES,
        help="pretraining's chat dialogues answer bare ('7 .') or framed ('it is 7 .'); "
        "conventions: framed, and the corpus also shows the one-word, yes/no and repeat "
        "conventions on sums and passages; default: the preset's (docs/lab.md)",
    )
    lb.add_argument("--force", action="store_true", help="replace a non-empty --out")
    lb.add_argument(
        "--shipped",
        action="store_true",
        help="load the pretrained weights the project ships for this preset, size and seed "
        "(checked by hash) instead of pretraining; pretrains when none match",
    )
    lb.add_argument(
        "--pace",
        action="store_true",
        help="then time a few training steps and one scoring on it (OUT.pace.json): the "
        "Home page's estimate of a story before one has run here",
    )
    lb.add_argument("--out", required=True, help="folder to write the lab into")
    lb.add_argument(
        "--progress-file",
        default=None,
        help="also write progress as JSON to this file (the dashboard reads it)",
    )
    lb.set_defaults(func=cmd_lab_build)
    lc = lab_sub.add_parser(
        "check-shipped",
        help="pretrain again and compare the loss log with the shipped weights' record "
        "(exit 1 when a logged loss differs by more than the tolerance)",
    )
    lc.add_argument("--preset", default="bias", choices=["bias", "interference"])
    lc.add_argument("--size", default="default", choices=["small", "default"])
    lc.add_argument("--seed", type=int, default=0)
    lc.add_argument(
        "--steps", type=int, default=None, help="stop after this many steps (default: all)"
    )
    lc.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative, per loss")
    lc.set_defaults(func=cmd_lab_check_shipped)
    ls = lab_sub.add_parser("ship", help="write dtm/lab/shipped/ from a lab built from scratch")
    ls.add_argument("--lab", required=True, help="a folder made by `dtm lab build`")
    ls.set_defaults(func=cmd_lab_ship)
    lm = lab_sub.add_parser("measure", help="base and SFT figures of a built lab, with curves")
    lm.add_argument("--lab", required=True, help="a folder made by `dtm lab build`")
    lm.add_argument("--steps", type=int, default=None, help="SFT steps (default: the preset's)")
    lm.add_argument("--log-every", type=int, default=40)
    lm.add_argument("--lr", type=float, default=None, help="SFT learning rate (lab default 1e-3)")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--out", required=True)
    lm.set_defaults(func=cmd_lab_measure)


PARSERS = {"lab": lab_parser}
