"""The paper's analyses, as tables: the loss-reduction ratio, the alignment-tax curve, and
token-level bias.

- ``loss_ratio_curves(runs)``: ΔL_train / ΔL_val against step for each run (the pilot
  study saw it climb from about 1 to about 20 over SFT). ``runs`` maps a label to the
  run's ``metrics.jsonl`` records. Columns: ``run, step, fraction, loss_ratio,
  loss_ratio_interval``.
- ``ratio_windows(records)``: the same ratio, robustly: per window of steps, from
  least-squares falls of the train probe and the validation loss, with Fieller's interval,
  only where the validation loss moves more than its noise.
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

import numpy as np
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


def ratio_windows(records: list[dict], windows: int = 4, level: float = 0.95) -> pd.DataFrame:
    """The loss-reduction ratio ΔL_train / ΔL_val per window of a run, robustly.

    ``records``: a run's ``metrics.jsonl`` records; the train side is the fixed train
    probe (``probe_loss``, eval mode, the same rows at every record), never the running
    training loss. The records are cut into ``windows`` spans of equal steps (neighbours
    share their boundary record). In each span both losses are fitted by least squares
    with a quadratic in the step (a loss curve bends), and ΔL is the fitted fall from the
    span's first step to its last. The residuals give each fall's standard error and the
    covariance of the two (they are measured at the same weights), and the interval is
    Fieller's for a ratio of two correlated estimates, with t on n - 3 degrees of freedom.
    ``val_moving`` says whether ΔL_val is above its noise (``|ΔL_val| > t · se``); where
    it is not, ``ratio``, ``low`` and ``high`` are None: the interval is unbounded. Then,
    when the train probe's fall is above its noise, Fieller's set is two rays, and
    ``abs_low`` is the bound they leave: with 95% confidence the train probe falls at
    least ``abs_low`` times as much as the validation loss moves, either way (the late
    windows of a memorising run, whose validation loss has stopped). Where the
    validation loss moves, ``abs_low`` is the interval's bound nearer 0 (0 when the
    interval holds 0).

    Columns: ``window, start, end, records, d_train, d_val, se_train, se_val,
    val_moving, ratio, low, high, abs_low``."""
    from scipy import stats

    cols = [
        "window", "start", "end", "records", "d_train", "d_val", "se_train", "se_val",
        "val_moving", "ratio", "low", "high", "abs_low",
    ]  # fmt: skip
    if windows < 1:
        raise ValueError(f"windows must be at least 1 (got {windows}).")
    recs = sorted(
        (r for r in records if r.get("probe_loss") is not None and r.get("val_loss") is not None),
        key=lambda r: r["step"],
    )
    if len(recs) < 4:
        return pd.DataFrame(columns=cols)
    first, last = recs[0]["step"], recs[-1]["step"]
    edges = [first + (last - first) * i / windows for i in range(windows + 1)]
    rows = []
    for w in range(windows):
        span = [r for r in recs if edges[w] - 1e-9 <= r["step"] <= edges[w + 1] + 1e-9]
        row = dict.fromkeys(cols)
        row.update(window=w, records=len(span), val_moving=False)
        row["start"] = span[0]["step"] if span else edges[w]
        row["end"] = span[-1]["step"] if span else edges[w + 1]
        if len(span) >= 4:
            row.update(_window_ratio(span, level, stats))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _window_ratio(span: list[dict], level: float, stats) -> dict:
    """``ratio_windows``'s numbers for one span of at least 4 records."""
    x = np.array([r["step"] for r in span], dtype=float)
    x = (x - x[0]) / (x[-1] - x[0])  # 0 .. 1 over the span
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    y = np.array([[r["probe_loss"], r["val_loss"]] for r in span], dtype=float)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    dof = len(span) - 3
    noise = resid.T @ resid / dof  # 2x2: probe, val (co)variances of one record's loss
    contrast = design[0] - design[-1]  # fitted value at the start minus at the end
    g = float(contrast @ np.linalg.pinv(design.T @ design) @ contrast)
    (a, b), cov = contrast @ beta, noise * g
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    out = {
        "d_train": float(a),
        "d_val": float(b),
        "se_train": float(cov[0, 0]) ** 0.5,
        "se_val": float(cov[1, 1]) ** 0.5,
    }
    out["val_moving"] = bool(b * b > t * t * cov[1, 1])
    # Fieller: (a - r b)^2 <= t^2 (v_aa - 2 r v_ab + r^2 v_bb), a quadratic in r.
    qa = b * b - t * t * cov[1, 1]
    qb = -2 * (a * b - t * t * cov[0, 1])
    qc = a * a - t * t * cov[0, 0]
    disc = qb * qb - 4 * qa * qc
    if out["val_moving"]:
        root = max(disc, 0.0) ** 0.5
        out["ratio"] = float(a / b)
        low, high = sorted(((-qb - root) / (2 * qa), (-qb + root) / (2 * qa)))
        out["low"], out["high"] = low, high
        out["abs_low"] = 0.0 if low <= 0 <= high else min(abs(low), abs(high))
    elif qc > 0 and disc > 0:  # the train fall is significant: two rays around 0
        root = disc**0.5
        r1, r2 = sorted(((-qb - root) / (2 * qa), (-qb + root) / (2 * qa)))
        out["abs_low"] = min(abs(r1), abs(r2))
    return out


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


def code_token_drops(early, late, tokenizer, encoded: list[dict], marker: str = "ref") -> dict:
    """How much of the loss fall from ``early`` to ``late`` on ``encoded`` rows is on their
    row-specific codes: the tokens after ``marker`` up to the next ``.`` (the lab's
    ``ref <code> .``). ``{"tokens", "code_tokens", "drop", "code_drop", "code_share",
    "code_token_share"}``: ``drop`` is the summed loss fall over every response token,
    ``code_share`` the part of it on code tokens, ``code_token_share`` their share of the
    tokens (what the fall would be were it spread evenly)."""
    ref = tokenizer.convert_tokens_to_ids(marker)
    stop = tokenizer.convert_tokens_to_ids(".")
    a, b = token_losses(early, encoded), token_losses(late, encoded)
    drop = code_drop = 0.0
    codes = 0
    in_code = False
    for (tid, le), (_, ll) in zip(a, b, strict=True):
        is_code = in_code and tid != stop
        in_code = tid == ref or is_code
        drop += le - ll
        if is_code:
            code_drop += le - ll
            codes += 1
    n = len(a)
    return {
        "tokens": n,
        "code_tokens": codes,
        "drop": drop,
        "code_drop": code_drop,
        "code_share": code_drop / drop if drop else None,
        "code_token_share": codes / n if n else None,
    }


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
