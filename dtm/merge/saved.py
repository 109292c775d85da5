"""The merges a user tuned (the Merge page's "add to Compare") or exported (``dtm merge``,
the Merge page's Export), kept in the registry's ``merges`` table by recipe, so the
Compare page scores each one as a row named by its recipe (``dtm.merge.labels``:
``average: c0 .25 · c1 .75``), under its group (``grp``, the group's ``MergeSource.id``).

``save_merge(base, adapters, recipe, source=...)`` records one (the same base, adapters
and recipe are the same model: saving it again updates its source and keeps its export
folder); ``saved_merges()`` lists them newest first (the table's rows); ``merge_ref(m)``
is one of them as the ``ModelRef`` Compare scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtm.merge.blocks import compact
from dtm.merge.labels import recipe_label
from dtm.models import ModelRef
from dtm.store import Registry, canonical_json

SOURCES = ("tuned", "exported", "search", "cocktail", "learn")


def _floats(weights):
    """Weights as floats: a flat list, or a per-block table (a list of lists)."""
    return [_floats(w) if isinstance(w, (list, tuple)) else float(w) for w in weights or []]


def _resolved(path: str) -> str:
    """A local folder as an absolute path (a hub id stays as it is), so a merge saved from
    one working directory loads from any other."""
    p = Path(str(path)).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _ref(base: str, adapters: list[str], recipe: dict) -> ModelRef:
    clean = {
        "method": recipe.get("method", "average"),
        "weights": compact(_floats(recipe.get("weights"))),
        "params": dict(recipe.get("params") or {}),
    }
    return ModelRef(base=_resolved(base), adapters=[_resolved(a) for a in adapters], recipe=clean)


def save_merge(
    base: str,
    adapters: list[str],
    recipe: dict,
    *,
    source: str,
    group: str | None = None,
    path: str | None = None,
    label: str | None = None,
    names: list[str] | None = None,
    registry: Registry | None = None,
) -> dict:
    """Record one merge (see the module's docstring); its label by default the recipe's,
    the weights named by ``names`` (the sub-models' clusters, ``c0``, ``c1``, ...)."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: one of {', '.join(SOURCES)}")
    ref = _ref(base, adapters, recipe)
    label = label or recipe_label(ref.recipe, names)
    (registry or Registry()).put_merge(
        {
            "key": ref.key,
            "label": label,
            "base": ref.base,
            "adapters": json.dumps(ref.adapters),
            "recipe": canonical_json(ref.recipe),
            "source": source,
            "path": path,
            "grp": group,
        }
    )
    return {"key": ref.key, "label": label}


def saved_merges(registry: Registry | None = None, adapters: list[str] | None = None) -> list[dict]:
    """Every saved merge (only those over exactly ``adapters``, when given), newest first,
    as ``{"key", "label", "kind": "merge", "base", "adapters", "recipe", "seed", "source",
    "path", "group"}``."""
    out = []
    for row in (registry or Registry()).merges():
        ads = json.loads(row["adapters"])
        if adapters is not None and sorted(ads) != sorted(_resolved(a) for a in adapters):
            continue
        out.append(
            {
                "key": row["key"],
                "label": row["label"],
                "kind": "merge",
                "seed": None,
                "base": row["base"],
                "adapters": ads,
                "recipe": json.loads(row["recipe"]),
                "source": row["source"],
                "path": row["path"],
                "group": row["grp"],
            }
        )
    return out


def merge_ref(merge: dict) -> ModelRef:
    """A ``saved_merges`` row as the model Compare scores (its key is the row's)."""
    return ModelRef(
        base=merge["base"],
        adapters=list(merge["adapters"]),
        recipe=merge["recipe"],
        label=merge["label"],
        kind="merge",
    )
