"""One LoRA run on the ``transformers`` Trainer: the plumbing behind ``dtm.train.train``.

``run_one`` reads top to bottom: ``setup`` (model, rows, probe, baseline pieces) ->
``training_arguments`` -> ``start_point`` (resume or not) -> the Trainer, with
``MetricsLogger`` writing the records, ``StepHooks`` as its callback and ``CheckedLoss``
in its ``compute_loss`` -> ``train_or_raise`` (recovery) -> ``write_adapter``.

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
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from dtm import baselines
from dtm.errors import Stopped, TrainingError
from dtm.store import is_io_error, publish_dir, read_metrics
from dtm.train import oom
from dtm.train.checkpoints import checkpoint_step, drop_checkpoints, last_checkpoint
from dtm.train.config import TrainConfig
from dtm.train.memory import resolved
from dtm.train.order import SeededOrder
from dtm.train.records import MetricsLogger, save_adapter
from dtm.train.setup import Run, setup

_STOP = threading.Event()


def stop_requested() -> bool:
    """Whether ``request_stop()`` was called since this process's run began."""
    return _STOP.is_set()


def clear_stop() -> None:
    _STOP.clear()


def request_stop() -> None:
    """Ask the running training to save a checkpoint and stop (signal-handler safe)."""
    _STOP.set()


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(step, value)
        self.step, self.value = step, value


