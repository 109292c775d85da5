"""Merges named so a person can read them.

``weights_label(weights, names)``: ``c0 .25 · c1 .25 · c2 .50``, the weights as named
clusters (rounded to two places); a K x B table (``dtm.merge.blocks``: ``table[k][b]``)
gives each cluster its weights block by block from the bottom, e.g. ``by block ×2: c0
.60/.10 · c1 .40/.90`` (a table whose blocks agree is its K numbers).
``weights_table(weights, names)``: the table's rows, one per block, to show beside it.
``recipe_label(recipe, names)``: ``average: c0 .25 · c1 .75``, the method, the weights and
any parameters. ``vertex_of(weights)``: the one sub-model a weight vector is all of (a
single sub-model, not a merge), else None.
"""

from __future__ import annotations

from dtm.merge.blocks import column, compact, is_table, n_blocks

SINGLE = "a single sub-model, not a merge"


def _num(x: float) -> str:
    """``.25``, ``1.00``, ``-.10``: two places, no leading zero."""
    text = f"{float(x):.2f}"
    return text.replace("0.", ".", 1) if text.lstrip("-").startswith("0.") else text


def per_block(weights) -> bool:
    """Whether ``weights`` is a K x B table whose blocks differ."""
    return is_table(compact(list(weights or [])))


def _names(k: int, names) -> list[str]:
    names = list(names or [])
    return names if len(names) == k else [f"c{i}" for i in range(k)]


def weights_label(weights, names=None) -> str:
    """The weights as named clusters; a K x B table block by block, bottom first."""
    if not weights:
        return ""
    weights = compact(list(weights))
    k = len(weights)
    if is_table(weights):
        each = (
            f"{n} " + "/".join(_num(v) for v in row)
            for n, row in zip(_names(k, names), weights, strict=True)
        )
        return f"by block ×{n_blocks(weights)}: " + " · ".join(each)
    return " · ".join(f"{n} {_num(v)}" for n, v in zip(_names(k, names), weights, strict=True))


def weights_table(weights, names=None) -> list[dict]:
    """One row per block, bottom first (``block``, then each cluster's weight); [] for
    weights that are the same in every block."""
    if not per_block(weights):
        return []
    k = len(weights)
    return [
        {
            "block": b,
            **{n: round(v, 3) for n, v in zip(_names(k, names), column(weights, b), strict=True)},
        }
        for b in range(n_blocks(weights))
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
    within ``tol`` of zero), else None; a K x B table is a vertex only when every block
    is the same one."""
    weights = list(weights or [])
    blocks = [column(weights, b) for b in range(n_blocks(weights))] if weights else [[]]
    found = set()
    for col in blocks:
        big = [i for i, w in enumerate(col) if abs(float(w)) > tol]
        if len(big) != 1:
            return None
        found.add(big[0])
    return found.pop() if len(found) == 1 else None
