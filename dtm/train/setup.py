"""A run's setup: the base loaded, its rows encoded (training, validation, probe), the
baseline's pieces (a reference, a penalty) and a fresh LoRA (or LoRAMoE) adapter, in the
order every run has always used, so that a seed gives the same numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtm import baselines
from dtm.errors import ConfigError, TrainingError
from dtm.models import load_base, resolve_targets
from dtm.train.config import TrainConfig
from dtm.train.memory import Choice, choose, model_shape, shape_from_config, this_machine
from dtm.train.rows import collate, encode_rows, split_rows


@dataclass
class Run:
    """What a run trains: the peft model and its tokenizer, the encoded rows (dicts of
    token lists, see ``dtm.train.rows``; ``train_rows`` includes replayed documents), the
    probe (a fixed sample of the training rows), the batch collator, the reference corpus
    and the baseline penalty ``penalty(model) -> scalar tensor`` (None: plain SFT)."""

    model: Any
    tok: Any
    train_rows: list[dict]
    val_rows: list[dict]
    probe_rows: list[dict]
    collate_fn: Callable
    reference: str | None
    penalty: Callable | None
    choice: Choice | None = None  # the dtype, attention and checkpointing it runs with


def setup(cfg: TrainConfig, progress, select_rows=None) -> Run:
    """Load the base, encode the rows and add the baseline's pieces, then wrap the model
    in a fresh LoRA adapter. The order is that of every run before (the EWC Fisher on the
    base model, then the LoRA init), so a seed gives the same numbers."""
    from peft import get_peft_model  # lazy: peft imports torch

    model, tok, choice = load_for_training([cfg])
    train_rows, val_rows, probe_rows = encode_run_rows(cfg, tok, model, select_rows)
    collate_fn = collate(tok.pad_token_id)
    reference = cfg.reference or baselines.default_reference(cfg.base)
    penalty = None
    if cfg.kind == "replay":
        docs = baselines.read_reference(reference, limit=len(train_rows), seed=cfg.seed)
        train_rows = train_rows + baselines.encode_documents(docs, tok, cfg.max_length)
    elif cfg.kind == "ewc":
        docs = baselines.read_reference(reference, limit=cfg.reference_size, seed=cfg.seed)
        docs = baselines.encode_documents(docs, tok, cfg.max_length)
        fisher = baselines.base_fisher(
            model, docs, resolve_targets(model, cfg.target_modules), collate_fn, progress
        )
        penalty = lambda m: cfg.ewc_weight / 2 * baselines.ewc_penalty(m, fisher)
    elif cfg.kind == "l2":
        penalty = lambda m: cfg.l2_weight / 2 * baselines.l2_penalty(m)
    if cfg.kind == "loramoe":
        from dtm import moe  # lazy: torch

        model = moe.inject(model, loramoe_config(cfg, model))
        penalty = moe.balance_loss
    else:
        model = get_peft_model(model, lora_config(cfg, model))
    if choice.checkpointing:
        enable_checkpointing(model)
    return Run(model, tok, train_rows, val_rows, probe_rows, collate_fn, reference, penalty, choice)


def load_for_training(cfgs: list[TrainConfig]) -> tuple[Any, Any, Choice]:
    """The base of ``cfgs`` (a run, or a group's members) loaded with the dtype and
    attention ``auto`` (or the flags) chose for this machine, its tokenizer and the
    choice; the estimate from the folder's ``config.json`` (else the loaded config)."""
    c = cfgs[0]
    machine = this_machine()
    shape = model_shape(c.base)
    choice = choose(cfgs, shape, machine)
    model, tok = load_base(
        c.base,
        trust_remote_code=c.trust_remote_code,
        allow_pickle=c.allow_pickle,
        dtype=choice.dtype,
        attn=choice.attn,
    )
    if shape is None:  # a hub id: its shape is known now
        choice = choose(cfgs, shape_from_config(model.config.to_dict()), machine)
    return model, tok, choice


def enable_checkpointing(model) -> None:
    """Gradient checkpointing on the (peft) model: each decoder layer recomputed in the
    backward pass. The inputs' gradients are switched on, as peft needs for a frozen
    base (else no gradient reaches the adapters inside a checkpointed layer)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its newer name in transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def encode_run_rows(
    cfg: TrainConfig, tok, model=None, select_rows=None
) -> tuple[list[dict], list[dict], list[dict]]:
    """A run's (training, validation, probe) rows, encoded: the split of ``split_rows``
    (for ``curate``, its selection, scored with the base ``model``), rows without a
    response token dropped, the probe a seeded sample of the training rows."""
    train_table, val_table = split_rows(cfg)
    if len(train_table) == 0:
        raise TrainingError(f"no training rows in {cfg.data} for this run.")
    if cfg.kind == "curate":  # the selected subset (the caller's selection: dtm.curate)
        train_table = select_rows(cfg, train_table, tok, model)
    train_rows = encode_rows(train_table, tok, cfg.max_length)
    val_rows = encode_rows(val_table, tok, cfg.max_length)
    if cfg.kind == "loramoe":
        _moe_types(cfg, train_table, train_rows)
        _moe_types(cfg, val_table, val_rows, check=False)
    train_rows = _with_response(train_rows, "training", cfg)
    val_rows = _with_response(val_rows, "validation", cfg)
    probe_idx = np.random.default_rng(cfg.seed).choice(
        len(train_rows), min(cfg.probe_size, len(train_rows)), replace=False
    )
    return train_rows, val_rows, [train_rows[i] for i in sorted(probe_idx)]


def lora_config(cfg: TrainConfig, model):
    """The peft ``LoraConfig`` of ``cfg`` on ``model`` (its targets resolved)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(resolve_targets(model, cfg.target_modules)),
        task_type="CAUSAL_LM",
    )


