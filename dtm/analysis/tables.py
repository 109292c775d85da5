"""The Compare page's benchmark tables: mean and std over seeds, deltas against a model,
the display table, the order of models, the headline measures, and the paper's reported
numbers (percent, ``source = "reported"``), a separate set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dtm.score import KINDS
from dtm.tasks import columns

# The lab probe's bias measures (its ``chat_acc`` is a headline of its own).
BIAS = [(t, m) for t, m, _ in columns() if t == "lab_bias" and m != "chat_acc"]


REFERENCE = Path(__file__).parents[1] / "reference" / "paper_table1.csv"


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, task, metric) of the registry's scores: ``kind, mean, std,
    seeds, stderr`` (std over seeds, sample std; NaN with one seed)."""
    cols = ["label", "kind", "task", "metric", "mean", "std", "seeds", "stderr"]
    if scores.empty:
        return pd.DataFrame(columns=cols)
    if "kind" not in scores:
        scores = scores.assign(kind=None)
    g = scores.groupby(["label", "task", "metric"], sort=False)
    out = g.agg(
        kind=("kind", "first"),
        mean=("value", "mean"),
        std=("value", lambda v: v.std(ddof=1) if len(v) > 1 else float("nan")),
        seeds=("value", "size"),
        stderr=("stderr", "mean"),
    ).reset_index()
    return out[cols]


def with_deltas(summary: pd.DataFrame, against: str = "sft") -> pd.DataFrame:
    ref = summary[summary["label"] == against].set_index(["task", "metric"])["mean"]
    out = summary.copy()
    keys = list(zip(out["task"], out["metric"], strict=True))
    out["delta"] = [m - ref.get(k, float("nan")) for m, k in zip(out["mean"], keys, strict=True)]
    return out


def wide(summary: pd.DataFrame, measures: list[tuple[str, str]], labels: list[str]):
    """A display table: one row per label, a ``task.metric`` column per measure, cells
    ``mean ± std`` (or the mean alone with one seed)."""
    rows = []
    for label in labels:
        row = {"model": label}
        for task, metric in measures:
            hit = summary[
                (summary["label"] == label)
                & (summary["task"] == task)
                & (summary["metric"] == metric)
            ]
            if hit.empty:
                row[f"{task}.{metric}"] = ""
                continue
            m, s = hit["mean"].iloc[0], hit["std"].iloc[0]
            row[f"{task}.{metric}"] = f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def model_order(table: pd.DataFrame) -> list[str]:
    """The labels of a scores or summary table (``label``, ``kind``) in the order tables
    show them: by kind as ``dtm.score.KINDS`` lists them (base, SFT, the shrinkage control,
    DTM, baselines, sub-models), then by label; rows of unknown kind come last."""
    rank = {k: i for i, k in enumerate(KINDS)}
    kinds = table["kind"] if "kind" in table else pd.Series([None] * len(table))
    first: dict[str, int] = {}
    for label, kind in zip(table["label"], kinds, strict=True):
        if isinstance(label, str) and label:
            first.setdefault(label, rank.get(kind, len(KINDS)))
    return sorted(first, key=lambda label: (first[label], label))


def paper_reference(tasks: list[str] | None = None) -> pd.DataFrame:
    """The paper's reported cells (percent) for ``tasks``: ``label, task, value, table,
    source``."""
    ref = pd.read_csv(REFERENCE).rename(columns={"model": "label"})
    ref["source"] = "reported"
    if tasks is not None:
        ref = ref[ref["task"].isin(tasks)]
    return ref.reset_index(drop=True)


def headline_measures(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """One ``(task, metric)`` per task of a summary (its ``acc``, else a held-out
    ``loss``, else a rolling task's ``bits_per_byte``), the lab probe's ``chat_acc`` last."""
    have = set(zip(summary["task"], summary["metric"], strict=True))
    tasks = [t for t in dict.fromkeys(summary["task"]) if t != "lab_bias"]
    headline = {
        t: next((m for m in ("acc", "loss", "bits_per_byte") if (t, m) in have), None)
        for t in tasks
    }
    return [(t, m) for t, m in headline.items() if m] + [
        (t, m) for t, m in [("lab_bias", "chat_acc")] if (summary["task"] == t).any()
    ]


def bias_measures(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The lab probe's bias measures (``BIAS``) a summary has."""
    return [m for m in BIAS if ((summary["task"] == m[0]) & (summary["metric"] == m[1])).any()]


def delta_table(deltas: pd.DataFrame, labels: list[str], measures: list[tuple[str, str]]):
    """``with_deltas`` rows as a display table: one row per label of ``labels`` (in that
    order), one column per task of ``measures``, the delta rounded to 4 digits."""
    d = deltas[
        deltas["label"].isin(labels)
        & deltas.apply(lambda r: (r["task"], r["metric"]) in measures, axis=1)
    ]
    return (
        d.pivot_table(index="label", columns="task", values="delta")
        .reindex([x for x in labels if x in set(d["label"])])
        .round(4)
    )
