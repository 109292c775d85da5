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
import resource
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dtm import baselines
from dtm.errors import Stopped, TrainingError
from dtm.store import is_io_error, publish_dir, read_metrics
from dtm.train.checkpoints import checkpoint_step, drop_checkpoints, last_checkpoint
from dtm.train.config import TrainConfig
from dtm.train.memory import resolved
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


def _mem_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def save_adapter(model, folder: Path) -> None:
    """The trained adapter: peft's folder, or a LoRAMoE's own (``dtm.moe``)."""
    from dtm import moe  # lazy: torch

    if moe.is_loramoe(model):
        moe.save_adapter(model, folder)
    else:
        model.save_pretrained(folder)


def _save_early(model, folder: Path, step: int) -> None:
    save_adapter(model, folder)
    (folder / "early.json").write_text(json.dumps({"step": step}) + "\n")


def _ratio(ref: dict, rec: dict) -> float | None:
    """ΔL_probe / ΔL_val from ``ref`` to ``rec``; None when the val loss did not move."""
    d_val = ref["val_loss"] - rec["val_loss"]
    d_train = ref["probe_loss"] - rec["probe_loss"]
    return d_train / d_val if abs(d_val) > 1e-9 else None


class MetricsLogger:
    """The records of one run. Each eval measures the train probe and the validation split
    at the same weights (as nanoGPT's ``estimate_loss`` does both splits), and ``record``
    adds the loss ratios since the first and the previous record, tokens/s over the
    training time since the previous record, peak memory, the eval hook's scores and the
    early checkpoint, then appends the record to ``metrics.jsonl`` and ``records``."""

    def __init__(
        self, run: Run, out: Path, steps: int, records: list[dict], eval_hook, eval_every, on_record
    ) -> None:
        self.run, self.out, self.steps, self.records = run, out, steps, records
        self.eval_hook, self.eval_every, self.on_record = eval_hook, eval_every, on_record
        self.t0 = self.began = time.perf_counter()
        self.busy, self.tokens = 0.0, 0  # training seconds and tokens since the last record

    def step_begin(self) -> None:
        self.began = time.perf_counter()

    def step_end(self) -> None:
        self.busy += time.perf_counter() - self.began

    def record(self, rec: dict) -> None:
        """``rec``: step, epoch, lr, train_loss, val_loss, probe_loss; completed in place."""
        records, step = self.records, rec["step"]
        rec["loss_ratio"] = _ratio(records[0], rec) if records else None
        rec["loss_ratio_interval"] = _ratio(records[-1], rec) if records else None
        rec["tokens_per_s"] = round(self.tokens / self.busy, 1) if self.busy else None
        rec["mem_mb"] = _mem_mb()
        rec["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.busy, self.tokens = 0.0, 0
        model = self.run.model
        if self.eval_hook is not None and (step % self.eval_every == 0 or step == self.steps):
            rec["bench"] = self.eval_hook(model, self.run.tok, step)
        early = self.out / "early"
        if 0 < step < self.steps and step >= self.steps / 10 and not early.exists():
            # The early checkpoint the token-level bias analysis compares the end with.
            publish_dir(early, lambda tmp: _save_early(model, tmp, step))
        records.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_record:
            self.on_record(rec)


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

    def __init__(self, *args, log: MetricsLogger, penalty: Callable | None, **kw) -> None:
        self.metrics_log, self.loss_penalty = log, penalty
        super().__init__(*args, **kw)

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
    stop request, ``TrainingError`` on a non-finite loss or a failed save."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed

    _STOP.clear()
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    run = setup(cfg, progress, select_rows)
    steps = cfg.steps or max(1, math.ceil(len(run.train_rows) * cfg.epochs / cfg.batch_size))
    save_every = cfg.save_every or max(cfg.log_every, steps // 10)
    ckpt_dir = out / "checkpoints"
    args = training_arguments(cfg, steps, save_every, ckpt_dir, run.choice.dtype)
    ckpt, records = start_point(out, ckpt_dir, resume)
    eval_every = cfg.eval_every or cfg.log_every
    log = MetricsLogger(run, out, steps, records, eval_hook, eval_every, on_record)
    hooks = type("Log", (StepHooks, TrainerCallback), {})(log, progress, on_step)
    trainer = type("DTMTrainer", (CheckedLoss, Trainer), {})(
        model=run.model,
        args=args,
        train_dataset=run.train_rows,
        eval_dataset={"val": run.val_rows, "probe": run.probe_rows},
        data_collator=run.collate_fn,
        callbacks=[hooks],
        log=log,
        penalty=run.penalty,
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for our own report
    if not records:
        trainer.evaluate()  # step 0: the callback records the losses before any update
    train_or_raise(trainer, ckpt, ckpt_dir)
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
        },
    }
