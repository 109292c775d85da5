"""``python -m dtm merge``'s work: load the adapters on their base, find the weights (a
search, the learned weights, LM-Cocktail) or take the given ones (K numbers or a K x B
table, ``dtm.merge.blocks``), export the merge with its recipe, record it for Compare, and
write what found the weights beside it (search.json, learn.json, cocktail.json)."""

from __future__ import annotations

import time
from pathlib import Path

from dtm.merge.engine import Merger
from dtm.merge.learn import learn_weights
from dtm.merge.saved import save_merge
from dtm.merge.search import cocktail, search_merge
from dtm.store import cache_dir, write_json_atomic

FOUND_FILES = {"search": "search.json", "cocktail": "cocktail.json", "learn": "learn.json"}


def new_merge_dir(name: str) -> Path:
    """A new export folder of the Merge page: ``<cache>/merged/NAME-<time stamp>``."""
    return cache_dir() / "merged" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def export_recipe(
    merger,
    out: str | Path,
    recipe: dict,
    *,
    adapters: list[str],
    source: str = "exported",
    group: str | None = None,
    full: bool = False,
    registry=None,
    label: str | None = None,
) -> tuple[Path, dict]:
    """Write ``merger``'s merge by ``recipe`` (``method``, ``weights``, ``params``) into
    ``out`` (a new folder) and record it for Compare (under ``group``, as ``label``, by
    default the recipe's): ``(the folder, the saved merge)``."""
    params = recipe.get("params") or {}
    written = merger.export(out, recipe["method"], recipe["weights"], full=full, **params)
    saved = save_merge(
        merger.base,
        [str(a) for a in adapters],
        recipe,
        source=source,
        group=group,
        path=str(written),
        label=label,
        registry=registry,
    )
    return Path(written), saved


def merge_to_folder(
    base: str,
    adapters: list[str],
    out: str | Path,
    *,
    method: str = "average",
    weights: list | None = None,
    params: dict | None = None,
    find: str | None = None,
    objective=None,
    budget: int | None = None,
    blocks: int = 1,
    steps: int = 30,
    seed: int = 0,
    temperature: float = 5.0,
    full: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress=None,
) -> dict:
    """Merge ``adapters`` into ``out`` (a new folder): with ``weights`` (K numbers or a
    K x B table; uniform when None), or the weights ``find`` finds (``"search"``:
    ``search_merge`` over K x ``blocks`` weights with ``budget`` evaluations (None:
    ``default_budget``) and ``seed``; ``"learn"``: ``learn_weights`` over K x ``blocks``
    in ``steps`` steps; ``"cocktail"``: ``cocktail`` at ``temperature``), each scored by
    ``objective``. Returns ``{"out", "weights", "found", "found_file",
    "saved"}`` (``found``: what the finding returned, or None)."""
    params = dict(params or {})
    weights = weights or [1.0 / len(adapters)] * len(adapters)
    merger = Merger(
        base,
        adapters,
        method=method,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    found = None
    if find == "search":
        found = search_merge(
            merger,
            method,
            objective,
            budget,
            params=params,
            seed=seed,
            blocks=blocks,
            progress=progress,
        )
    elif find == "learn":
        found = learn_weights(
            merger, method, objective, blocks, steps, params=params, progress=progress
        )
    elif find == "cocktail":
        found = cocktail(merger, objective, temperature)
    if found is not None:
        weights = found["best"]["weights"]
    recipe = {"method": method, "weights": weights, "params": params}
    written, saved = export_recipe(
        merger, out, recipe, adapters=adapters, source=find or "exported", full=full
    )
    found_file = None
    if found is not None:
        found_file = write_json_atomic(Path(written) / FOUND_FILES[find], found)
    return {
        "out": written,
        "weights": weights,
        "found": found,
        "found_file": found_file,
        "saved": saved,
    }
