"""One member of a group run (``dtm.train.group``): its state, and how it is set up and
started as ``dtm.train.loop`` and the Trainer set up a separate run."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm.train import loop
from dtm.train.config import TrainConfig
from dtm.train.order import step_plan
from dtm.train.records import MetricsLogger
from dtm.train.routing import MemberView
from dtm.train.setup import Run

EVAL_BATCH = 64  # the Trainer's per_device_eval_batch_size in dtm.train.loop
EVAL_ROWS = 128  # rows per shared eval forward (members' batches packed together)


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
    micro: int = 0  # the micro-batch it runs at (smaller after an out-of-memory error)
    step_rows: list = field(default_factory=list)  # this step's rows, by micro-batch
    step_start: tuple = ()  # (train loss, tokens, positions) when this step began
    halved: list = field(default_factory=list)  # its out-of-memory splits (dtm.train.oom)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup_member(
    m: Member, model, named, routing, tok, on_record, i, *, hooks, hook_for, step0, timer, dtype
) -> None:
    """The member's steps, arguments, optimizer, schedule and metrics logger, as
    ``loop.run_one`` and the Trainer make them for a separate run."""
    from transformers import Trainer, get_scheduler  # lazy: transformers
    from transformers.trainer_pt_utils import get_parameter_names

    cfg = m.cfg
    m.steps = cfg.steps or max(1, math.ceil(len(m.train_rows) * cfg.epochs / cfg.batch_size))
    m.save_every = cfg.save_every or max(cfg.log_every, m.steps // 10)
    m.args = loop.training_arguments(cfg, m.steps, m.save_every, m.ckpt_dir, dtype)
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
    if hooks is not None:
        hook = hooks[i]
    else:
        hook = hook_for(cfg) if hook_for else None
    view = MemberView(model, routing, m.name)

    def member_hook(_view, tok_, step, hook=hook):
        # At step 0 every adapter's B is zero, so every member is the base model: the
        # scores of one member stand for all members that ask for the same tasks.
        key = (cfg.eval_lab, tuple(cfg.eval_tasks), cfg.tasks_dir) if hooks is None else id(hook)
        if step == 0 and key in step0:
            return copy.deepcopy(step0[key])
        saved = routing.segments
        routing.only(m.name)
        try:
            with timer("scores"):
                res = hook(model, tok_, step)
        finally:
            routing.segments = saved
        if step == 0:
            step0[key] = copy.deepcopy(res)
        return res

    run = Run(view, tok, m.train_rows, m.val_rows, m.probe_rows, None, None, None)
    eval_every = cfg.eval_every or cfg.log_every
    record_cb = (lambda rec: on_record(i, rec)) if on_record else None
    m.log = MetricsLogger(
        run, m.out, m.steps, [], member_hook if hook else None, eval_every, record_cb
    )


def start_member(m: Member, model, resume: bool, by_length: bool = False) -> None:
    """From scratch, or (``resume``) from the member's last checkpoint: its adapter
    weights, optimizer, schedule and step; ``metrics.jsonl`` cut back to that step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt, records = loop.start_point(m.out, m.ckpt_dir, resume)
    m.log.records[:] = records
    # the loss of a step is over the tokens its rows predict (the Trainer's num_items)
    m.targets = [sum(1 for x in r["labels"][1:] if x != -100) for r in m.train_rows]
    m.micro = m.cfg.micro_batch_size
    m.plan = step_plan(
        [len(r["input_ids"]) for r in m.train_rows],
        m.cfg.seed,
        m.cfg.micro_batch_size,
        max(1, m.cfg.batch_size // m.cfg.micro_batch_size),
        m.steps,
        by_length,
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
