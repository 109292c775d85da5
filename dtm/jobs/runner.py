"""A training run with what it needs from above the training loop (``dtm.train`` knows
nothing of evaluation, merging, curation or the job registry):

- its eval hook: the quick engine on ``eval_tasks``, or on its lab's benchmarks
  (``eval_lab``): the alignment-tax curve;
- for ``curate``, its row selection (``dtm.curate.curate_rows``);
- for ``soup``, its members (SFT runs with seeds seed..seed+n-1: one finished in the
  registry is used as it is) and their exact average (``dtm.merge``).

``run_training`` is what ``dtm train`` and a job's process run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtm.curate import curate_rows
from dtm.errors import ConfigError
from dtm.evaluate import evaluate, evaluate_lab
from dtm.jobs.base import JobStore
from dtm.merge.lora import linear_concat
from dtm.models import load_base
from dtm.store import Registry, cache_dir, publish_dir, read_metrics, write_text_atomic
from dtm.train import run_folder, train
from dtm.train.config import (
    TrainConfig,
    read_config,
    run_id,
    soup_member,
    write_config,
)
from dtm.train.loop import run_one

Hook = Callable[[Any, Any, int], dict]


def run_training(
    cfg: TrainConfig,
    eval_hook: Hook | None = None,
    progress: Callable[[str, float], None] | None = None,
    *,
    resume: bool = False,
    on_record: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Run ``cfg`` as ``dtm.train.train`` does, with its eval hook (``eval_hook``, else
    the one ``cfg`` asks for), a curate run's selection and a soup's members. Returns
    ``{"metrics", "seconds", "model", "tokenizer"}`` (a group adds ``"members"``)."""
    if cfg.kind != "soup":
        return train(
            cfg,
            eval_hook if eval_hook is not None else hook_for(cfg),
            progress,
            resume=resume,
            on_record=on_record,
            on_step=on_step,
            hook_for=hook_for,
            select_rows=curate_rows if cfg.kind == "curate" else None,
        )
    return train_soup(
        cfg,
        eval_hook or hook_for(cfg),
        progress,
        resume=resume,
        on_record=on_record,
        on_step=on_step,
    )


def train_soup(cfg, eval_hook, progress, *, resume, on_record, on_step) -> dict:
    """Uniform Soup: ``cfg.members`` SFT members on all data with seeds seed..seed+n-1,
    merged with equal weights exactly. A member finished in the registry (the SFT of an
    experiment's seed, another soup's member) is used as it is, and a member finished
    here is not trained again on resume."""
    out = run_folder(cfg)
    t0 = time.perf_counter()
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
            write_config(mcfg, mout, res["resolved"])
            recs = res["metrics"]
        records += [dict(r, member=i) for r in recs]
        members.append(mout / "adapter")
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    publish_dir(
        out / "adapter", lambda tmp: linear_concat(members, [1 / cfg.members] * len(members), tmp)
    )
    write_config(cfg, out, {"members": [str(m) for m in members]})
    model, tok = load_base(
        cfg.base, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle
    )
    from peft import PeftModel  # lazy: peft imports torch

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


def hook_for(cfg: TrainConfig) -> Hook | None:
    """The eval hook ``cfg`` asks for: its ``eval_tasks``, else its lab's benchmarks."""
    if cfg.eval_tasks:
        return tasks_eval_hook(cfg)
    if cfg.eval_lab:
        return lab_eval_hook(cfg.eval_lab)
    return None


def lab_eval_hook(lab: str | Path) -> Hook:
    """Scores a lab's benchmarks (``LAB/benchmarks``) with the quick engine."""
    bench = Path(lab) / "benchmarks"
    if not bench.is_dir():
        raise ConfigError(f"eval_lab {lab}: no benchmarks/ folder (not a lab).")
    return lambda model, tok, step: evaluate_lab(model, tok, bench)


def tasks_eval_hook(cfg: TrainConfig) -> Hook:
    """Scores ``cfg.eval_tasks`` (lab tasks and ``cfg.tasks_dir``'s) with the quick engine."""
    tasks = list(cfg.eval_tasks)
    return lambda model, tok, step: evaluate(
        model, tok, tasks, engine="quick", lab=cfg.eval_lab, tasks_dir=cfg.tasks_dir
    )
