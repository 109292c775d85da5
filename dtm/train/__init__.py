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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError, Stopped, TrainingError
from dtm.models import check_base_path, load_base
from dtm.store import publish_dir, read_metrics, write_text_atomic
from dtm.train.config import BASELINES, KINDS, TrainConfig, check_config, run_id, soup_member
from dtm.train.loop import request_stop, run_one
from dtm.train.rows import collate, encode_rows

__all__ = [
    "BASELINES",
    "KINDS",
    "Stopped",
    "TrainConfig",
    "TrainingError",
    "check_config",
    "collate",
    "encode_rows",
    "lab_eval_hook",
    "tasks_eval_hook",
    "read_metrics",
    "request_stop",
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
) -> dict:
    """Run ``cfg``. ``resume`` continues from the last checkpoint in ``out/checkpoints``
    (from scratch when there is none). ``on_record(rec)`` sees each metrics record,
    ``on_step(step, total)`` each optimizer step. Raises ``Stopped`` when
    ``request_stop()`` was called (a checkpoint was saved), ``TrainingError`` on a
    non-finite loss or a failed save. Returns ``{"metrics", "seconds", "model",
    "tokenizer"}``."""
    check_config(cfg)
    check_base_path(cfg.base, allow_pickle=cfg.allow_pickle)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give a run folder.")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "subs":  # each member builds its own eval hook
        return train_subs(cfg, progress, resume=resume)
    if eval_hook is None:
        eval_hook = hook_for(cfg)
    t0 = time.perf_counter()
    if cfg.kind != "soup":
        res = run_one(cfg, out, eval_hook, progress, resume, on_record, on_step)
        _write_config(cfg, out, res["resolved"])
        return {**res, "seconds": round(time.perf_counter() - t0, 2)}
    # Uniform Soup: members on all data with seeds seed..seed+n-1, merged with equal
    # weights exactly (dtm.merge). A member is vanilla SFT with its seed: one finished in
    # the registry (the SFT of an experiment's seed, another soup's member) is used as it
    # is, and a member finished here is not trained again on resume.
    from dtm.merge import linear_concat

    records: list[dict] = []
    members = []
    for i in range(cfg.members):
        mcfg = soup_member(cfg, i, out / "members" / str(i))
        mout = finished_run(mcfg) or Path(mcfg.out)

        def tag(rec: dict, i: int = i) -> None:
            rec["member"] = i
            if on_record:
                on_record(rec)

        def step_cb(step: int, total: int, i: int = i) -> None:
            if on_step:
                on_step(i * total + step, cfg.members * total)

        if (mout / "adapter" / "adapter_model.safetensors").exists():
            recs = read_metrics(mout / "metrics.jsonl")
            for rec in recs:  # its curve and its steps, as if trained here
                tag(dict(rec))
            done = max((r["step"] for r in recs), default=0)
            step_cb(done, done)
        else:
            res = run_one(mcfg, mout, eval_hook, progress, resume, tag, step_cb)
            _write_config(mcfg, mout, res["resolved"])
            recs = res["metrics"]
        records += [dict(r, member=i) for r in recs]
        members.append(mout / "adapter")
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    publish_dir(
        out / "adapter", lambda tmp: linear_concat(members, [1 / cfg.members] * len(members), tmp)
    )
    _write_config(cfg, out, {"members": [str(m) for m in members]})
    model, tok = load_base(
        cfg.base, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle
    )
    from peft import PeftModel

    return {
        "metrics": records,
        "seconds": round(time.perf_counter() - t0, 2),
        "model": PeftModel.from_pretrained(model, out / "adapter"),
        "tokenizer": tok,
    }


def finished_run(cfg: TrainConfig) -> Path | None:
    """The run folder of a finished job in the registry (a group's member too) with
    ``cfg``'s run id and its adapter written; None when there is none, or when ``cfg``
    names a local file by a relative path (the same string may mean another file)."""
    from dtm.jobs.base import JobStore
    from dtm.store import Registry, cache_dir
    from dtm.train.config import read_config

    if not (cache_dir() / "registry.sqlite").is_file():  # no registry: nothing to find
        return None
    for value in (cfg.base, cfg.data, cfg.val_data, cfg.reference):
        if value and not Path(value).is_absolute() and Path(value).exists():
            return None  # a relative path means another file in another folder: train
    want = run_id(cfg)
    for job in JobStore(Registry()).list(states=("done",)):
        if job.kind != cfg.kind or job.config.get("seed") != cfg.seed:
            continue
        try:
            same = run_id(read_config(job.config)) == want
        except (ConfigError, TypeError):  # a row written by another version of the config
            continue
        if same and (job.run_dir / "adapter" / "adapter_model.safetensors").is_file():
            return job.run_dir
    return None


def hook_for(cfg: TrainConfig) -> Callable[[Any, Any, int], dict] | None:
    """The eval hook ``cfg`` asks for: its ``eval_tasks``, else its lab's benchmarks."""
    if cfg.eval_tasks:
        return tasks_eval_hook(cfg)
    if cfg.eval_lab:
        return lab_eval_hook(cfg.eval_lab)
    return None


def group_members(cfg: TrainConfig) -> list[TrainConfig]:
    """The members of a ``subs`` run: one ``sub`` config per chosen cluster, in
    ``out/cluster-<k>``, then (``with_sft``) vanilla SFT on all rows in ``out/sft``."""
    from dtm.train.rows import assignment_clusters

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


def train_subs(cfg: TrainConfig, progress=None, *, resume: bool = False) -> dict:
    """A ``subs`` run: its members (``group_members``) trained together over one base
    (``dtm.train.group``); ``out/group.json`` lists their folders."""
    from dtm.train.group import train_group

    members = group_members(cfg)
    for m in members:
        check_config(m)
    write_text_atomic(
        Path(cfg.out) / "group.json",
        json.dumps({"run_id": run_id(cfg), "members": [m.out for m in members]}, indent=2) + "\n",
    )
    res = train_group(members, progress=progress, resume=resume)
    return {**res, "members": [m.out for m in members]}


def lab_eval_hook(lab: str | Path) -> Callable[[Any, Any, int], dict]:
    from dtm.evaluate import evaluate_lab

    bench = Path(lab) / "benchmarks"
    if not bench.is_dir():
        raise ConfigError(f"eval_lab {lab}: no benchmarks/ folder (not a lab).")
    return lambda model, tok, step: evaluate_lab(model, tok, bench)


def tasks_eval_hook(cfg: TrainConfig) -> Callable[[Any, Any, int], dict]:
    """Scores ``cfg.eval_tasks`` (lab tasks and ``cfg.tasks_dir``'s) with the quick engine."""
    from dtm.evaluate import evaluate

    tasks = list(cfg.eval_tasks)
    return lambda model, tok, step: evaluate(
        model, tok, tasks, engine="quick", lab=cfg.eval_lab, tasks_dir=cfg.tasks_dir
    )


def _write_config(cfg: TrainConfig, out: Path, extra: dict) -> None:
    resolved = {**asdict(cfg), **extra, "run_id": run_id(cfg)}
    write_text_atomic(out / "config.json", json.dumps(resolved, indent=2, default=list) + "\n")