def training_arguments(
    cfg: TrainConfig, steps: int, save_every: int, ckpt_dir: Path, dtype: str | None = None
):
    """The Trainer's settings for ``cfg``: an eval (hence a record) every ``log_every``
    steps, a checkpoint every ``save_every``; on a GPU, mixed precision in ``dtype``
    (the resolved ``--dtype``; None: bf16 where the GPU has it)."""
    import torch
    from transformers import TrainingArguments

    gpu = torch.cuda.is_available()
    if dtype is None:
        dtype = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"

    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=max(1, cfg.batch_size // cfg.micro_batch_size),
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
        bf16=gpu and dtype == "bf16",
        fp16=gpu and dtype == "fp16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def start_point(out: Path, ckpt_dir: Path, resume: bool) -> tuple[Path | None, list[dict]]:
    """The checkpoint to resume from (None: from scratch, old checkpoints removed) and the
    metrics records up to its step; ``metrics.jsonl`` is rewritten to hold exactly those."""
    metrics_path = out / "metrics.jsonl"
    ckpt = last_checkpoint(ckpt_dir) if resume else None
    if ckpt is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        records: list[dict] = []
    else:
        done = checkpoint_step(ckpt)
        records = [r for r in read_metrics(metrics_path) if r["step"] <= done]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ckpt, records


# The two classes below are mixins: ``run_one`` puts them in front of ``TrainerCallback``
# and ``Trainer``, so that importing ``dtm.train`` does not import transformers (seconds).


class StepHooks:
    """The Trainer callback: joins the Trainer's log calls into records, times the steps,
    reports progress, forces a record at the last step and turns a stop request into a
    checkpoint and the end of training (``stopped``)."""

    def __init__(self, log: MetricsLogger, progress, on_step) -> None:
        self.log, self.progress, self.on_step = log, progress, on_step
        self.pending: dict = {}
        self.stopped = False

    def on_log(self, args, state, control, logs=None, **kw):
        # The train loss and each eval split's loss come in separate log calls.
        self.pending.update(logs or {})
        if "eval_val_loss" in self.pending and "eval_probe_loss" in self.pending:
            p = self.pending
            self.log.record(
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
        self.log.step_begin()

    def on_step_end(self, args, state, control, **kw):
        self.log.step_end()
        steps = self.log.steps
        if self.progress:
            self.progress("training", state.global_step / steps)
        if self.on_step:
            self.on_step(state.global_step, steps)
        if state.global_step == steps:  # the last step is always a record
            control.should_log = control.should_evaluate = True
        if _STOP.is_set() and state.global_step < steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True


class CheckedLoss:
    """The Trainer's ``compute_loss`` plus a check that the training loss is finite (raised
    before the update is applied), the token count for tokens/s and the baseline penalty,
    divided by the accumulation steps as the Trainer divides the loss."""

    def __init__(
        self, *args, log: MetricsLogger, penalty: Callable | None, order=None, **kw
    ) -> None:
        self.metrics_log, self.loss_penalty, self.train_order = log, penalty, order
        super().__init__(*args, **kw)

    def _get_train_sampler(self, *args, **kw):
        # length-grouped batches (dtm.train.order); None: the Trainer's seeded shuffle
        return self.train_order or super()._get_train_sampler(*args, **kw)

    def _save(self, output_dir=None, state_dict=None):
        from dtm import moe  # lazy: torch

        if not moe.is_loramoe(self.model):
            return super()._save(output_dir, state_dict)
        moe.save_adapter(self.model, output_dir or self.args.output_dir)  # not the base

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from dtm import moe  # lazy: torch

        if not moe.is_loramoe(model or self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        moe.load_weights(model or self.model, resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return res
        loss = res[0] if return_outputs else res
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach()))
        self.metrics_log.tokens += int(inputs["attention_mask"].sum())
        self.metrics_log.padded += inputs["attention_mask"].numel()
        if self.loss_penalty is not None:
            accum = self.args.gradient_accumulation_steps
            loss = loss + self.loss_penalty(model) / accum
        return (loss, *res[1:]) if return_outputs else loss


def train_or_raise(trainer, ckpt: Path | None, ckpt_dir: Path) -> None:
    """``trainer.train()`` (from ``ckpt`` when given); a non-finite loss or a failed
    checkpoint write becomes a ``TrainingError`` that says which checkpoint is left."""
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except NonFiniteLoss as e:
        # The weights after step e.step - 1 produced it: their checkpoint is not good.
        drop_checkpoints(ckpt_dir, from_step=e.step - 1)
        good = last_checkpoint(ckpt_dir)
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was kept"
        raise TrainingError(
            f"the training loss became {e.value} at step {e.step}; stopped before applying "
            f"that update ({kept}). Lower the learning rate or check the data."
        ) from None
    except Exception as e:
        if not is_io_error(e):
            raise
        # A checkpoint write failed (disk full, quota): drop the partial folder, which has
        # no trainer_state.json and is never resumed from, and say what is left.
        drop_checkpoints(ckpt_dir)
        good = last_checkpoint(ckpt_dir)
        raise TrainingError(
            f"could not save a checkpoint in {ckpt_dir}: {e}. "
            + (f"The last complete checkpoint is {good}." if good else "No checkpoint was kept.")
        ) from None


def write_adapter(cfg: TrainConfig, run: Run, tmp: Path, progress) -> None:
    """The trained adapter into ``tmp``; a ``sub`` run adds ``fisher.safetensors``, the
    diagonal Fisher of its LoRA parameters (same names and shapes) on a seeded sample of
    ``fisher_size`` of its rows, which the Fisher merge weights it by."""
    save_adapter(run.model, tmp)
    if cfg.kind != "sub":
        return
    from safetensors.torch import save_file  # lazy: torch

    rows = run.train_rows
    sample = np.random.default_rng(cfg.seed).choice(
        len(rows), min(cfg.fisher_size, len(rows)), replace=False
    )
    fisher = baselines.adapter_fisher(
        run.model, [rows[i] for i in sorted(sample)], run.collate_fn, progress
    )
    save_file(fisher, tmp / "fisher.safetensors", metadata={"rows": str(len(sample))})


def run_one(
    cfg: TrainConfig, out: Path, eval_hook, progress, resume, on_record, on_step, select_rows=None
):
    """Train ``cfg`` into ``out``. Returns ``{"metrics": records, "model": the peft model,
    "tokenizer", "resolved": the settings worked out here}``; raises ``Stopped`` after a
    stop request, ``TrainingError`` on a non-finite loss, a failed save or an
    out-of-memory error at micro-batch 1 (a larger micro-batch is split: ``dtm.train.oom``)."""
    from transformers import set_seed

    _STOP.clear()
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    run = setup(cfg, progress, select_rows)
    steps = cfg.steps or max(1, math.ceil(len(run.train_rows) * cfg.epochs / cfg.batch_size))
    save_every = cfg.save_every or max(cfg.log_every, steps // 10)
    ckpt_dir = out / "checkpoints"
    micro, accum = cfg.micro_batch_size, max(1, cfg.batch_size // cfg.micro_batch_size)
    fresh = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    halved: list[dict] = []
    calls = (eval_hook, progress, on_record, on_step)
    while True:
        attempt = replace(cfg, micro_batch_size=micro, batch_size=micro * accum)
        try:
            trainer, hooks, records = _attempt(attempt, run, out, steps, save_every, resume, calls)
            break
        except Exception as e:
            if not oom.out_of_memory(e):
                raise
            good = last_checkpoint(ckpt_dir)
            step = checkpoint_step(good) if good else 0  # where the next attempt starts
            est = run.choice.estimate.gib if run.choice and run.choice.estimate else None
            micro, accum, note = oom.halve_or_stop(micro, accum, step, cfg, est)
            halved.append(note)
            run.model.zero_grad(set_to_none=True)
            oom.free_memory()
            resume = True
            if good is None:  # from step 0: the adapter as it began
                import torch

                with torch.no_grad():
                    for n, p in run.model.named_parameters():
                        if n in fresh:
                            p.copy_(fresh[n])
                set_seed(cfg.seed)
    if hooks.stopped:
        last = last_checkpoint(ckpt_dir)
        raise Stopped(f"stopped on request at step {trainer.state.global_step}; saved {last}.")
    publish_dir(out / "adapter", lambda tmp: write_adapter(cfg, run, tmp, progress))
    return {
        "metrics": records,
        "model": run.model,
        "tokenizer": run.tok,
        "resolved": {
            "resolved_steps": steps,
            "save_every": save_every,
            "train_rows": len(run.train_rows),
            "val_rows": len(run.val_rows),
            "reference": run.reference if cfg.kind in ("ewc", "replay") else None,
            **resolved(run.choice, run.model),
            **({"out_of_memory": halved, "micro_batch_size_used": micro} if halved else {}),
        },
    }


def _attempt(cfg: TrainConfig, run: Run, out: Path, steps, save_every, resume, calls):
    """One go at training ``run`` with ``cfg``'s micro-batch, from ``start_point``;
    ``calls``: ``run_one``'s eval hook, progress, on_record and on_step. Returns
    ``(trainer, hooks, records)``."""
    from torch.utils.data import Sampler
    from transformers import PrinterCallback, Trainer, TrainerCallback

    ckpt_dir = out / "checkpoints"
    args = training_arguments(cfg, steps, save_every, ckpt_dir, run.choice.dtype)
    ckpt, records = start_point(out, ckpt_dir, resume)
    eval_hook, progress, on_record, on_step = calls
    eval_every = cfg.eval_every or cfg.log_every
    log = MetricsLogger(run, out, steps, records, eval_hook, eval_every, on_record)
    hooks = type("Log", (StepHooks, TrainerCallback), {})(log, progress, on_step)
    order = None
    if run.choice.by_length:
        lengths = [len(r["input_ids"]) for r in run.train_rows]
        step_rows = cfg.micro_batch_size * args.gradient_accumulation_steps
        order = type("Order", (SeededOrder, Sampler), {})(lengths, cfg.seed, step_rows, True)
    trainer = type("DTMTrainer", (CheckedLoss, Trainer), {})(
        model=run.model,
        args=args,
        train_dataset=run.train_rows,
        eval_dataset={"val": run.val_rows, "probe": run.probe_rows},
        data_collator=run.collate_fn,
        callbacks=[hooks],
        log=log,
        penalty=run.penalty,
        order=order,
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for our own report
    if not records:
        trainer.evaluate()  # step 0: the callback records the losses before any update
    train_or_raise(trainer, ckpt, ckpt_dir)
    return trainer, hooks, records
