"""The shared passes of a group run (``dtm.train.group``): training micro-steps over
every active member in one forward, evaluations packed across members, checkpoints, the
sub-models' Fisher and the adapters' writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dtm.errors import TrainingError
from dtm.store import is_io_error, publish_dir
from dtm.train import oom
from dtm.train.checkpoints import checkpoints, drop_checkpoints, last_checkpoint
from dtm.train.member import EVAL_BATCH, EVAL_ROWS, Member
from dtm.train.routing import Timer, save_adapter


class GroupPasses:
    """The shared passes: training micro-steps, evaluations, checkpoints, the Fisher."""

    def __init__(
        self, model, routing, members, collate_fn, device, autocast, progress, on_step, timer: Timer
    ):
        self.estimate_gib: float | None = None  # the group's memory estimate (messages)
        self.model, self.routing, self.members = model, routing, members
        self.timer = timer
        self.collate, self.device, self.autocast = collate_fn, device, autocast
        self.progress, self.on_step = progress, on_step
        # tokens, positions of the shared batches, positions were each member's padded alone
        self.real = self.padded = self.alone = 0
        self.total = sum(m.steps for m in members)

    def _batch(self, parts: list[tuple[str, list[dict]]]) -> tuple[dict, list]:
        rows = [r for _, rs in parts for r in rs]
        batch = {k: v.to(self.device) for k, v in self.collate(rows).items()}
        segs, s = [], 0
        for name, rs in parts:
            segs.append((name, s, s + len(rs)))
            s += len(rs)
        return batch, segs

    def _token_losses(self, batch: dict, segs) -> Any:
        """(rows, width) cross-entropy per target token (0 where there is none), as the
        model's own causal-LM loss computes it before its reduction."""
        import torch.nn.functional as F

        self.routing.segments = segs
        try:
            with self.autocast():
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        finally:
            self.routing.segments = None
        labels = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
        logits = logits.float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        return ce.view(labels.shape), labels.ne(-100)

    def micro_step(self, active: list[Member]) -> None:
        """One micro-batch of every active member in one forward and backward; a member
        whose step is complete then clips, steps its optimizer and schedule, and logs."""
        with self.timer("steps"):
            self._micro_step(active)

    def _micro_step(self, active: list[Member]) -> None:
        for m in active:
            if not m.pending:
                m.epoch_next, chunk = next(m.plan)
                m.step_rows = oom.split(chunk, m.micro)
                m.pending = list(m.step_rows)
                m.num_items = sum(m.targets[i] for mb in m.pending for i in mb)
                m.step_start = (m.tr_loss, m.log.tokens, m.log.padded)
                m.log.step_begin()
        try:
            self._forward_backward(active)
        except Exception as e:
            if not oom.out_of_memory(e):
                raise
            self._split(active)
            return
        for m in active:
            if m.state != "training":
                continue
            m.pending.pop(0)
            if not m.pending:
                self._optimizer_step(m)

    def _forward_backward(self, active: list[Member]) -> None:
        """The next micro-batch of every active member: one forward, one backward."""
        import torch

        parts = [(m.name, [m.train_rows[i] for i in m.pending[0]]) for m in active]
        batch, segs = self._batch(parts)
        self.model.train()
        ce, _ = self._token_losses(batch, segs)
        total = None
        for m, (_, s, e) in zip(active, segs, strict=True):
            loss = ce[s:e].sum() / m.num_items
            if not torch.isfinite(loss.detach()):
                self._fail(m, float(loss.detach()))
                continue
            m.tr_loss = m.tr_loss + loss.detach().float().cpu()
            m.log.tokens += int(batch["attention_mask"][s:e].sum())
            m.log.padded += batch["attention_mask"][s:e].numel()
            total = loss if total is None else total + loss
        if total is not None:  # the routing stays set: a checkpointed layer reruns its
            self.routing.segments = segs  # forward in the backward pass
            try:
                total.backward()
            finally:
                self.routing.segments = None
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.alone += sum(len(rs) * max(len(r["input_ids"]) for r in rs) for _, rs in parts)

    def _split(self, active: list[Member]) -> None:
        """An out-of-memory error: every active member's micro-batch is split
        (``dtm.train.oom``) and its step in progress starts again, its gradient and loss
        as they were when the step began."""
        smaller = {}
        for m in active:
            if m.state == "training" and m.micro > 1:
                smaller[m.name] = oom.halve_or_stop(
                    m.micro, len(m.step_rows), m.global_step, m.cfg, None, f"member {m.cfg.out}: "
                )
        if not smaller:
            m = active[0]
            est = self.estimate_gib
            oom.halve_or_stop(1, 1, m.global_step, m.cfg, est, "a group of members: ")
        for m in active:
            for p in m.params:
                p.grad = None
            m.tr_loss, m.log.tokens, m.log.padded = m.step_start
            if m.name in smaller:
                m.micro, _, note = smaller[m.name]
                m.halved.append(note)
                m.step_rows = oom.split(m.step_rows, m.micro)
            m.pending = list(m.step_rows)
        oom.free_memory()

    def _fail(self, m: Member, value: float) -> None:
        step = m.global_step + 1
        drop_checkpoints(m.ckpt_dir, from_step=step - 1)
        good = last_checkpoint(m.ckpt_dir)
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was kept"
        m.state = "failed"
        m.error = (
            f"the training loss became {value} at step {step}; stopped before applying that "
            f"update ({kept}). Lower the learning rate or check the data."
        )
        for p in m.params:
            p.grad = None

    def _optimizer_step(self, m: Member) -> None:
        import torch

        if m.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(m.params, m.args.max_grad_norm)
        m.optimizer.step()
        m.lr = m.scheduler.get_last_lr()[0]
        m.scheduler.step()
        for p in m.params:
            p.grad = None
        m.global_step += 1
        m.epoch = m.epoch_next
        m.log.step_end()
        done_steps = sum(x.global_step for x in self.members)
        self.progress("training", done_steps / self.total)
        if self.on_step:
            self.on_step(self.members.index(m), m.global_step, m.steps)
        last = m.global_step == m.steps
        if m.global_step % m.cfg.log_every == 0 or last:
            with torch.no_grad():
                self.evaluate([m])
        if m.global_step % m.save_every == 0 or last:
            self.save_checkpoint(m)
        if last:
            m.state = "trained"

    def evaluate(self, due: list[Member]) -> None:
        """Record the probe and validation losses of each member in ``due`` at its current
        weights (eval mode): the Trainer's per-batch mean losses, averaged over rows."""
        if due:
            with self.timer("losses"):
                self._evaluate(due)

    def _evaluate(self, due: list[Member]) -> None:
        import torch

        self.model.eval()
        jobs = []  # (member, split, rows)
        same_val: dict[str, str] = {}  # member -> the member whose validation loss it takes
        first: dict[tuple, str] = {}
        for m in due:
            if m.global_step == 0 and m.cfg.val_data:  # the base model on the same rows
                key = (str(Path(m.cfg.val_data).resolve()), m.cfg.max_length)
                same_val[m.name] = first.setdefault(key, m.name)
            for split, rows in (("val", m.val_rows), ("probe", m.probe_rows)):
                if split == "val" and same_val.get(m.name, m.name) != m.name:
                    continue
                for j in range(0, len(rows), EVAL_BATCH):
                    jobs.append((m, split, rows[j : j + EVAL_BATCH]))
        losses: dict[tuple[str, str], list] = {}
        packed: list = []
        for job in jobs + [None]:
            if job is not None and sum(len(x[2]) for x in packed) + len(job[2]) <= EVAL_ROWS:
                packed.append(job)
                continue
            if packed:
                batch, segs = self._batch([(m.name, rows) for m, _, rows in packed])
                ce, mask = self._token_losses(batch, segs)
                for (m, split, rows), (_, s, e) in zip(packed, segs, strict=True):
                    mean = ce[s:e].sum() / mask[s:e].sum()
                    losses.setdefault((m.name, split), []).append(mean.repeat(len(rows)))
            packed = [job] if job is not None else []
        self.model.train()
        for m in due:

            def mean(split: str, m: Member = m) -> float:
                owner = same_val.get(m.name, m.name) if split == "val" else m.name
                vals = losses.get((owner, split))
                return float(torch.cat(vals).numpy().mean()) if vals else float("nan")

            steps_since = m.global_step - m.last_logged
            rec = {
                "step": m.global_step,
                "epoch": m.epoch,
                "lr": m.lr if steps_since else None,
                "train_loss": m.tr_loss.item() / steps_since if steps_since else None,
                "val_loss": mean("val"),
                "probe_loss": mean("probe"),
            }
            m.tr_loss, m.last_logged = torch.zeros(()), m.global_step
            m.log.record(rec)

    def save_checkpoint(self, m: Member) -> None:
        """``checkpoints/checkpoint-N`` in the Trainer's layout (adapter, optimizer,
        schedule, ``trainer_state.json`` last), the oldest beyond ``keep_checkpoints``
        removed; a failed write is a ``TrainingError`` naming what is left."""
        with self.timer("checkpoints"):
            self._save_checkpoint(m)

    def _save_checkpoint(self, m: Member) -> None:
        import torch

        folder = m.ckpt_dir / f"checkpoint-{m.global_step}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_adapter(self.model, m.name, folder)
            torch.save(m.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(m.scheduler.state_dict(), folder / "scheduler.pt")
            state = {
                "global_step": m.global_step,
                "epoch": m.epoch,
                "max_steps": m.steps,
                "logging_steps": m.cfg.log_every,
                "eval_steps": m.cfg.log_every,
                "save_steps": m.save_every,
                "train_batch_size": m.cfg.micro_batch_size,
                "trained_together": True,
            }
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        except Exception as e:
            if not is_io_error(e):
                raise
            drop_checkpoints(m.ckpt_dir)
            good = last_checkpoint(m.ckpt_dir)
            raise TrainingError(
                f"could not save a checkpoint in {m.ckpt_dir}: {e}. "
                + (
                    f"The last complete checkpoint is {good}."
                    if good
                    else "No checkpoint was kept."
                )
            ) from None
        for _, old in checkpoints(m.ckpt_dir)[: -m.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def stop_at_boundaries(self) -> None:
        """A stop request: each member between steps saves a checkpoint and stops; one in
        the middle of a step (gradient accumulation) stops after it."""
        for m in self.members:
            if m.state == "training" and not m.pending:
                saved = checkpoints(m.ckpt_dir)
                if not saved or saved[-1][0] != m.global_step:
                    self.save_checkpoint(m)
                m.state = "stopped"

    def write_adapters(self, trained: list[Member]) -> None:
        """Each trained member's ``adapter/`` (one rename each); ``sub`` members add
        ``fisher.safetensors``, the mean squared per-row gradient of their LoRA
        parameters on a seeded sample of ``fisher_size`` rows, one row of each member per
        shared pass (as ``baselines.adapter_fisher`` does one run's rows one at a time)."""
        with self.timer("adapters"):
            self._write_adapters(trained)

    def _write_adapters(self, trained: list[Member]) -> None:
        import torch
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        subs = [m for m in trained if m.cfg.kind == "sub"]
        samples = {}
        for m in subs:
            n = len(m.train_rows)
            pick = np.random.default_rng(m.cfg.seed).choice(
                n, min(m.cfg.fisher_size, n), replace=False
            )
            samples[m.name] = [m.train_rows[i] for i in sorted(pick)]
        acc = {m.name: [torch.zeros_like(p, dtype=torch.float32) for p in m.params] for m in subs}
        self.model.eval()
        longest = max((len(v) for v in samples.values()), default=0)
        for i in range(longest):
            now = [m for m in subs if i < len(samples[m.name])]
            batch, segs = self._batch([(m.name, [samples[m.name][i]]) for m in now])
            ce, mask = self._token_losses(batch, segs)
            total = sum(ce[s:e].sum() / mask[s:e].sum() for _, s, e in segs)
            total.backward()
            for m in now:
                for a, p in zip(acc[m.name], m.params, strict=True):
                    if p.grad is not None:
                        a += p.grad.detach().float() ** 2
                    p.grad = None
            if i % 16 == 0:
                self.progress("Fisher", (i + 1) / longest)
        self.model.train()
        named = {id(p): n for n, p in self.model.named_parameters()}
        for m in trained:

            def write(tmp: Path, m: Member = m) -> None:
                save_adapter(self.model, m.name, tmp)
                if m.cfg.kind != "sub":
                    return
                rows = len(samples[m.name])
                pairs = zip(m.params, acc[m.name], strict=True)
                fisher = {named[id(p)]: a / max(1, rows) for p, a in pairs}
                fisher = get_peft_model_state_dict(
                    self.model, state_dict=fisher, adapter_name=m.name
                )
                save_file(
                    {k: v.contiguous() for k, v in fisher.items()},
                    tmp / "fisher.safetensors",
                    metadata={"rows": str(rows)},
                )

            publish_dir(m.out / "adapter", write)
