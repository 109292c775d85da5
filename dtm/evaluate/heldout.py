"""Held-out loss: a live score for any model, with no benchmark.

- ``heldout_loss(model, tokenizer, source)`` -> ``{"loss": L, "tokens": N, "rows": R}``:
  the mean token loss over N tokens.
  - Instruction data (any shape ``dtm.data`` reads): the response-token loss, prompts
    formatted as training formats them (``dtm.train.rows.encode_rows``).
  - A ``.txt`` file, one document per line (pretraining-like text, e.g. the lab's
    ``data/corpus.txt``): the loss on every token but the first of each line, the
    knowledge-retention proxy.
- ``run_heldout_rows(run_dir)`` -> the validation rows of a training run (a sub-model's
  are held-out rows of its own cluster), as the run split them.
- ``result_key(path)`` -> ``heldout:<file stem>``, the key ``dtm eval`` reports under.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from dtm.data import load_instructions
from dtm.errors import ConfigError
from dtm.train.config import TrainConfig, read_config
from dtm.train.rows import collate, encode_rows, split_rows

MAX_LENGTH = 512


def result_key(path: str | Path) -> str:
    return f"heldout:{Path(path).stem}"


def _text_rows(path: Path, tokenizer, max_length: int, limit: int | None) -> list[dict]:
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--heldout {path}: cannot read it as text ({e}).") from None
    if limit:
        lines = lines[:limit]
    if not lines:
        raise ConfigError(f"--heldout {path}: no text lines in it.")
    rows = []
    for line in lines:
        ids = tokenizer(line)["input_ids"][:max_length]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def encode_source(
    source: str | Path | pd.DataFrame,
    tokenizer,
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
) -> list[dict]:
    """Token ids and labels of a held-out source (a file, or a data table)."""
    if isinstance(source, pd.DataFrame):
        table = source
    else:
        path = Path(source)
        if path.suffix == ".txt":
            return _text_rows(path, tokenizer, max_length, limit)
        if not path.exists():
            raise ConfigError(f"--heldout {path}: no such file.")
        table = load_instructions(str(path), count_tokens=False).table
        if table.empty:
            raise ConfigError(f"--heldout {path}: no usable rows in it.")
    if limit:
        table = table.head(limit)
    return encode_rows(table, tokenizer, max_length)


def row_batches(rows: list[dict], pad_id: int, batch_size: int = 16):
    """``rows`` collated into batches, longest first (the order ``rows_loss`` scores in)."""
    fn = collate(pad_id)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    return [
        fn([rows[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)
    ]


def batch_nll(model, batch: dict) -> tuple[torch.Tensor, int]:
    """``(summed token loss, labelled tokens)`` of one batch; the sum carries a gradient
    when the caller computes one (``dtm.merge.learn``)."""
    dev = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)
    ).logits.float()
    labels = batch["labels"][:, 1:].to(dev)
    lp = torch.log_softmax(logits[:, :-1], -1)
    keep = labels != -100
    nll = -lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll[keep].sum(), int(keep.sum())


@torch.inference_mode()
def rows_loss(model, rows: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """The mean loss over every labelled token of ``rows``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for b in row_batches(rows, pad_id, batch_size):
            nll, n = batch_nll(model, b)
            total += float(nll)
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("held-out rows: no response tokens to score (every row truncated?).")
    return {"loss": total / tokens, "tokens": tokens, "rows": len(rows)}


def heldout_loss(
    model,
    tokenizer,
    source,
    *,
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict:
    rows = encode_source(source, tokenizer, max_length, limit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return rows_loss(model, rows, pad, batch_size)


def run_heldout_rows(run_dir: str | Path) -> pd.DataFrame:
    """A training run's validation rows, split again from its ``config.json``."""
    path = Path(run_dir) / "config.json"
    known = {f.name for f in fields(TrainConfig)}
    try:  # a run's config.json also holds what the run resolved (steps, run id, ...)
        saved = json.loads(path.read_text())
        cfg = read_config({k: v for k, v in saved.items() if k in known})
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a training run's config ({e}).") from None
    return split_rows(cfg)[1]
