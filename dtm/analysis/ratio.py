"""The loss-reduction ratio and the alignment-tax curve, from a run's metrics records.

- ``loss_ratio_curves(runs)``: ΔL_train / ΔL_val against step for each run (the pilot
  study saw it climb from about 1 to about 20 over SFT). ``runs`` maps a label to the
  run's ``metrics.jsonl`` records. Columns: ``run, step, fraction, loss_ratio,
  loss_ratio_interval``.
- ``ratio_windows(records)``: the same ratio, robustly: per window of steps, from
  least-squares falls of the train probe and the validation loss, with Fieller's interval,
  only where the validation loss moves more than its noise; ``windows_table(runs)``: every
  run's windows in one table.
- ``alignment_tax_curve(records)``: each lab benchmark against step (and fraction of the
  data seen) from the records a run scored with ``eval_every``. Columns: ``step,
  fraction, epoch, task, metric, value``.
- ``ratio_runs(jobs)``, ``scored_runs(jobs)``: the jobs whose records these are drawn from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dtm.cluster import NAMES as CLUSTERINGS
from dtm.store import read_metrics


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


def ratio_runs(jobs: list) -> dict[str, list[dict]]:
    """The records of each SFT or sub-model job that has some (a group run's own members'
    records only, not its ``member`` rows), by job name: ``loss_ratio_curves``'s input."""
    runs = {}
    for j in jobs:
        if j.kind in ("sft", "sub"):
            recs = [r for r in read_metrics(j.run_dir / "metrics.jsonl") if "member" not in r]
            if recs:
                runs[j.name] = recs
    return runs


def windows_table(runs: dict[str, list[dict]]) -> pd.DataFrame:
    """``ratio_windows`` of each run, with a ``run`` column (empty when no run has enough
    records for a window)."""
    parts = [ratio_windows(r).assign(run=name) for name, r in runs.items()]
    return pd.concat([p for p in parts if not p.empty] or [pd.DataFrame()])


def scored_runs(jobs: list) -> list:
    """The jobs that scored tasks while training (their records have ``bench``)."""
    return [
        j for j in jobs if any(r.get("bench") for r in read_metrics(j.run_dir / "metrics.jsonl"))
    ]


def dtm_groups(jobs: list) -> dict[str, str]:
    """Each sub-model job's name -> its DTM group's (``dtm k-means s0``: one clustering
    and one seed), for ``fold_subs``."""
    out = {}
    for j in jobs:
        if j.kind == "sub":
            how = CLUSTERINGS.get(j.clustering or "", j.clustering or "unrecorded")
            out[j.name] = f"dtm {how} s{j.config.get('seed', 0)}"
    return out


def fold_subs(frame: pd.DataFrame, groups: dict[str, str], by: str) -> pd.DataFrame:
    """A ratio table (``loss_ratio_curves``' or ``windows_table``'s) with each DTM group's
    sub-models folded into one run named by ``groups`` and their count: per ``by``
    (``step`` or ``window``) the mean of the group's ratios; a window's interval is the
    envelope of theirs (the lowest ``low``, the highest ``high``), it moves only where
    every sub-model's validation loss moves. Other runs (SFT) are kept as they are."""
    if frame.empty or "run" not in frame:
        return frame
    mine = frame["run"].map(groups)
    keep = frame[mine.isna()]
    parts = [keep]
    for name, part in frame[mine.notna()].groupby(mine[mine.notna()], sort=True):
        n = part["run"].nunique()
        agg = {c: "mean" for c in part.columns if c not in ("run", by)}
        agg.update({c: f for c, f in (("low", "min"), ("high", "max"), ("abs_low", "max"),
                                      ("val_moving", "all")) if c in part})  # fmt: skip
        for c in [
            c for c in agg if agg[c] == "mean" and not pd.api.types.is_numeric_dtype(part[c])
        ]:
            agg.pop(c)
        folded = part.groupby(by, as_index=False).agg(agg)
        parts.append(folded.assign(run=f"{name} (mean of {n} sub-models)"))
    return pd.concat(parts, ignore_index=True)
