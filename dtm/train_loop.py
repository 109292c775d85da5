"""One LoRA run on the ``transformers`` Trainer: the plumbing behind ``dtm.train.train``.

Checkpoints (adapter + optimizer + RNG state) go to ``out/checkpoints`` every
``save_every`` steps, so a run that was stopped, killed or crashed resumes where its last
checkpoint left it; ``metrics.jsonl`` is cut back to that step. A stop request (SIGTERM
to a job) saves a checkpoint at the next step and ends the run with ``Stopped``. A
non-finite loss stops the run before the bad update is applied; checkpoints written from
the weights that produced it are removed and the last good one is kept.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from dtm.train import (
    Stopped,
    TrainConfig,
    TrainingError,
    _split,
    collate,
    encode_rows,
    load_base,
    publish_dir,
    read_metrics,
)

_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running training to save a checkpoint and stop (signal-handler safe)."""
    _STOP.set()


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(step, value)
        self.step, self.value = step, value


def _mem_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _is_io_error(e: BaseException) -> bool:
    """An OSError, or a library error wrapping one (safetensors reports a failed write as
    ``SafetensorError: ... I/O error``)."""
    while e is not None:
        if isinstance(e, OSError) or "I/O error" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _last_checkpoint(folder: Path) -> Path | None:
    ckpts = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _save_early(model, folder: Path, step: int) -> None:
    model.save_pretrained(folder)
    (folder / "early.json").write_text(json.dumps({"step": step}) + "\n")


