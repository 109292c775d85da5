"""What several commands share: the progress bar and the model-permission switches."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


def progress_bar():
    """A ``(stage, fraction)`` callback drawing one tqdm bar per stage on stderr."""
    bars: dict[str, tqdm] = {}

    def update(stage: str, frac: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(
                total=100,
                desc=stage,
                unit="%",
                file=sys.stderr,
                leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
            )
        bar.n = round(100 * frac)
        bar.refresh()
        if frac >= 1.0:
            bar.close()

    return update


def model_permissions(p: argparse.ArgumentParser) -> None:
    """The two switches that let a model folder run code: both off unless given."""
    p.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="run the Python code a model folder ships (its auto_map); off by default",
    )
    p.add_argument(
        "--allow-pickle-weights",
        dest="allow_pickle",
        action="store_true",
        help="load a base model that has only pickle (.bin) weights (a pickle can run code)",
    )
