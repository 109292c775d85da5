"""Training rows: the data table -> token ids with the prompt masked, batches, and the
train/validation split of a run.

- ``encode_rows(table, tokenizer, max_length)`` -> ``[{"input_ids", "labels"}]``: the loss
  is on response tokens only (prompt tokens get label -100, as in the paper's code).
  Prompts use the model's chat template when it has one, else an Alpaca template.
- ``collate(pad_id)`` -> a collate function padding a list of rows to
  ``{"input_ids", "labels", "attention_mask"}`` (batch, width) long tensors (and a
  LoRAMoE run's ``moe_type`` per row).
- ``split_rows(cfg)`` -> (train table, validation table) for a run: a ``sub`` run's rows
  are its cluster's; validation is ``val_data`` or a seeded ``val_fraction`` split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dtm.data import load_instructions
from dtm.embed import prompt_text
from dtm.errors import ConfigError
from dtm.train.config import KINDS, TrainConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Response:\n"
)


def encode_rows(table: pd.DataFrame, tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels (prompt masked to -100) for each row of the data table."""

    prompts = prompt_text(table).tolist()
    out = []
    for prompt, response, system in zip(prompts, table["response"], table["system"], strict=True):
        if tokenizer.chat_template:
            msgs = [{"role": "system", "content": system}] if system else []
            msgs.append({"role": "user", "content": prompt})
            p_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            full = tokenizer.apply_chat_template(
                msgs + [{"role": "assistant", "content": response}], tokenize=True
            )
            if hasattr(p_ids, "input_ids"):
                p_ids, full = p_ids["input_ids"], full["input_ids"]
            if full[: len(p_ids)] != p_ids:  # template re-tokenises the prompt: fall back
                p_ids = full[: len(p_ids)]
        else:
            text = ALPACA_PROMPT.format(instruction=prompt)
            p_ids = tokenizer(text)["input_ids"]
            full = (
                p_ids
                + tokenizer(response, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]
            )
        full = list(full)[:max_length]
        labels = [-100] * min(len(p_ids), len(full)) + full[len(p_ids) :]
        out.append({"input_ids": full, "labels": labels})
    return out


def collate(pad_id: int):
    import torch

    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n] = torch.tensor(b["input_ids"])
            labels[r, :n] = torch.tensor(b["labels"])
            mask[r, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "moe_type" in batch[0]:  # a LoRAMoE run's row types (dtm.moe)
            out["moe_type"] = torch.tensor([b["moe_type"] for b in batch], dtype=torch.long)
        return out

    return fn


def split_rows(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = load_instructions(cfg.data, count_tokens=False).table
    if KINDS[cfg.kind].data == "cluster":
        asg, clusters = read_assignment(cfg, table)
        k = int(clusters.max()) + 1
        if not 0 <= cfg.cluster < k:
            raise ConfigError(
                f"cluster {cfg.cluster} is out of range: the assignment has clusters 0..{k - 1}."
            )
        keep = set(asg.loc[clusters == cfg.cluster, "id"])
        table = table[table["id"].isin(keep)].reset_index(drop=True)
    if cfg.val_data:
        return table, load_instructions(cfg.val_data, count_tokens=False).table
    rng = np.random.default_rng(cfg.seed)
    val_idx = rng.choice(len(table), max(1, int(len(table) * cfg.val_fraction)), replace=False)
    is_val = np.zeros(len(table), bool)
    is_val[val_idx] = True
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


def read_assignment(cfg: TrainConfig, table: pd.DataFrame | None = None):
    """``(assignments table, its cluster column as numbers)`` of ``cfg.assignments``,
    checked (against the ids of ``table``, the data, when given)."""
    try:
        asg = pd.read_csv(cfg.assignments, dtype={"id": str})
    except (OSError, ValueError) as e:
        raise ConfigError(f"--assignments {cfg.assignments}: cannot read it ({e}).") from e
    if not {"id", "cluster"} <= set(asg.columns):
        raise ConfigError(
            f"{cfg.assignments}: needs the columns id and cluster "
            "(the assignments.csv of `dtm disperse`)."
        )
    if asg.empty:
        raise ConfigError(f"{cfg.assignments}: no rows under its header.")
    if table is not None and not set(table["id"]) >= set(asg["id"]):
        raise ConfigError(
            f"{cfg.assignments}: its ids are not rows of {cfg.data} "
            "(an assignment of another dataset?)."
        )
    clusters = pd.to_numeric(asg["cluster"], errors="coerce")
    bad = asg.index[clusters.isna() | (clusters % 1 != 0) | (clusters < 0)]
    if len(bad):
        raise ConfigError(
            f"{cfg.assignments}: line {int(bad[0]) + 2}: cluster "
            f"{asg['cluster'].iloc[bad[0]]!r} is not a cluster number (0, 1, ...)."
        )
    return asg, clusters


def assignment_clusters(cfg: TrainConfig) -> int:
    """How many clusters ``cfg.assignments`` has (its largest cluster number + 1)."""
    return int(read_assignment(cfg)[1].max()) + 1
