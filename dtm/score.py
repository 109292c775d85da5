"""Model references and the scores table: which model (base + adapters + merge recipe,
and what it is: its kind and clustering), which task and metric, the value, its
standard error, the item count, the seed and when.

``ModelRef`` names a model exactly; ``load_model(ref)`` rebuilds it (a merge is redone
in memory, exactly, by ``dtm.models.load_model``); ``record(ref, results, ...)`` stores a
``{task: {metric: value}}`` dict; ``scores(...)`` reads them back as a table with columns
``model_key, model, label, grp, kind, clustering, task, metric, value, stderr, n, seed,
engine, lim, created``.

Kinds (``KINDS``, in the order tables show them): ``base``, ``sft``, ``control`` (the
shrinkage control), ``merge`` (DTM), ``baseline``, ``sub`` (one sub-model alone).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from dtm import models
from dtm.controls import is_scaled, shrink_adapter
from dtm.merge.engine import Merger
from dtm.models import MODEL_KINDS, ModelRef
from dtm.store import Registry

KINDS = MODEL_KINDS  # in the order tables show them


def load_model(ref: ModelRef, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for ``ref``: a merge of several adapters is redone in memory,
    exactly (``Merger``); otherwise ``dtm.models.load_model``."""
    permissions = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    if len(ref.adapters) > 1 or ref.recipe:
        merger = Merger(ref.base, ref.adapters, **permissions)
        r = ref.recipe or {"method": "average"}
        weights = r.get("weights") or [1.0 / len(ref.adapters)] * len(ref.adapters)
        model = merger.apply(r.get("method", "average"), weights, **r.get("params", {}))
        return model, merger.tokenizer
    return models.load_model(ref.base, ref.adapters[0] if ref.adapters else None, **permissions)


def record(
    ref: ModelRef,
    results: dict[str, dict[str, float]],
    *,
    engine: str,
    limit: int | None = None,
    registry: Registry | None = None,
) -> int:
    """Store every metric of ``results``; returns the number of rows written."""
    reg = registry or Registry()
    now = time.time()
    model = ref.to_json()
    rows = []
    for task, metrics in results.items():
        n = metrics.get("n")
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr")
            rows.append(
                {
                    "model_key": ref.key,
                    "model": model,
                    "label": ref.label,
                    "grp": ref.group,
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": None if se is None else float(se),
                    "n": None if n is None else int(n),
                    "seed": ref.seed,
                    "engine": engine,
                    "lim": limit,
                    "created": now,
                    "kind": ref.kind,
                    "clustering": ref.clustering,
                }
            )
    reg.add_results(rows)
    return len(rows)


def scores(
    *, group: str | None = None, registry: Registry | None = None, latest: bool = True
) -> pd.DataFrame:
    """Stored scores (of one group); with ``latest``, only the newest value of each
    (model, task, metric, engine, limit), and within a group of each (label, seed, ...):
    a label and seed name one model of a group, whichever files it was rebuilt from."""
    reg = registry or Registry()
    df = pd.DataFrame.from_records(
        reg.results(group), columns=list(Registry.RESULT_COLUMNS), coerce_float=True
    )
    if latest and len(df):
        df = df.drop_duplicates(["model_key", "task", "metric", "engine", "lim"], keep="last")
        named = df["label"].fillna("") != ""
        same = ["grp", "label", "seed", "task", "metric", "engine", "lim"]
        df = pd.concat([df[~named], df[named].drop_duplicates(same, keep="last")])
        df = df.sort_values("created", kind="stable")
    return df.reset_index(drop=True)


def groups(registry: Registry | None = None) -> list[str]:
    """The groups that have scores, newest first."""
    return (registry or Registry()).result_groups()


def ref_of(row: pd.Series) -> ModelRef:
    """The model of a ``scores`` row."""
    return ModelRef.from_json(row["model"], kind=row.get("kind"), clustering=row.get("clustering"))


def score_models(
    models: list[ModelRef],
    tasks: list[str],
    *,
    group: str,
    lab: str | None,
    engine: str = "quick",
    limit: int | None = None,
    allow_code: bool = False,
    controls_dir: Path,
    progress=None,
    tasks_dir: str | None = None,
    heldout: list[str] | tuple = (),
) -> dict[str, float]:
    """Score each model (``dtm.lineup``'s lists) on ``tasks`` and record the scores under
    ``group``; a model already scored on every task (same engine and limit) is skipped.
    Returns the seconds spent loading or merging and evaluating."""
    from dtm.evaluate import evaluate  # lazy: torch
    from dtm.evaluate.heldout import result_key  # lazy: torch

    have = scores(group=group)
    same_limit = have["lim"].isna() if limit is None else have["lim"] == limit
    have = have[(have["engine"] == engine) & same_limit]
    timings: dict[str, float] = {"load_and_merge": 0.0, "evaluate": 0.0}
    for i, m in enumerate(models):
        ref = replace(scaled(m, controls_dir), group=group)
        done = set(have.loc[have["model_key"] == ref.key, "task"])
        if progress:
            seed = f" s{m.seed}" if m.seed is not None else ""
            progress(f"scoring {m.label}{seed}", i / len(models))
        # a folder's task or a held-out file can change under the same name: scored anew
        fresh = not tasks_dir and not heldout
        if fresh and set(tasks) | {result_key(h) for h in heldout} <= done:
            continue
        t0 = time.perf_counter()
        model, tok = load_model(ref)
        t1 = time.perf_counter()
        res = evaluate(
            model,
            tok,
            tasks,
            engine=engine,
            lab=lab,
            tasks_dir=tasks_dir,
            heldout=list(heldout),
            limit=limit,
            allow_code=allow_code,
        )
        timings["load_and_merge"] += t1 - t0
        timings["evaluate"] += time.perf_counter() - t1
        record(ref, res, engine=engine, limit=limit)
        del model
    if progress:
        progress("scoring", 1.0)
    return timings


def scaled(ref: ModelRef, controls_dir: str | Path) -> ModelRef:
    """A control (a ``factor``) as the model it stands for: its adapter's delta scaled,
    written once under ``controls_dir``; any other model as it is."""
    if ref.factor is None:
        return ref
    # One folder per adapter and factor: runs of a group share folder names (every
    # seed's SFT is ``.../sft/adapter``), so the path's hash tells them apart.
    src = Path(ref.adapters[0])
    tag = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]
    out = Path(controls_dir) / f"{src.parent.name}-{tag}-x{ref.factor:.4g}"
    if not is_scaled(out):
        shrink_adapter(ref.adapters[0], ref.factor, out)
    return replace(ref, adapters=[str(out)], factor=None)
