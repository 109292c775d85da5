"""The paper's analyses, as tables: the loss-reduction ratio, the alignment-tax curve, and
token-level bias.

- ``loss_ratio_curves(runs)``: ΔL_train / ΔL_val against step for each run (the pilot
  study saw it climb from about 1 to about 20 over SFT). ``runs`` maps a label to the
  run's ``metrics.jsonl`` records. Columns: ``run, step, fraction, loss_ratio,
  loss_ratio_interval``.
- ``alignment_tax_curve(records)``: each lab benchmark against step (and fraction of the
  data seen) from the records a run scored with ``eval_every``. Columns: ``step,
  fraction, epoch, task, metric, value``.
- ``summarise(scores)``, ``with_deltas``, ``wide``, ``model_order``: the Compare page's
  benchmark tables (mean and std over seeds, deltas against SFT); ``paper_reference()``:
  the paper's reported numbers (percent, ``source = "reported"``), a separate set.
- ``token_level_bias(early, late, tokenizer, train_rows, val_rows)``: per token, how much
  its loss fell between an early and a late model on training text and on validation
  text (the paper's figure 5): tokens whose loss falls on training text but not on
  held-out text are what the model fitted to this data set alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch


def loss_ratio_curves(runs: dict[str, list[dict]]) -> pd.DataFrame:
    rows = []
    for label, recs in runs.items():
        last = max((r["step"] for r in recs), default=0) or 1
        for r in recs:
            rows.append(
                {
                    "run": label,
                    "step": r["step"],
                    "fraction": r["step"] / last,
                    "loss_ratio": r.get("loss_ratio"),
                    "loss_ratio_interval": r.get("loss_ratio_interval"),
                }
            )
    return pd.DataFrame(
        rows, columns=["run", "step", "fraction", "loss_ratio", "loss_ratio_interval"]
    )


def alignment_tax_curve(records: list[dict], metrics: list[tuple[str, str]] | None = None):
    """``metrics``: (task, metric) pairs; default every task's ``acc``."""
    scored = [r for r in records if r.get("bench")]
    last = max((r["step"] for r in records), default=0) or 1
    rows = []
    for r in scored:
        for task, ms in r["bench"].items():
            for metric, value in ms.items():
                if metrics is None and metric != "acc":
                    continue
                if metrics is not None and (task, metric) not in metrics:
                    continue
                rows.append(
                    {
                        "step": r["step"],
                        "fraction": r["step"] / last,
                        "epoch": r.get("epoch"),
                        "task": task,
                        "metric": metric,
                        "value": value,
                    }
                )
    return pd.DataFrame(rows, columns=["step", "fraction", "epoch", "task", "metric", "value"])


@torch.inference_mode()
def token_losses(model, encoded: list[dict], batch_size: int = 32) -> list[tuple[int, float]]:
    """(token id, loss) of every response token of ``encoded`` (``encode_rows`` rows:
    ``input_ids`` and ``labels`` with the prompt masked to -100)."""
    from dtm.train.rows import collate

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out: list[tuple[int, float]] = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(0)(encoded[start : start + batch_size])  # pads are masked
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            target = labels[:, 1:].to(dev)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), target.clamp_min(0), reduction="none"
            )
            keep = target != -100
            out += list(zip(target[keep].tolist(), nll[keep].tolist(), strict=True))
    finally:
        model.train(was)
    return out


def token_level_bias(
    early,
    late,
    tokenizer,
    train_encoded: list[dict],
    val_encoded: list[dict],
    *,
    min_count: int = 5,
) -> pd.DataFrame:
    """One row per token seen at least ``min_count`` times in both splits: ``token,
    train_drop, val_drop, gap`` (train_drop - val_drop), ``train_count, val_count``,
    mean losses ``train_early, train_late, val_early, val_late``; sorted by ``gap``,
    largest first. A drop is early loss minus late loss (positive: the late model
    predicts the token better)."""
    stats: dict[str, dict] = {}
    for split, enc in (("train", train_encoded), ("val", val_encoded)):
        a, b = token_losses(early, enc), token_losses(late, enc)
        acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for (tid, le), (_, ll) in zip(a, b, strict=True):
            s = acc[tid]
            s[0] += le
            s[1] += ll
            s[2] += 1
        stats[split] = acc
    rows = []
    for tid in set(stats["train"]) & set(stats["val"]):
        t, v = stats["train"][tid], stats["val"][tid]
        if t[2] < min_count or v[2] < min_count:
            continue
        row = {
            "token": tokenizer.decode([tid]).strip() or repr(tokenizer.decode([tid])),
            "train_early": t[0] / t[2],
            "train_late": t[1] / t[2],
            "val_early": v[0] / v[2],
            "val_late": v[1] / v[2],
            "train_count": t[2],
            "val_count": v[2],
        }
        row["train_drop"] = row["train_early"] - row["train_late"]
        row["val_drop"] = row["val_early"] - row["val_late"]
        row["gap"] = row["train_drop"] - row["val_drop"]
        rows.append(row)
    cols = [
        "token",
        "train_drop",
        "val_drop",
        "gap",
        "train_count",
        "val_count",
        "train_early",
        "train_late",
        "val_early",
        "val_late",
    ]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values("gap", ascending=False).reset_index(drop=True)


def encode_split(path: str, tokenizer, max_length: int = 128, n: int = 256, seed: int = 0):
    """The first ``n`` rows (seeded sample) of an instruction data file, encoded."""
    from dtm.data import load_instructions
    from dtm.train.rows import encode_rows

    table = load_instructions(path, count_tokens=False).table
    if len(table) > n:
        table = table.sample(n=n, random_state=seed)
    return encode_rows(table, tokenizer, max_length)


REFERENCE = Path(__file__).parent / "reference" / "paper_table1.csv"


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
    from dtm.score import KINDS

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
