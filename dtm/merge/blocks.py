"""Merge weights by block of layers: a merge's weights as a K x B table.

The network's layers are split into B contiguous blocks, from the bottom layer up, as
evenly as possible (``numpy.array_split``'s rule: the first ``L mod B`` blocks take one
layer more; 4 layers in 2 blocks are layers 0-1 and 2-3; the default B = 3 is the bottom,
middle and top thirds of Heterogeneous Model Averaging). A merge's weights are then

- a flat list of K numbers, one per sub-model: the same in every layer (one block, the
  meaning weights have always had), or
- a K x B table, ``table[k][b]``: sub-model k's weight in block b (a list of K rows of B
  numbers). A table whose columns are all the same is the flat list (``compact``).

On the command line a table is written block by block, bottom first: ``"0.6,0.3,0.1;
0.1,0.2,0.7"`` is K = 3, B = 2 (``parse_weights``). A LoRA layer outside the numbered
layers (an ``lm_head`` target) takes the top block's weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from dtm.errors import ConfigError

DEFAULT_BLOCKS = 3
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to (``...layers.3.self_attn.q_proj`` -> 3)."""
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else None


def block_bounds(n_layers: int, blocks: int) -> list[tuple[int, int]]:
    """``[(first, last)]`` layers of each block, bottom first (contiguous, as even as
    possible)."""
    check_blocks(blocks, n_layers)
    size, extra = divmod(n_layers, blocks)
    out, start = [], 0
    for b in range(blocks):
        n = size + (1 if b < extra else 0)
        out.append((start, start + n - 1))
        start += n
    return out


def block_of(layer: int | None, n_layers: int, blocks: int) -> int:
    """The block of ``layer`` (None, outside the numbered layers: the top block)."""
    if layer is None:
        return blocks - 1
    for b, (lo, hi) in enumerate(block_bounds(n_layers, blocks)):
        if lo <= layer <= hi:
            return b
    return blocks - 1


def check_blocks(blocks: int, n_layers: int | None) -> int:
    """``blocks`` as an int; ConfigError when it is below 1 or above the layer count."""
    if isinstance(blocks, bool) or int(blocks) != blocks or blocks < 1:
        raise ConfigError(f"{blocks} blocks: give a whole number of at least 1.")
    if n_layers is not None and blocks > n_layers:
        raise ConfigError(
            f"{blocks} blocks but the model has {n_layers} layers: a block needs at least "
            f"one layer (choose at most {n_layers})."
        )
    return int(blocks)


def is_table(weights) -> bool:
    """Whether ``weights`` is a K x B table (rows of numbers) rather than K numbers."""
    return bool(weights) and all(isinstance(w, (list, tuple)) for w in weights)


def n_blocks(weights) -> int:
    return len(weights[0]) if is_table(weights) else 1


def table(weights, blocks: int | None = None) -> list[list[float]]:
    """``weights`` as a K x B table (a flat list repeated over ``blocks`` columns)."""
    if is_table(weights):
        return [[float(x) for x in row] for row in weights]
    return [[float(w)] * (blocks or 1) for w in weights]


def column(weights, b: int) -> list[float]:
    """Block ``b``'s K weights (a flat list is every block's)."""
    if is_table(weights):
        return [float(row[b]) for row in weights]
    return [float(w) for w in weights]


def compact(weights):
    """A table whose columns are all equal as the flat list it means; else as it is."""
    if not is_table(weights):
        return [float(w) for w in weights]
    rows = table(weights)
    if all(len(set(row)) == 1 for row in rows):
        return [row[0] for row in rows]
    return rows


def check_shape(weights, k: int) -> None:
    """ConfigError unless ``weights`` are K numbers or a K x B table with B >= 1 columns
    in every row."""
    if not is_table(weights):
        if any(isinstance(w, (list, tuple)) for w in weights):
            raise ConfigError("merge weights mix numbers and rows: give K numbers or K rows.")
        return
    if len(weights) != k:
        raise ConfigError(f"a weight table of {len(weights)} rows for {k} adapters: one row each.")
    widths = sorted({len(row) for row in weights})
    if len(widths) != 1 or widths[0] < 1:
        raise ConfigError(
            f"a weight table with rows of {', '.join(map(str, widths))} blocks: every "
            "sub-model needs a weight in every block."
        )


def parse_weights(text: str, k: int, blocks: int | None = None, n_layers: int | None = None):
    """``--weights``: K comma-separated numbers (one block), or blocks separated by ``;``
    from the bottom layer up, each K numbers. Returns a flat list or a K x B table;
    ConfigError (naming ``--weights``) for a wrong count, uneven blocks, a ``blocks``
    that disagrees, or more blocks than ``n_layers``."""
    groups = [g for g in text.split(";")]
    try:
        parsed = [[float(x) for x in g.split(",")] for g in groups]
    except ValueError:
        raise ConfigError(
            f"--weights {text}: not numbers (K comma-separated numbers per block, blocks "
            "separated by ';')."
        ) from None
    bad = [i for i, g in enumerate(parsed) if len(g) != k]
    if bad and len(parsed) == 1:
        raise ConfigError(
            f"--weights {text}: {len(parsed[0])} weights for {k} adapters: give one weight "
            "each (or K per block of layers, blocks separated by ';')."
        )
    if bad:
        sizes = ", ".join(f"block {i + 1}: {len(parsed[i])}" for i in bad)
        raise ConfigError(
            f"--weights {text}: {k} adapters need {k} weights in every block, but {sizes} "
            f"({len(parsed)} block(s), separated by ';')."
        )
    if blocks is not None and len(parsed) > 1 and len(parsed) != blocks:
        raise ConfigError(f"--weights {text}: {len(parsed)} blocks, but --blocks {blocks}.")
    if n_layers is not None and len(parsed) > n_layers:
        raise ConfigError(
            f"--weights {text}: {len(parsed)} blocks but the model has {n_layers} layers "
            f"(a block needs at least one layer)."
        )
    for g in parsed:
        if any(not math.isfinite(x) for x in g):
            raise ConfigError(f"--weights {text}: NaN or infinite values are not weights.")

    if all(x == 0 for g in parsed for x in g):
        raise ConfigError(f"--weights {text}: all zero; nothing would be merged.")
    if len(parsed) == 1:
        return parsed[0]
    return [[parsed[b][i] for b in range(len(parsed))] for i in range(k)]


def format_weights(weights) -> str:
    """``--weights``'s text of ``weights`` (blocks bottom first, separated by ``;``)."""
    if not is_table(weights):
        return ",".join(f"{w:g}" for w in weights)
    return ";".join(
        ",".join(f"{w:g}" for w in column(weights, b)) for b in range(n_blocks(weights))
    )


def base_layer_count(base: str | Path) -> int | None:
    """The number of layers of a local base model folder, from its ``config.json``
    (None when it is not a folder or the config names no layer count)."""
    path = Path(str(base)).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    text = cfg.get("text_config") or {}
    v = text.get("num_hidden_layers") if isinstance(text, dict) else None
    return v if isinstance(v, int) and v > 0 else None
