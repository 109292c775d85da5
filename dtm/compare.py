"""Tables for comparing SFT with DTM: scores over seeds, deltas against SFT, and the
paper's reported numbers as a separate reference set.

``summarise(scores)`` takes the registry's scores (``dtm.results.scores``) and gives one
row per (label, task, metric): ``mean, std, seeds`` (std over seeds, sample std; NaN with
one seed). ``with_deltas(summary, against="sft")`` adds ``delta`` (mean minus the SFT
mean of the same measure). ``paper_reference()`` reads ``reference/paper_table1.csv``
(scores in percent, as the paper reports them; ``source = "reported"``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REFERENCE = Path(__file__).parent / "reference" / "paper_table1.csv"


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    cols = ["label", "task", "metric", "mean", "std", "seeds", "stderr"]
    if scores.empty:
        return pd.DataFrame(columns=cols)
    g = scores.groupby(["label", "task", "metric"], sort=False)
    out = g.agg(
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


def model_order(labels) -> list[str]:
    """base, SFT, the shrinkage control, DTM, baselines, then sub-models."""

    def key(label: str) -> tuple:
        if label == "base":
            return (0, label)
        if label == "sft" or label.startswith("sft "):
            return (1 if "×" not in label else 2, label)
        if label.startswith("dtm"):
            return (3, label)
        if label.startswith("sub") or " sub " in label:
            return (5, label)
        return (4, label)

    return sorted(set(labels), key=key)


def paper_reference(tasks: list[str] | None = None) -> pd.DataFrame:
    """The paper's reported cells (percent) for ``tasks``: ``label, task, value, table,
    source``."""
    ref = pd.read_csv(REFERENCE).rename(columns={"model": "label"})
    ref["source"] = "reported"
    if tasks is not None:
        ref = ref[ref["task"].isin(tasks)]
    return ref.reset_index(drop=True)
