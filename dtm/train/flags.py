"""The ``dtm train`` flags: one per ``TrainConfig`` field, with its help text."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from dtm.errors import ConfigError
from dtm.train.config import KINDS, TrainConfig, from_mapping


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its help; every default is None (unset), so
    a ``--config`` file's value stands unless the flag is given."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.name == "kind":
            kw["choices"] = list(KINDS)
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if f.type in ("bool",):
            kw["action"] = "store_true"
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type.split(" | ")[0].strip(), str)
        target = parser
        if "exclusive" in f.metadata:
            g = f.metadata["exclusive"]
            if g not in groups:
                groups[g] = parser.add_mutually_exclusive_group()
            target = groups[g]
        target.add_argument(_flag(f), **kw)


def config_from_args(
    args: argparse.Namespace, file_values: dict[str, Any] | None = None, file_name: str = ""
) -> TrainConfig:
    """``--config`` values overridden by the flags that were given."""
    values = dict(file_values or {})
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"--config {file_name}: unknown keys {', '.join(unknown)}.")
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and v is not False:
            values[f.name] = v
    return from_mapping(values, "train")
