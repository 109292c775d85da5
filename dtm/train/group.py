"""Several LoRA runs over one frozen base in one process: DTM's sub-models (and SFT)
trained together, at about the cost of one run.

No library trains several adapters at once on the HF/peft stack (peft's mixed-adapter
batches are for inference), so this is a loop of our own over one peft model holding one
adapter per member (``m000``, ``m001``, ...). A micro-step takes the next micro-batch of
every active member, pads them to one width and runs one forward of the frozen base over
all of them; each LoRA layer adds to each member's rows its own adapter only
(``Routing``). Each member has its own data order, optimizer, LR schedule, clipping,
step count, records, checkpoints and adapter, made exactly as ``dtm.train.loop`` (the
``transformers`` Trainer) makes them for a separate run:

- data order: epoch ``e`` visits ``torch.randperm(n)`` seeded with ``seed + e`` (the
  Trainer's seedable sampler with ``data_seed``), in micro-batches, ``accum`` to a step
  (the last step of an epoch takes what is left);
- loss: the summed token cross-entropy of a micro-batch over the response tokens of the
  whole step (the Trainer's ``num_items_in_batch``), so accumulation is exact;
- optimizer and schedule: the Trainer's own choice for the member's arguments
  (``Trainer.get_optimizer_cls_and_kwargs``, ``get_scheduler``);
- records: train loss averaged over the steps since the last record, the probe and
  validation losses at the same weights (batches of 64, mean of the batch means).

A member whose steps are done leaves the batch, writes its adapter (a ``sub`` member its
Fisher, computed for all of them in shared passes at the end) and its run folder is then
exactly the one ``dtm train --kind sub --cluster k`` writes. At dropout 0 a member's
numbers equal its separate run's up to float32 rounding: the shared forward has another
padded width and batch size, so the kernels add in another order (docs/training.md).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtm.errors import ConfigError, Stopped, TrainingError
from dtm.models import load_base
from dtm.store import is_io_error, publish_dir
from dtm.train import loop
from dtm.train.checkpoints import checkpoints, drop_checkpoints, last_checkpoint
from dtm.train.config import TrainConfig
from dtm.train.rows import collate

STEP0: dict = {}  # the step-0 scores of this process's group (see member_hook)


class Timer:
    """Seconds spent per part (exclusive: a part's time leaves out the parts inside it)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.stack: list[float] = []

    @contextlib.contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        self.stack.append(0.0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total[key] = self.total.get(key, 0.0) + dt - self.stack.pop()
            if self.stack:
                self.stack[-1] += dt


TIMER = Timer()  # this process's group: see train_group's "timings"
EVAL_BATCH = 64  # the Trainer's per_device_eval_batch_size in dtm.train.loop
EVAL_ROWS = 128  # rows per shared eval forward (members' batches packed together)
SHARED = ("base", "trust_remote_code", "allow_pickle")  # what every member must share


class Routing:
    """Which rows of the current batch go through which adapter: ``segments`` is a list
    of ``(adapter, start, stop)`` over the batch dimension (``stop`` None: to the end);
    None leaves peft's own forward (the active adapter) in place."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int | None]] | None = None

    def only(self, name: str) -> None:
        self.segments = [(name, 0, None)]


def route(model, routing: Routing) -> None:
    """Make every LoRA layer of the peft ``model`` follow ``routing``: the base layer on
    all rows, then each segment's rows plus that adapter's delta, as peft's own
    ``Linear.forward`` computes it for one adapter."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    def routed(layer, original):
        def forward(x, *args, **kwargs):
            segs = routing.segments
            if segs is None:
                return original(x, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            parts = []
            for name, s, e in segs:
                a, b = layer.lora_A[name], layer.lora_B[name]
                xs = layer._cast_input_dtype(x[s:e], a.weight.dtype)
                delta = b(a(layer.lora_dropout[name](xs))) * layer.scaling[name]
                parts.append(result[s:e] + delta)
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)

        return forward

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = routed(module, module.forward)


def step_plan(n: int, seed: int, micro: int, accum: int, steps: int):
    """Yield ``(epoch, micro_batches)`` per optimizer step: lists of row indices into the
    ``n`` training rows, in the order the Trainer visits them; ``epoch`` is the Trainer's
    ``state.epoch`` after the step."""
    import torch

    per_epoch = math.ceil(n / micro)
    done, e = 0, 0
    while done < steps:
        g = torch.Generator()
        g.manual_seed(seed + e)
        perm = torch.randperm(n, generator=g).tolist()
        batches = [perm[i : i + micro] for i in range(0, n, micro)]
        for j in range(0, per_epoch, accum):
            chunk = batches[j : j + accum]
            yield e + (j + len(chunk)) / per_epoch, chunk
            done += 1
            if done == steps:
                return
        e += 1


@dataclass
class Member:
    """One run of the group and its state (see the module docstring)."""

    name: str  # the adapter's name in the shared model
    cfg: TrainConfig
    out: Path
    train_rows: list[dict]
    val_rows: list[dict]
    probe_rows: list[dict]
    steps: int = 0
    save_every: int = 0
    args: Any = None
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    plan: Any = None
    log: Any = None
    global_step: int = 0
    epoch: float = 0.0
    pending: list = field(default_factory=list)  # this step's micro-batches still to run
    epoch_next: float = 0.0  # the epoch after the step in progress
    targets: list = field(default_factory=list)  # each training row's predicted tokens
    num_items: int = 0
    tr_loss: Any = None
    last_logged: int = 0
    lr: float | None = None
    state: str = "training"  # training | trained | stopped | failed | done
    error: str | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


class MemberView:
    """What ``loop.MetricsLogger`` sees as the model of one member: the eval hook's model
    with this member's adapter on every row, and ``save_pretrained`` of its adapter."""

    def __init__(self, model, routing: Routing, name: str) -> None:
        self.model, self.routing, self.name = model, routing, name

    def save_pretrained(self, folder) -> None:
        save_adapter(self.model, self.name, Path(folder))


def save_adapter(model, name: str, folder: Path) -> None:
    """One member's adapter as the standard peft folder (``adapter_model.safetensors``,
    ``adapter_config.json``), as a separate run's ``save_pretrained`` writes it."""
    model.save_pretrained(folder, selected_adapters=[name])
    sub = folder / name  # peft writes an adapter that is not "default" into a subfolder
    for p in sub.iterdir():
        p.replace(folder / p.name)
    sub.rmdir()


def check_members(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise ConfigError("a group needs at least one member.")
    for c in cfgs:
        if c.kind not in ("sft", "sub"):
            raise ConfigError(f"a group trains sft and sub members, not {c.kind!r}.")
        for f in SHARED:
            if getattr(c, f) != getattr(cfgs[0], f):
                raise ConfigError(
                    f"the members of a group share {f}: {getattr(c, f)!r} is not "
                    f"{getattr(cfgs[0], f)!r}."
                )
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise ConfigError("two members of the group have the same run folder.")


def train_group(
    cfgs: list[TrainConfig],
    *,
    progress: Callable[[str, float], None] | None = None,
    resume: bool = False,
    on_record: Callable[[int, dict], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    on_done: Callable[[int], None] | None = None,
    eval_hooks: list | None = None,
) -> dict:
    """Train every member config (kinds ``sft`` and ``sub``; each with its own ``out``)
    over one base. ``on_record(i, rec)``, ``on_step(i, step, total)`` and ``on_done(i)``
    follow member ``i``. With ``resume`` a member whose adapter exists is done and the
    others continue from their last checkpoints; without, every member starts afresh.
    Raises ``Stopped`` after a stop request (every member's checkpoint saved),
    ``TrainingError`` when a member's loss became non-finite (the others finish first)
    or a save failed. Returns ``{"metrics": [records per member], "seconds", "timings":
    {part: seconds} (steps, losses, scores, checkpoints, adapters, setup), "real_tokens":
    the share of the shared batches' positions that are tokens, not padding, and
    "real_tokens_alone": that share had each member's micro-batch been padded alone,
    "tokens": the training tokens of every member}``."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    from dtm.store import read_metrics
    from dtm.train import _write_config

    check_members(cfgs)
    t0 = time.perf_counter()
    STEP0.clear()
    TIMER.total.clear()
    loop._STOP.clear()
    progress = progress or (lambda what, frac: None)
    model, tok = load_base(
        cfgs[0].base,
        trust_remote_code=cfgs[0].trust_remote_code,
        allow_pickle=cfgs[0].allow_pickle,
    )
    collate_fn = collate(tok.pad_token_id)
    members: list[Member] = []
    for i, cfg in enumerate(cfgs):
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        progress("encoding rows", i / len(cfgs))
        members.append(Member(f"m{i:03d}", cfg, out, *loop.encode_run_rows(cfg, tok)))
    loras = [loop.lora_config(m.cfg, model) for m in members]  # targets of the plain base
    for i, (m, lora) in enumerate(zip(members, loras, strict=True)):
        # The LoRA init of each adapter comes from its own seed, as in its separate run.
        set_seed(m.cfg.seed)
        if i == 0:
            model = get_peft_model(model, lora, adapter_name=m.name)
        else:
            model.add_adapter(m.name, lora)
    model.base_model.set_adapter([m.name for m in members])  # every adapter trainable
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    routing = Routing()
    route(model, routing)
    autocast = _autocast(device)
    set_seed(cfgs[0].seed)
    named = dict(model.named_parameters())
    for i, m in enumerate(members):
        _setup_member(m, model, named, routing, tok, on_record, i, hooks=eval_hooks)
        if resume and (m.out / "adapter" / "adapter_model.safetensors").exists():
            m.state = "done"
            m.log.records[:] = read_metrics(m.out / "metrics.jsonl")
            continue
        _start(m, model, resume)
    ctx = _Group(model, routing, members, collate_fn, device, autocast, progress, on_step)
    with torch.no_grad():
        ctx.evaluate([m for m in members if m.state == "training" and not m.log.records])
    failures: list[str] = []
    while True:
        active = [m for m in members if m.state == "training"]
        if not active:
            break
        ctx.micro_step(active)
        for m in active:
            if m.state == "failed":
                failures.append(f"member {m.cfg.out}: {m.error}")
        trained = [m for m in members if m.state == "trained"]
        if trained:  # their adapters now (those done at the same step share the Fisher)
            ctx.write_adapters(trained)
            for m in trained:
                _write_config(m.cfg, m.out, _resolved(m))
                m.state = "done"
                if on_done:
                    on_done(members.index(m))
        if loop._STOP.is_set():
            ctx.stop_at_boundaries()
    stopped = [m for m in members if m.state == "stopped"]
    if failures:
        raise TrainingError("; ".join(failures))
    if stopped:
        saved = ", ".join(str(last_checkpoint(m.ckpt_dir)) for m in stopped)
        raise Stopped(f"stopped on request; saved {saved}.")
    seconds = time.perf_counter() - t0
    timings = {k: round(v, 2) for k, v in TIMER.total.items()}
    timings["setup"] = round(seconds - sum(TIMER.total.values()), 2)
    return {
        "metrics": [m.log.records for m in members],
        "seconds": round(seconds, 2),
        "timings": timings,
        "real_tokens": round(ctx.real / max(1, ctx.padded), 3),
        "real_tokens_alone": round(ctx.real / max(1, ctx.alone), 3),
        "tokens": ctx.real,
    }


def _resolved(m: Member) -> dict:
    return {
        "resolved_steps": m.steps,
        "save_every": m.save_every,
        "train_rows": len(m.train_rows),
        "val_rows": len(m.val_rows),
        "reference": None,
        "trained_together": True,
    }


def _autocast(device: str):
    import contextlib

    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _setup_member(m: Member, model, named, routing, tok, on_record, i, hooks=None) -> None:
    """The member's steps, arguments, optimizer, schedule and metrics logger, as
    ``loop.run_one`` and the Trainer make them for a separate run."""
    from transformers import Trainer, get_scheduler
    from transformers.trainer_pt_utils import get_parameter_names

    from dtm.train import hook_for

    cfg = m.cfg
    m.steps = cfg.steps or max(1, math.ceil(len(m.train_rows) * cfg.epochs / cfg.batch_size))
    m.save_every = cfg.save_every or max(cfg.log_every, m.steps // 10)
    m.args = loop.training_arguments(cfg, m.steps, m.save_every, m.ckpt_dir)
    mine = [(n, p) for n, p in named.items() if f".{m.name}." in n and p.requires_grad]
    m.params = [p for _, p in mine]
    decay = set(get_parameter_names(model, [], ["bias", "layernorm", "rmsnorm"]))
    groups = [
        {"params": [p for n, p in mine if n in decay], "weight_decay": m.args.weight_decay},
        {"params": [p for n, p in mine if n not in decay], "weight_decay": 0.0},
    ]
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(m.args, model)
    m.optimizer = opt_cls(groups, **opt_kwargs)
    m.scheduler = get_scheduler(
        m.args.lr_scheduler_type,
        optimizer=m.optimizer,
        num_warmup_steps=m.args.get_warmup_steps(m.steps),
        num_training_steps=m.steps,
        scheduler_specific_kwargs=m.args.lr_scheduler_kwargs,
    )
    hook = hooks[i] if hooks is not None else hook_for(cfg)
    view = MemberView(model, routing, m.name)

    def member_hook(_view, tok_, step, hook=hook):
        # At step 0 every adapter's B is zero, so every member is the base model: the
        # scores of one member stand for all members that ask for the same tasks.
        key = (cfg.eval_lab, tuple(cfg.eval_tasks), cfg.tasks_dir) if hooks is None else id(hook)
        if step == 0 and key in STEP0:
            return copy.deepcopy(STEP0[key])
        saved = routing.segments
        routing.only(m.name)
        try:
            with TIMER("scores"):
                res = hook(model, tok_, step)
        finally:
            routing.segments = saved
        if step == 0:
            STEP0[key] = copy.deepcopy(res)
        return res

    run = loop.Run(view, tok, m.train_rows, m.val_rows, m.probe_rows, None, None, None)
    eval_every = cfg.eval_every or cfg.log_every
    record_cb = (lambda rec: on_record(i, rec)) if on_record else None
    m.log = loop.MetricsLogger(
        run, m.out, m.steps, [], member_hook if hook else None, eval_every, record_cb
    )


def _start(m: Member, model, resume: bool) -> None:
    """From scratch, or (``resume``) from the member's last checkpoint: its adapter
    weights, optimizer, schedule and step; ``metrics.jsonl`` cut back to that step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt, records = loop.start_point(m.out, m.ckpt_dir, resume)
    m.log.records[:] = records
    # the loss of a step is over the tokens its rows predict (the Trainer's num_items)
    m.targets = [sum(1 for x in r["labels"][1:] if x != -100) for r in m.train_rows]
    m.plan = step_plan(
        len(m.train_rows),
        m.cfg.seed,
        m.cfg.micro_batch_size,
        max(1, m.cfg.batch_size // m.cfg.micro_batch_size),
        m.steps,
    )
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        weights = load_file(ckpt / "adapter_model.safetensors")
        set_peft_model_state_dict(model, weights, adapter_name=m.name)
        m.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        m.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        m.global_step = m.last_logged = int(state["global_step"])
        m.epoch = float(state.get("epoch") or 0.0)
        for _ in range(m.global_step):
            next(m.plan)
    m.tr_loss = torch.zeros(())


class _Group:
    """The shared passes: training micro-steps, evaluations, checkpoints, the Fisher."""

    def __init__(self, model, routing, members, collate_fn, device, autocast, progress, on_step):
        self.model, self.routing, self.members = model, routing, members
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
        with TIMER("steps"):
            self._micro_step(active)

    def _micro_step(self, active: list[Member]) -> None:
        import torch

        for m in active:
            if not m.pending:
                m.epoch_next, m.pending = next(m.plan)
                m.num_items = sum(m.targets[i] for mb in m.pending for i in mb)
                m.log.step_begin()
        parts = [(m.name, [m.train_rows[i] for i in m.pending[0]]) for m in active]
        batch, segs = self._batch(parts)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.alone += sum(len(rs) * max(len(r["input_ids"]) for r in rs) for _, rs in parts)
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
            total = loss if total is None else total + loss
        if total is not None:
            total.backward()
        for m in active:
            if m.state != "training":
                continue
            m.pending.pop(0)
            if not m.pending:
                self._optimizer_step(m)

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
            with TIMER("losses"):
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
        with TIMER("checkpoints"):
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
            import shutil

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
        with TIMER("adapters"):
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