def run_one(cfg: TrainConfig, out: Path, eval_hook, progress, resume, on_record, on_step):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    from dtm import baselines

    _STOP.clear()
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_base(
        cfg.base, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle
    )
    train_table, val_table = _split(cfg)
    if len(train_table) == 0:
        raise TrainingError(f"no training rows in {cfg.data} for this run.")
    train_rows = encode_rows(train_table, tok, cfg.max_length)
    val_rows = encode_rows(val_table, tok, cfg.max_length)
    probe_idx = np.random.default_rng(cfg.seed).choice(
        len(train_rows), min(cfg.probe_size, len(train_rows)), replace=False
    )
    probe_rows = [train_rows[i] for i in sorted(probe_idx)]
    collate_fn = collate(tok.pad_token_id)
    reference = cfg.reference or baselines.default_reference(cfg.base)
    penalty = None
    if cfg.kind == "replay":
        docs = baselines.read_reference(reference, limit=len(train_rows), seed=cfg.seed)
        train_rows = train_rows + baselines.encode_documents(docs, tok, cfg.max_length)
    elif cfg.kind == "ewc":
        docs = baselines.read_reference(reference, limit=cfg.reference_size, seed=cfg.seed)
        fisher = baselines.base_fisher(
            model,
            baselines.encode_documents(docs, tok, cfg.max_length),
            cfg.target_modules,
            collate_fn,
            progress,
        )
        penalty = lambda m: cfg.ewc_weight / 2 * baselines.ewc_penalty(m, fisher)
    elif cfg.kind == "l2":
        penalty = lambda m: cfg.l2_weight / 2 * baselines.l2_penalty(m)
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
    save_every = cfg.save_every or max(cfg.log_every, steps // 10)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ckpt_dir = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
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
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=cfg.keep_checkpoints,
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
    ckpt = _last_checkpoint(ckpt_dir) if resume else None
    if ckpt is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        records: list[dict] = []
    else:
        done = int(ckpt.name.split("-")[-1])
        records = [r for r in read_metrics(metrics_path) if r["step"] <= done]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    t0 = time.perf_counter()
    clock = {
        "began": t0,
        "busy": 0.0,
        "tokens": 0,
    }  # training time and tokens since the last record
    eval_every = cfg.eval_every or cfg.log_every

    def ratio(ref: dict, rec: dict) -> float | None:
        d_val = ref["val_loss"] - rec["val_loss"]
        d_train = ref["probe_loss"] - rec["probe_loss"]
        return d_train / d_val if abs(d_val) > 1e-9 else None

    def emit(rec: dict) -> None:
        rec["loss_ratio"] = ratio(records[0], rec) if records else None
        rec["loss_ratio_interval"] = ratio(records[-1], rec) if records else None
        rec["tokens_per_s"] = round(clock["tokens"] / clock["busy"], 1) if clock["busy"] else None
        rec["mem_mb"] = _mem_mb()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        clock.update(busy=0.0, tokens=0)
        if eval_hook is not None and (rec["step"] % eval_every == 0 or rec["step"] == steps):
            rec["bench"] = eval_hook(model, tok, rec["step"])
        if 0 < rec["step"] < steps and rec["step"] >= steps / 10 and not (out / "early").exists():
            # The early checkpoint the token-level bias analysis compares the end with.
            publish_dir(out / "early", lambda tmp: _save_early(model, tmp, rec["step"]))
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if on_record:
            on_record(rec)

    class Log(TrainerCallback):
        def __init__(self) -> None:
            self.pending: dict = {}
            self.stopped = False

        def on_log(self, args, state, control, logs=None, **kw):
            self.pending.update(logs or {})
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

        def on_step_begin(self, args, state, control, **kw):
            clock["began"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["busy"] += time.perf_counter() - clock["began"]
            if progress:
                progress("training", state.global_step / steps)
            if on_step:
                on_step(state.global_step, steps)
            if state.global_step == steps:  # the last step is always a record
                control.should_log = control.should_evaluate = True
            if _STOP.is_set() and state.global_step < steps:
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True

    class DTMTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return res
            loss = res[0] if return_outputs else res
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach()))
            clock["tokens"] += int(inputs["attention_mask"].sum())
            if penalty is not None:
                loss = loss + penalty(model) / accum
            return (loss, *res[1:]) if return_outputs else loss

    log = Log()
    trainer = DTMTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset={"val": val_rows, "probe": probe_rows},
        data_collator=collate_fn,
        callbacks=[log],
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for our own report
    if not records:
        trainer.evaluate()  # step 0: the callback records the losses before any update
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except NonFiniteLoss as e:
        # The weights after step e.step - 1 produced it: their checkpoint is not good.
        for p in ckpt_dir.glob("checkpoint-*"):
            if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) >= e.step - 1:
                shutil.rmtree(p, ignore_errors=True)
        good = _last_checkpoint(ckpt_dir)
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was kept"
        raise TrainingError(
            f"the training loss became {e.value} at step {e.step}; stopped before applying "
            f"that update ({kept}). Lower the learning rate or check the data."
        ) from None
    except Exception as e:
        if not _is_io_error(e):
            raise
        # A checkpoint write failed (disk full, quota): drop the partial folder, which has
        # no trainer_state.json and is never resumed from, and say what is left.
        for p in ckpt_dir.glob("checkpoint-*"):
            if not (p / "trainer_state.json").exists():
                shutil.rmtree(p, ignore_errors=True)
        good = _last_checkpoint(ckpt_dir)
        raise TrainingError(
            f"could not save a checkpoint in {ckpt_dir}: {e}. "
            + (f"The last complete checkpoint is {good}." if good else "No checkpoint was kept.")
        ) from None
    if log.stopped:
        last = _last_checkpoint(ckpt_dir)
        raise Stopped(f"stopped on request at step {trainer.state.global_step}; saved {last}.")

    def write_adapter(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if cfg.kind == "sub":
            from safetensors.torch import save_file

            sample = np.random.default_rng(cfg.seed).choice(
                len(train_rows), min(cfg.fisher_size, len(train_rows)), replace=False
            )
            fisher = baselines.adapter_fisher(
                model, [train_rows[i] for i in sorted(sample)], collate_fn, progress
            )
            save_file(fisher, tmp / "fisher.safetensors", metadata={"rows": str(len(sample))})

    publish_dir(out / "adapter", write_adapter)
    return {
        "metrics": records,
        "model": model,
        "tokenizer": tok,
        "resolved": {
            "resolved_steps": steps,
            "save_every": save_every,
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "reference": reference if cfg.kind in ("ewc", "replay") else None,
        },
    }
