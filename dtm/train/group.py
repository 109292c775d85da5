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

- data order: ``dtm.train.order.step_plan``, the order the Trainer draws (its seeded
  shuffle, or length-grouped batches), in micro-batches, ``accum`` to a step (the last
  step of an epoch takes what is left);
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError, Stopped, TrainingError
from dtm.store import read_metrics
from dtm.train import loop
from dtm.train.checkpoints import last_checkpoint
from dtm.train.config import TrainConfig, write_config
from dtm.train.member import Member, setup_member, start_member
from dtm.train.memory import resolved
from dtm.train.passes import GroupPasses
from dtm.train.routing import Routing, Timer, route
from dtm.train.rows import collate
from dtm.train.setup import enable_checkpointing, encode_run_rows, load_for_training, lora_config

# what every member must share: one base, loaded once, run one way
SHARED = (
    "base",
    "trust_remote_code",
    "allow_pickle",
    "dtype",
    "attn",
    "gradient_checkpointing",
    "group_by_length",
)


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
    hook_for: Callable[[TrainConfig], Any] | None = None,
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
    import torch  # lazy: torch

    check_members(cfgs)
    t0 = time.perf_counter()
    timer = Timer()  # this group's "timings"
    loop.clear_stop()
    progress = progress or (lambda what, frac: None)
    model, tok, members, routing, choice = _shared_model(cfgs, progress)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    route(model, routing)
    set_seed(cfgs[0].seed)
    named = dict(model.named_parameters())
    step0: dict = {}  # the step-0 scores of this group (see setup_member's hook)
    for i, m in enumerate(members):
        hooks = {"hooks": eval_hooks, "hook_for": hook_for, "step0": step0, "timer": timer}
        setup_member(m, model, named, routing, tok, on_record, i, dtype=choice.dtype, **hooks)
        if resume and (m.out / "adapter" / "adapter_model.safetensors").exists():
            m.state = "done"
            m.log.records[:] = read_metrics(m.out / "metrics.jsonl")
            continue
        start_member(m, model, resume, choice.by_length)
    collate_fn = collate(tok.pad_token_id)
    ctx = GroupPasses(
        model,
        routing,
        members,
        collate_fn,
        device,
        _autocast(device, choice.dtype),
        progress,
        on_step,
        timer,
    )
    ctx.estimate_gib = choice.estimate.gib if choice.estimate else None
    with torch.no_grad():
        ctx.evaluate([m for m in members if m.state == "training" and not m.log.records])
    _train(ctx, members, on_done, resolved(choice, model))
    seconds = time.perf_counter() - t0
    timings = {k: round(v, 2) for k, v in timer.total.items()}
    timings["setup"] = round(seconds - sum(timer.total.values()), 2)
    return {
        "metrics": [m.log.records for m in members],
        "seconds": round(seconds, 2),
        "timings": timings,
        "real_tokens": round(ctx.real / max(1, ctx.padded), 3),
        "real_tokens_alone": round(ctx.real / max(1, ctx.alone), 3),
        "tokens": ctx.real,
    }


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed  # lazy: transformers

    hf_set_seed(seed)


def _shared_model(cfgs: list[TrainConfig], progress) -> tuple:
    """The base with one LoRA adapter per member (each initialised from its own seed, as
    in its separate run), every adapter trainable; the members with their encoded rows."""
    from peft import get_peft_model  # lazy: peft imports torch

    model, tok, choice = load_for_training(cfgs)  # all members' rows in one forward
    members: list[Member] = []
    for i, cfg in enumerate(cfgs):
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        progress("encoding rows", i / len(cfgs))
        members.append(Member(f"m{i:03d}", cfg, out, *encode_run_rows(cfg, tok)))
    loras = [lora_config(m.cfg, model) for m in members]  # targets of the plain base
    for i, (m, lora) in enumerate(zip(members, loras, strict=True)):
        set_seed(m.cfg.seed)
        if i == 0:
            model = get_peft_model(model, lora, adapter_name=m.name)
        else:
            model.add_adapter(m.name, lora)
    model.base_model.set_adapter([m.name for m in members])  # every adapter trainable
    if choice.checkpointing:
        enable_checkpointing(model)
    return model, tok, members, Routing(), choice


def _train(ctx: GroupPasses, members: list[Member], on_done, used: dict) -> None:
    """Micro-steps until every member is done; a trained member's adapter and config are
    written at once. Raises ``TrainingError`` (a member failed) or ``Stopped``."""
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
                write_config(m.cfg, m.out, {**_resolved(m), **used})
                m.state = "done"
                if on_done:
                    on_done(members.index(m))
        if loop.stop_requested():
            ctx.stop_at_boundaries()
    stopped = [m for m in members if m.state == "stopped"]
    if failures:
        raise TrainingError("; ".join(failures))
    if stopped:
        saved = ", ".join(str(last_checkpoint(m.ckpt_dir)) for m in stopped)
        raise Stopped(f"stopped on request; saved {saved}.")


def _resolved(m: Member) -> dict:
    return {
        "resolved_steps": m.steps,
        "save_every": m.save_every,
        "train_rows": len(m.train_rows),
        "val_rows": len(m.val_rows),
        "reference": None,
        "trained_together": True,
        **({"out_of_memory": m.halved, "micro_batch_size_used": m.micro} if m.halved else {}),
    }


def _autocast(device: str, dtype: str):
    """Mixed precision in the resolved ``dtype`` on a GPU (as the Trainer's bf16/fp16)."""
    import torch  # lazy: torch

    if device == "cuda" and dtype in ("bf16", "fp16"):
        half = torch.bfloat16 if dtype == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=half)
    return contextlib.nullcontext
