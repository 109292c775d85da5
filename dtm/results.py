"""Scores in the registry: which model (base + adapters + merge recipe), which task and
metric, the value, its standard error, the item count, the seed and when.

``ModelRef`` names a model exactly; ``load_model(ref)`` rebuilds it (a merge is redone
in memory, exactly); ``record(ref, results, ...)`` stores a ``{task: {metric: value}}``
dict; ``scores(...)`` reads them back as a table with columns ``model_key, label, grp,
task, metric, value, stderr, n, seed, engine, lim, created``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from dtm.errors import ConfigError
from dtm.store import Registry, canonical_json, input_key


@dataclass
class ModelRef:
    """A model as the dashboard makes it: ``base`` plus LoRA ``adapters``; with several
    adapters, ``recipe`` (``{"method", "weights", "params"}``) says how they are merged.
    ``label`` (e.g. ``dtm-kmeans``), ``group`` and ``seed`` say where it belongs."""

    base: str
    adapters: list[str] = field(default_factory=list)
    recipe: dict | None = None
    label: str = ""
    group: str | None = None
    seed: int | None = None

    @property
    def key(self) -> str:
        what = {"base": self.base, "adapters": self.adapters, "recipe": self.recipe}
        return input_key("model", what)

    def describe(self) -> str:
        if not self.adapters:
            return f"{self.base} (base)"
        if len(self.adapters) == 1 and not self.recipe:
            return f"{self.base} + {self.adapters[0]}"
        r = self.recipe or {}
        return f"{self.base} + {r.get('method', 'average')} of {len(self.adapters)} adapters"


def load_model(ref: ModelRef, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for ``ref``; ``allow_pickle`` lets a base model with only pickle
    weights load (see ``dtm.train.load_base``)."""
    from dtm.train import load_base

    if len(ref.adapters) > 1 or ref.recipe:
        from dtm.merge.engine import Merger

        merger = Merger(
            ref.base,
            ref.adapters,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        r = ref.recipe or {"method": "average"}
        weights = r.get("weights") or [1.0 / len(ref.adapters)] * len(ref.adapters)
        return merger.apply(r.get("method", "average"), weights, **r.get("params", {})), (
            merger.tokenizer
        )
    lora = None
    if ref.adapters:
        from dtm.merge.lora import CONFIG, WEIGHTS, read_adapter

        a = Path(ref.adapters[0])
        if not (a / CONFIG).exists():
            raise ConfigError(f"{a}: not a peft adapter folder (no {CONFIG}).")
        try:
            is_lora = json.loads((a / CONFIG).read_text()).get("peft_type") == "LORA"
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{a / CONFIG}: not a readable adapter config ({e}).") from None
        if is_lora and (a / WEIGHTS).exists():
            lora = read_adapter(a)  # checked before the base model loads
    model, tok = load_base(ref.base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if ref.adapters:
        from peft import PeftModel

        from dtm.merge.lora import check_fits_base

        if lora is not None:
            check_fits_base(lora, model, ref.base)
        try:
            model = PeftModel.from_pretrained(model, str(a))
        except RuntimeError as e:  # e.g. a size mismatch: an adapter of another base
            raise ConfigError(
                f"{a}: cannot be applied to the base model {ref.base}: {str(e)[:300]}"
            ) from e
    return model, tok


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
    model = canonical_json(asdict(ref))
    rows = []
    for task, metrics in results.items():
        n = metrics.get("n")
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr")
            rows.append(
                (
                    ref.key,
                    model,
                    ref.label,
                    ref.group,
                    task,
                    metric,
                    float(value),
                    None if se is None else float(se),
                    None if n is None else int(n),
                    ref.seed,
                    engine,
                    limit,
                    now,
                )
            )
    with reg.transaction() as con:
        con.executemany(
            "INSERT INTO results (model_key, model, label, grp, task, metric, value, stderr, "
            "n, seed, engine, lim, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return len(rows)


def scores(
    *, group: str | None = None, registry: Registry | None = None, latest: bool = True
) -> pd.DataFrame:
    """Stored scores (of one group); with ``latest``, only the newest value of each
    (model, task, metric, engine, limit), and within a group of each (label, seed, ...):
    a label and seed name one model of a group, whichever files it was rebuilt from."""
    reg = registry or Registry()
    sql = (
        "SELECT model_key, model, label, grp, task, metric, value, stderr, n, seed, engine, "
        "lim, created FROM results"
    )
    args: tuple = ()
    if group is not None:
        sql += " WHERE grp = ?"
        args = (group,)
    with reg._connect() as con:
        df = pd.read_sql_query(sql + " ORDER BY created", con, params=args)
    if latest and len(df):
        df = df.drop_duplicates(["model_key", "task", "metric", "engine", "lim"], keep="last")
        named = df["label"].fillna("") != ""
        same = ["grp", "label", "seed", "task", "metric", "engine", "lim"]
        df = pd.concat([df[~named], df[named].drop_duplicates(same, keep="last")])
        df = df.sort_values("created", kind="stable")
    return df.reset_index(drop=True)


def groups(registry: Registry | None = None) -> list[str]:
    """The groups that have scores, newest first."""
    reg = registry or Registry()
    with reg._connect() as con:
        rows = con.execute(
            "SELECT grp, MAX(created) AS t FROM results WHERE grp IS NOT NULL GROUP BY grp "
            "ORDER BY t DESC"
        ).fetchall()
    return [r[0] for r in rows]


def ref_of(row: pd.Series) -> ModelRef:
    return ModelRef(**json.loads(row["model"]))