def loramoe_config(cfg: TrainConfig, model):
    """The ``dtm.moe.LoRAMoEConfig`` of ``cfg`` on ``model``: every linear layer whose name
    ends in one of the resolved targets."""
    from torch import nn

    from dtm.moe import LoRAMoEConfig  # lazy: torch

    targets = resolve_targets(model, cfg.target_modules)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets
    ]
    if not names:
        raise TrainingError(
            f"loramoe: no linear layer named {', '.join(targets)} in {cfg.base} to adapt."
        )
    return LoRAMoEConfig(
        experts=cfg.experts,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=names,
        groups=cfg.experts // 2 if cfg.moe_groups is None else cfg.moe_groups,
        delta=cfg.moe_delta,
        balance=cfg.moe_balance,
        base_model=cfg.base,
    )


def _moe_types(cfg: TrainConfig, table, rows: list[dict], check: bool = True) -> None:
    """Each row's LoRAMoE type, in place: ``moe_type`` 1 for the world-knowledge sources,
    else 0; ``check``: at least one row is of those sources."""
    sources = {x.strip() for x in (cfg.moe_knowledge_sources or "").split(",") if x.strip()}
    if check and sources and not sources & set(table["source"]):
        have = ", ".join(sorted(set(table["source"]) - {""})) or "none"
        raise ConfigError(
            f"--moe-knowledge-sources {cfg.moe_knowledge_sources}: no row of {cfg.data} has "
            f"such a source (its sources: {have})."
        )
    for r, src in zip(rows, table["source"], strict=True):
        r["moe_type"] = int(src in sources)


def _with_response(rows: list[dict], what: str, cfg: TrainConfig) -> list[dict]:
    """The rows that keep at least one response token within ``max_length`` (a row whose
    prompt fills it has no loss to learn from, and a batch of them would make the loss
    0/0); the others are dropped with a note on stderr."""
    import sys

    kept = [r for r in rows if any(x != -100 for x in r["labels"])]
    if rows and not kept:
        raise TrainingError(
            f"no {what} row keeps a response token within --max-length {cfg.max_length} "
            "(every prompt fills it): raise --max-length."
        )
    if len(kept) < len(rows):
        print(
            f"note: {len(rows) - len(kept)} of {len(rows)} {what} rows dropped: their prompt "
            f"fills --max-length {cfg.max_length}, leaving no response token.",
            file=sys.stderr,
        )
    return kept
