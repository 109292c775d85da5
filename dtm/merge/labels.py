"""Merges named so a person can read them.

``weights_label(weights, names)``: ``c0 .25 · c1 .25 · c2 .50``, the weights as named
clusters (rounded to two places); a per-block table (one K-list of weights per block)
reads as each cluster's mean over the blocks, e.g. ``per block ×3, mean c0 .30 · c1 .70``.
``weights_table(weights, names)``: the per-block table's rows, to show beside it.
``recipe_label(recipe, names)``: ``average: c0 .25 · c1 .75``, the method, the weights and
any parameters. ``vertex_of(weights)``: the one sub-model a weight vector is all of (a
single sub-model, not a merge), else None.
"""

from __future__ import annotations

SINGLE = "a single sub-model, not a merge"


def _num(x: float) -> str:
    """``.25``, ``1.00``, ``-.10``: two places, no leading zero."""
    text = f"{float(x):.2f}"
    return text.replace("0.", ".", 1) if text.lstrip("-").startswith("0.") else text


def per_block(weights) -> bool:
    """Whether ``weights`` is a per-block table (a list of K-lists, one per block)."""
    return bool(weights) and all(isinstance(w, (list, tuple)) for w in weights)


def _names(k: int, names) -> list[str]:
    names = list(names or [])
    return names if len(names) == k else [f"c{i}" for i in range(k)]


def weights_label(weights, names=None) -> str:
    """The weights as named clusters; a per-block table as each cluster's mean."""
    if not weights:
        return ""
    if per_block(weights):
        k = len(weights[0])
        mean = [sum(float(b[i]) for b in weights) / len(weights) for i in range(k)]
        flat = " · ".join(f"{n} {_num(v)}" for n, v in zip(_names(k, names), mean, strict=True))
        return f"per block ×{len(weights)}, mean {flat}"
    k = len(weights)
    return " · ".join(f"{n} {_num(v)}" for n, v in zip(_names(k, names), weights, strict=True))


def weights_table(weights, names=None) -> list[dict]:
    """One row per block (``block``, then each cluster's weight), or [] for flat weights."""
    if not per_block(weights):
        return []
    k = len(weights[0])
    return [
        {"block": b, **{n: round(float(v), 3) for n, v in zip(_names(k, names), row, strict=True)}}
        for b, row in enumerate(weights)
    ]


def recipe_label(recipe: dict, names=None) -> str:
    """``ties: c0 .20 · c1 .30 · c2 .50 · density=0.2``."""
    method = recipe.get("method", "average")
    parts = [weights_label(recipe.get("weights") or [], names)]
    parts += [f"{k}={v}" for k, v in sorted((recipe.get("params") or {}).items())]
    rest = " · ".join(p for p in parts if p)
    return f"{method}: {rest}" if rest else method


def vertex_of(weights, tol: float = 0.005) -> int | None:
    """The index of the one sub-model that holds all the weight (every other weight
    within ``tol`` of zero), else None; a per-block table is a vertex only when every
    block is the same one."""
    rows = weights if per_block(weights) else [weights]
    found = set()
    for row in rows:
        big = [i for i, w in enumerate(row) if abs(float(w)) > tol]
        if len(big) != 1:
            return None
        found.add(big[0])
    return found.pop() if len(found) == 1 else None
