"""The paper's analyses, as tables: the loss-reduction ratio, the alignment-tax curve, and
token-level bias.

- ``loss_ratio_curves(runs)``: ΔL_train / ΔL_val against step for each run (the pilot
  study saw it climb from about 1 to about 20 over SFT). ``runs`` maps a label to the
  run's ``metrics.jsonl`` records. Columns: ``run, step, fraction, loss_ratio,
  loss_ratio_interval``.
- ``alignment_tax_curve(records)``: each lab benchmark against step (and fraction of the
  data seen) from the records a run scored with ``eval_every``. Columns: ``step,
  fraction, epoch, task, metric, value``.
- ``token_level_bias(early, late, tokenizer, train_rows, val_rows)``: per token, how much
  its loss fell between an early and a late model on training text and on validation
  text (the paper's figure 5): tokens whose loss falls on training text but not on
  held-out text are what the model fitted to this data set alone.
"""

from __future__ import annotations

from collections import defaultdict

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
    from dtm.train import collate

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
    from dtm.train import encode_rows

    table = load_instructions(path, count_tokens=False).table
    if len(table) > n:
        table = table.sample(n=n, random_state=seed)
    return encode_rows(table, tokenizer, max_length)
