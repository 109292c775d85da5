"""``python -m dtm ...``: the headless twin of the dashboard.

Exit codes: 0 success; 2 bad input or environment (a message on stderr says what and
where); 3 training stopped on request (a checkpoint was saved: resume it); 1 an
unexpected error (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dtm.errors import DTMError

# Each command: the module of ``dtm.cli`` that holds its flags and its handler, and its
# one-line help. Only the chosen command's module is imported (its flags are added to
# the parser): the others pull in pandas or torch, which `--help` does not need.
COMMANDS = {
    "data": ("data", "inspect instruction data"),
    "disperse": ("data", "embed, cluster into K subsets, and map the data"),
    "train": ("train", "LoRA SFT of a causal LM: vanilla SFT, a sub-model, or a baseline"),
    "curate": ("data", "select a Deita-style subset of the data (no training): selection.csv"),
    "jobs": ("train", "background training jobs"),
    "merge": ("merge", "merge LoRA sub-models exactly into one adapter or model"),
    "run": ("experiment", "a whole experiment from a YAML file, headless"),
    "eval": ("eval", "score a model on the lab's tasks or the paper's benchmarks"),
    "lab": ("lab", "the embedded alignment-tax lab"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``command`` (every command's when None)."""
    p = argparse.ArgumentParser(
        prog="python -m dtm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, text) in COMMANDS.items():
        parser = sub.add_parser(name, help=text)
        if command is None or name == command:
            group = importlib.import_module(f"dtm.cli.{module}")  # lazy: torch, pandas
            group.PARSERS[name](parser)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return args.func(args)
    except DTMError as e:
        print(f"{'stopped' if e.exit_code == 3 else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
