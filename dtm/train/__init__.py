"""LoRA supervised fine-tuning of a ``transformers`` causal LM on the ``transformers``
Trainer with a peft adapter: vanilla SFT (``kind="sft"``, all data), a DTM sub-model
(``"sub"``, one cluster of a saved assignment) and the paper's baselines (``"soup"``,
``"l2"``, ``"ewc"``, ``"replay"``; see ``dtm.baselines``). The pieces:

- ``config``: ``TrainConfig`` (every field with its help), the ``KINDS`` table, the flags;
- ``rows``: data table -> masked token rows, batches, the train/validation split;
- ``loop``: one run on the Trainer (setup, arguments, the metrics logger, recovery).

Every ``log_every`` steps ``metrics.jsonl`` (and the registry, when the run is a job) gets
one JSON object with ``step``, ``epoch``, ``lr``, ``train_loss`` (running), ``val_loss``
(held-out split), ``probe_loss`` (a fixed subset of the training rows), ``loss_ratio`` =
(probe_loss at step 0 - probe_loss) / (val_loss at step 0 - val_loss): the pilot study's
delta L_train / delta L_val, ``loss_ratio_interval`` (the same over the last interval
only), ``tokens_per_s``, ``mem_mb`` and ``seconds``. An ``eval_hook(model, tokenizer,
step)`` (or ``eval_lab``) adds benchmark scores at chosen steps: the alignment-tax curve.

Run folder: ``adapter/`` (peft, safetensors; a ``sub`` run adds ``fisher.safetensors``,
the diagonal Fisher of its LoRA parameters on its cluster), ``checkpoints/checkpoint-N/``
(adapter + optimizer state; resumable), ``metrics.jsonl``, ``config.json``. The adapter
folder appears by one rename, so a failed save never leaves one that looks complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError, Stopped, TrainingError
from dtm.models import check_base_path
from dtm.store import read_metrics, write_text_atomic
from dtm.train.config import BASELINES, KINDS, TrainConfig, check_config, run_id, write_config
from dtm.train.group import train_group
from dtm.train.loop import request_stop, run_one
from dtm.train.rows import assignment_clusters, collate, encode_rows

__all__ = [
    "BASELINES",
    "KINDS",
    "Stopped",
    "TrainConfig",
    "TrainingError",
    "check_config",
    "collate",
    "encode_rows",
    "read_metrics",
    "request_stop",
    "run_folder",
    "run_id",
    "train",
]


def train(
    cfg: TrainConfig,
    eval_hook: Callable[[Any, Any, int], dict] | None = None,
    progress: Callable[[str, float], None] | None = None,
    *,
    resume: bool = False,
    on_record: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    hook_for: Callable[[TrainConfig], Any] | None = None,
    select_rows: Callable[..., Any] | None = None,
) -> dict:
    """Run ``cfg`` (any kind but ``soup``, whose members and average are
    ``dtm.jobs.runner``'s). ``resume`` continues from the last checkpoint in
    ``out/checkpoints`` (from scratch when there is none). ``on_record(rec)`` sees each
    metrics record, ``on_step(step, total)`` each optimizer step. What a run needs from
    above the training loop is passed in: ``eval_hook(model, tokenizer, step)`` scores a
    single run; ``hook_for(member_cfg)`` gives each member of a ``subs`` group its hook;
    ``select_rows(cfg, table, tokenizer, base_model)`` picks a ``curate`` run's rows.
    Raises ``Stopped`` when ``request_stop()`` was called (a checkpoint was saved),
    ``TrainingError`` on a non-finite loss or a failed save. Returns ``{"metrics",
    "seconds", "model", "tokenizer"}``."""
    out = run_folder(cfg)
    if cfg.kind == "subs":  # each member gets its own eval hook
        return train_subs(cfg, progress, resume=resume, hook_for=hook_for)
    if cfg.kind == "soup":
        raise ConfigError("a soup averages SFT runs: train it with dtm.jobs.runner.run_training.")
    if cfg.kind == "curate" and select_rows is None:
        raise ConfigError("kind curate needs its row selection (dtm.jobs.runner.run_training).")
    t0 = time.perf_counter()
    res = run_one(cfg, out, eval_hook, progress, resume, on_record, on_step, select_rows)
    write_config(cfg, out, res["resolved"])
    return {**res, "seconds": round(time.perf_counter() - t0, 2)}


def run_folder(cfg: TrainConfig) -> Path:
    """``cfg`` checked (its settings, its base) and its run folder made; returns it."""
    check_config(cfg)
    check_base_path(cfg.base, allow_pickle=cfg.allow_pickle)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give a run folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def group_members(cfg: TrainConfig) -> list[TrainConfig]:
    """The members of a ``subs`` run: one ``sub`` config per chosen cluster, in
    ``out/cluster-<k>``, then (``with_sft``) vanilla SFT on all rows in ``out/sft``."""
    k = assignment_clusters(cfg)
    if cfg.clusters.strip() == "all":
        chosen = list(range(k))
    else:
        chosen = []
        for part in cfg.clusters.split(","):
            if not part.strip().isdigit() or not 0 <= int(part) < k:
                raise ConfigError(
                    f"--clusters {cfg.clusters}: {part.strip()!r} is not a cluster of "
                    f"{cfg.assignments} (0..{k - 1}); give all or numbers like 0,2."
                )
            if int(part) not in chosen:
                chosen.append(int(part))
    out = Path(cfg.out)
    plain = {"clusters": "all", "with_sft": False}
    members = [
        replace(cfg, kind="sub", cluster=c, out=str(out / f"cluster-{c}"), **plain) for c in chosen
    ]
    if cfg.with_sft:
        members.append(
            replace(cfg, kind="sft", cluster=None, assignments=None, out=str(out / "sft"), **plain)
        )
    return members


def train_subs(cfg: TrainConfig, progress=None, *, resume: bool = False, hook_for=None) -> dict:
    """A ``subs`` run: its members (``group_members``) trained together over one base
    (``dtm.train.group``); ``out/group.json`` lists their folders."""
    members = group_members(cfg)
    for m in members:
        check_config(m)
    write_text_atomic(
        Path(cfg.out) / "group.json",
        json.dumps({"run_id": run_id(cfg), "members": [m.out for m in members]}, indent=2) + "\n",
    )
    res = train_group(members, progress=progress, resume=resume, hook_for=hook_for)
    return {**res, "members": [m.out for m in members]}
