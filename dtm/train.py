"""LoRA supervised fine-tuning of a ``transformers`` causal LM, on the ``transformers``
Trainer with a peft adapter: the core of vanilla SFT (``kind="sft"``, all data) and of a
DTM sub-model (``kind="sub"``, one cluster of a saved assignment).

The loss is on response tokens only (prompt tokens get label -100, as in the paper's
code). Prompts use the model's chat template when it has one, else an Alpaca template.
Every ``log_every`` steps ``metrics.jsonl`` gets one JSON object with ``step``, ``epoch``,
``lr``, ``train_loss`` (running), ``val_loss`` (held-out split), ``probe_loss`` (a fixed
subset of the training rows), ``loss_ratio`` = (probe_loss at step 0 - probe_loss) /
(val_loss at step 0 - val_loss): the pilot study's delta L_train / delta L_val, and
``loss_ratio_interval``, the same over the last logging interval only (it shows late
memorisation that the cumulative ratio dilutes, and is noisy when val loss stalls). An
optional ``eval_hook(model, tokenizer, step)`` adds benchmark scores at those steps (the
alignment-tax curve).

Defaults are the paper's released command: LoRA r=16, alpha=16, dropout 0.05 on
``gate_proj, up_proj, down_proj``; lr 3e-4, cosine with warmup, AdamW (0.9, 0.98), eps
1e-6, no weight decay, max grad norm 0.3, 1 epoch, effective batch 16, max length 1024.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dtm.errors import ConfigError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Response:\n"
)


@dataclass
class TrainConfig:
    """One LoRA SFT run. Every field can be set from the CLI or an experiment file."""

    base: str = field(metadata={"help": "model folder or hub id"})
    data: str = field(metadata={"help": "instruction data file"})
    out: str = field(metadata={"help": "run folder"})
    kind: str = "sft"
    val_data: str | None = field(
        default=None, metadata={"help": "held-out file; else a split of data"}
    )
    val_fraction: float = 0.05
    assignments: str | None = None
    cluster: int | None = None
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    epochs: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    lr: float = 3e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    batch_size: int = 16
    micro_batch_size: int = 16
    max_length: int = 1024
    log_every: int = 10
    probe_size: int = 64
    seed: int = 0


def load_base(name: str, *, trust_remote_code: bool = False):
    """(model, tokenizer) from a folder or hub id, with a clear error when it is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise ConfigError(f"{name}: not a model folder (no config.json).")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot load the model {name!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def encode_rows(table: pd.DataFrame, tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels (prompt masked to -100) for each row of the data table."""
    from dtm.data import prompt_text

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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def _split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    from dtm.data import load_instructions

    table = load_instructions(cfg.data, count_tokens=False).table
    if cfg.kind == "sub":
        if cfg.assignments is None or cfg.cluster is None:
            raise ConfigError("kind 'sub' needs --assignments and --cluster.")
        asg = pd.read_csv(cfg.assignments, dtype={"id": str})
        if not set(table["id"]) >= set(asg["id"]):
            raise ConfigError(
                f"{cfg.assignments}: its ids are not rows of {cfg.data} "
                "(an assignment of another dataset?)."
            )
        k = int(asg["cluster"].max()) + 1
        if not 0 <= cfg.cluster < k:
            raise ConfigError(
                f"cluster {cfg.cluster} is out of range: the assignment has clusters 0..{k - 1}."
            )
        keep = set(asg.loc[asg["cluster"] == cfg.cluster, "id"])
        table = table[table["id"].isin(keep)].reset_index(drop=True)
    if cfg.val_data:
        return table, load_instructions(cfg.val_data, count_tokens=False).table
    rng = np.random.default_rng(cfg.seed)
    val_idx = rng.choice(len(table), max(1, int(len(table) * cfg.val_fraction)), replace=False)
    is_val = np.zeros(len(table), bool)
    is_val[val_idx] = True
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


def train(
    cfg: TrainConfig,
    eval_hook: Callable[[Any, Any, int], dict] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """Run ``cfg``; writes ``out/adapter/``, ``out/metrics.jsonl``, ``out/config.json``.
    Returns ``{"metrics": [...], "seconds": ...}``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    set_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_base(cfg.base)
    train_table, val_table = _split(cfg)
    train_rows = encode_rows(train_table, tok, cfg.max_length)
    val_rows = encode_rows(val_table, tok, cfg.max_length)
    probe_idx = np.random.default_rng(cfg.seed).choice(
        len(train_rows), min(cfg.probe_size, len(train_rows)), replace=False
    )
    probe_rows = [train_rows[i] for i in sorted(probe_idx)]
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    accum = max(1, cfg.batch_size // cfg.micro_batch_size)
    steps = cfg.steps or max(1, math.ceil(len(train_rows) * cfg.epochs / cfg.batch_size))
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accum,
        per_device_eval_batch_size=64,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every,
        eval_strategy="steps",
        eval_steps=cfg.log_every,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    records: list[dict] = []
    t0 = time.perf_counter()

    def ratio(ref: dict, rec: dict) -> float | None:
        d_val = ref["val_loss"] - rec["val_loss"]
        d_train = ref["probe_loss"] - rec["probe_loss"]
        return d_train / d_val if abs(d_val) > 1e-9 else None

    def emit(rec: dict) -> None:
        rec["loss_ratio"] = ratio(records[0], rec) if records else None
        rec["loss_ratio_interval"] = ratio(records[-1], rec) if records else None
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        if eval_hook is not None:
            rec["bench"] = eval_hook(model, tok, rec["step"])
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    class Log(TrainerCallback):
        def __init__(self) -> None:
            self.pending: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            self.pending.update({k: v for k, v in logs.items()})
            if "eval_val_loss" in self.pending and "eval_probe_loss" in self.pending:
                p = self.pending
                emit(
                    {
                        "step": state.global_step,
                        "epoch": state.epoch or 0.0,
                        "lr": p.get("learning_rate"),
                        "train_loss": p.get("loss"),
                        "val_loss": p["eval_val_loss"],
                        "probe_loss": p["eval_probe_loss"],
                    }
                )
                self.pending = {}
            if progress:
                progress("training", state.global_step / steps)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset={"val": val_rows, "probe": probe_rows},
        data_collator=collate(tok.pad_token_id),
        callbacks=[Log()],
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for our own report
    trainer.evaluate()  # step 0: the callback records the losses before any update
    trainer.train()
    model.save_pretrained(out / "adapter")
    resolved = asdict(cfg)
    resolved.update(
        {"resolved_steps": steps, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    )
    (out / "config.json").write_text(json.dumps(resolved, indent=2, default=list) + "\n")
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return {
        "metrics": records,
        "seconds": round(time.perf_counter() - t0, 2),
        "model": model,
        "tokenizer": tok,
    }
