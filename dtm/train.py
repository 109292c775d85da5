"""LoRA supervised fine-tuning of a ``transformers`` causal LM on the ``transformers``
Trainer with a peft adapter: vanilla SFT (``kind="sft"``, all data), a DTM sub-model
(``"sub"``, one cluster of a saved assignment) and the paper's baselines (``"soup"``,
``"l2"``, ``"ewc"``, ``"replay"``; see ``dtm.baselines``).

The loss is on response tokens only (prompt tokens get label -100, as in the paper's
code). Prompts use the model's chat template when it has one, else an Alpaca template.
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

Defaults are the paper's released command: LoRA r=16, alpha=16, dropout 0.05 on
``gate_proj, up_proj, down_proj``; lr 3e-4, cosine with warmup, AdamW (0.9, 0.98), eps
1e-6, no weight decay, max grad norm 0.3, 1 epoch, effective batch 16, max length 1024.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dtm.errors import ConfigError, DTMError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Response:\n"
)


@dataclass
class TrainConfig:
    """One LoRA SFT run. Every field can be set from the CLI or an experiment file."""

    base: str = field(metadata={"help": "model folder or hub id"})
    data: str = field(metadata={"help": "instruction data file"})
    out: str = field(metadata={"help": "run folder"})
    kind: str = "sft"
    val_data: str | None = field(
        default=None, metadata={"help": "held-out file; else a split of data"}
    )
    val_fraction: float = 0.05
    assignments: str | None = None
    cluster: int | None = None
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    epochs: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    lr: float = 3e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    batch_size: int = 16
    micro_batch_size: int = 16
    max_length: int = 1024
    log_every: int = 10
    probe_size: int = 64
    seed: int = 0
    members: int = field(default=4, metadata={"help": "soup: members, seeds seed..seed+n-1"})
    l2_weight: float = field(default=1.0, metadata={"help": "l2: weight of ||delta W||^2"})
    ewc_weight: float = field(default=1.0, metadata={"help": "ewc: weight of F * delta W^2"})
    reference: str | None = field(
        default=None, metadata={"help": "ewc/replay corpus; default: the lab's pretraining text"}
    )
    reference_size: int = field(default=256, metadata={"help": "ewc: documents for the Fisher"})
    fisher_size: int = field(default=128, metadata={"help": "sub: rows for the adapter Fisher"})
    save_every: int | None = field(
        default=None, metadata={"help": "checkpoint interval in steps (default: ~10 per run)"}
    )
    keep_checkpoints: int = 2
    eval_lab: str | None = field(
        default=None, metadata={"help": "a lab folder: score its benchmarks during training"}
    )
    eval_every: int | None = field(
        default=None, metadata={"help": "steps between benchmark scores (default: log_every)"}
    )
    trust_remote_code: bool = False
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "load a base model that has only pickle (.bin) weights"},
    )


KINDS = ("sft", "sub", "soup", "l2", "ewc", "replay")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first bad value."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"kind {cfg.kind!r}: choose one of {', '.join(KINDS)}.")
    positive = ["lora_r", "lora_alpha", "batch_size", "micro_batch_size", "max_length"]
    positive += ["log_every", "probe_size", "keep_checkpoints"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(cfg, name)}.")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size}."
        )
    if cfg.steps is not None and cfg.steps < 1:
        raise ConfigError(f"steps must be at least 1, not {cfg.steps}.")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be a positive number, not {cfg.lr}.")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), not {cfg.lora_dropout}.")
    if cfg.kind == "soup" and cfg.members < 2:
        raise ConfigError(f"soup needs at least 2 members, not {cfg.members}.")
    if cfg.kind == "sub" and (cfg.assignments is None or cfg.cluster is None):
        raise ConfigError("kind 'sub' needs --assignments and --cluster.")
    if cfg.kind in ("ewc", "replay"):
        from dtm.baselines import default_reference

        if not (cfg.reference or default_reference(cfg.base)):
            raise ConfigError(
                f"kind {cfg.kind!r} needs a reference corpus (--reference FILE); only a lab "
                "base model has a default one."
            )


PICKLE_FLAG = "--allow-pickle-weights"


def check_base_path(name: str, *, allow_pickle: bool = False) -> None:
    """Raise ConfigError when ``name`` is a local path that is not a loadable model
    folder (a hub id is not checked here). Pickle-only weights are refused unless
    ``allow_pickle``."""
    path = Path(name).expanduser()
    if not path.exists() and name.startswith(("/", ".", "~")):
        raise ConfigError(f"{name}: no such model folder.")
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{name}: not a model folder (a file, not a folder with config.json).")
    if not (path / "config.json").exists():
        raise ConfigError(f"{name}: not a model folder (no config.json).")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if not pickles:
        raise ConfigError(f"{name}: no model weights (no *.safetensors or *.bin file).")
    if not allow_pickle:
        raise ConfigError(
            f"{name}: no *.safetensors weights, only pickle weights ({', '.join(pickles[:3])}). "
            "Pickle weights (.bin) are not loaded unless you allow it, since a pickle can run "
            f"code: add {PICKLE_FLAG} (allow_pickle: true in a config file) if you trust "
            "this folder, or convert it with save_pretrained(safe_serialization=True)."
        )


def load_base(name: str, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) from a folder or hub id, with a clear error when it is not one.
    Weights load from safetensors only, unless ``allow_pickle`` (then pickle weights load
    through ``torch.load(weights_only=True)``, which refuses arbitrary objects)."""
    import pickle

    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_base_path(name, allow_pickle=allow_pickle)
    path = Path(name).expanduser()
    pickle_only = path.is_dir() and not any(path.glob("*.safetensors"))
    weights = (
        {"use_safetensors": False, "weights_only": True}
        if allow_pickle and pickle_only
        else {"use_safetensors": True}
    )
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, **weights
        )
    except pickle.UnpicklingError as e:  # weights_only=True met more than tensors
        raise ConfigError(
            f"{name}: its pickle weights hold more than tensors and were refused, even with "
            f"{PICKLE_FLAG} (loading them could run code): {str(e).splitlines()[0][:200]}"
        ) from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot load the model {name!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def encode_rows(table: pd.DataFrame, tokenizer, max_length: int) -> list[dict]:
    """Token ids and labels (prompt masked to -100) for each row of the data table."""
    from dtm.data import prompt_text

    prompts = prompt_text(table).tolist()
    out = []
    for prompt, response, system in zip(prompts, table["response"], table["system"], strict=True):
        if tokenizer.chat_template:
            msgs = [{"role": "system", "content": system}] if system else []
            msgs.append({"role": "user", "content": prompt})
            p_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            full = tokenizer.apply_chat_template(
                msgs + [{"role": "assistant", "content": response}], tokenize=True
            )
            if hasattr(p_ids, "input_ids"):
                p_ids, full = p_ids["input_ids"], full["input_ids"]
            if full[: len(p_ids)] != p_ids:  # template re-tokenises the prompt: fall back
                p_ids = full[: len(p_ids)]
        else:
            text = ALPACA_PROMPT.format(instruction=prompt)
            p_ids = tokenizer(text)["input_ids"]
            full = (
                p_ids
                + tokenizer(response, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]
            )
        full = list(full)[:max_length]
        labels = [-100] * min(len(p_ids), len(full)) + full[len(p_ids) :]
        out.append({"input_ids": full, "labels": labels})
    return out


def collate(pad_id: int):
    import torch

    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n] = torch.tensor(b["input_ids"])
            labels[r, :n] = torch.tensor(b["labels"])
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def _split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    from dtm.data import load_instructions

    table = load_instructions(cfg.data, count_tokens=False).table
    if cfg.kind == "sub":
        try:
            asg = pd.read_csv(cfg.assignments, dtype={"id": str})
        except (OSError, ValueError) as e:
            raise ConfigError(f"--assignments {cfg.assignments}: cannot read it ({e}).") from e
        if not {"id", "cluster"} <= set(asg.columns):
            raise ConfigError(
                f"{cfg.assignments}: needs the columns id and cluster "
                "(the assignments.csv of `dtm disperse`)."
            )
        if asg.empty:
            raise ConfigError(f"{cfg.assignments}: no rows under its header.")
        if not set(table["id"]) >= set(asg["id"]):
            raise ConfigError(
                f"{cfg.assignments}: its ids are not rows of {cfg.data} "
                "(an assignment of another dataset?)."
            )
        clusters = pd.to_numeric(asg["cluster"], errors="coerce")
        bad = asg.index[clusters.isna() | (clusters % 1 != 0) | (clusters < 0)]
        if len(bad):
            raise ConfigError(
                f"{cfg.assignments}: line {int(bad[0]) + 2}: cluster "
                f"{asg['cluster'].iloc[bad[0]]!r} is not a cluster number (0, 1, ...)."
            )
        k = int(clusters.max()) + 1
        if not 0 <= cfg.cluster < k:
            raise ConfigError(
                f"cluster {cfg.cluster} is out of range: the assignment has clusters 0..{k - 1}."
            )
        keep = set(asg.loc[clusters == cfg.cluster, "id"])
        table = table[table["id"].isin(keep)].reset_index(drop=True)
    if cfg.val_data:
        return table, load_instructions(cfg.val_data, count_tokens=False).table
    rng = np.random.default_rng(cfg.seed)
    val_idx = rng.choice(len(table), max(1, int(len(table) * cfg.val_fraction)), replace=False)
    is_val = np.zeros(len(table), bool)
    is_val[val_idx] = True
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


class TrainingError(DTMError):
    """The run could not go on (a non-finite loss, a failed save); the message says
    what was kept."""


class Stopped(DTMError):
    """The run stopped on request after saving a checkpoint; it can be resumed."""

    exit_code = 3


def run_id(cfg: TrainConfig) -> str:
    """A stable id for a configuration (its run folder does not count)."""
    from dtm.store import input_key

    # allow_pickle is a permission, not a parameter of the run: it does not change the id
    values = {k: v for k, v in asdict(cfg).items() if k not in ("out", "allow_pickle")}
    return input_key("run", values)


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
    from dtm.train_loop import run_one

    check_config(cfg)
    check_base_path(cfg.base, allow_pickle=cfg.allow_pickle)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give a run folder.")
    if cfg.eval_lab and eval_hook is None:
        eval_hook = lab_eval_hook(cfg.eval_lab)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.kind != "soup":
        res = run_one(cfg, out, eval_hook, progress, resume, on_record, on_step)
        _write_config(cfg, out, res["resolved"])
        return {**res, "seconds": round(time.perf_counter() - t0, 2)}
    # Uniform Soup: members on all data with seeds seed..seed+n-1, merged with equal
    # weights exactly (dtm.merge); a finished member is not trained again on resume.
    from dtm.merge import linear_concat

    records: list[dict] = []
    members = []
    for i in range(cfg.members):
        mcfg = replace(cfg, kind="sft", seed=cfg.seed + i, out=str(out / "members" / str(i)))
        mout = Path(mcfg.out)

        def tag(rec: dict, i: int = i) -> None:
            rec["member"] = i
            if on_record:
                on_record(rec)

        def step_cb(step: int, total: int, i: int = i) -> None:
            if on_step:
                on_step(i * total + step, cfg.members * total)

        if (mout / "adapter" / "adapter_model.safetensors").exists():
            recs = read_metrics(mout / "metrics.jsonl")
        else:
            res = run_one(mcfg, mout, eval_hook, progress, resume, tag, step_cb)
            _write_config(mcfg, mout, res["resolved"])
            recs = res["metrics"]
        records += [dict(r, member=i) for r in recs]
        members.append(mout / "adapter")
    from dtm.store import write_text_atomic

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


def lab_eval_hook(lab: str | Path) -> Callable[[Any, Any, int], dict]:
    from dtm.evaluate import evaluate_lab

    bench = Path(lab) / "benchmarks"
    if not bench.is_dir():
        raise ConfigError(f"eval_lab {lab}: no benchmarks/ folder (not a lab).")
    return lambda model, tok, step: evaluate_lab(model, tok, bench)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed writer) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def publish_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a private folder beside ``final``, then rename it into
    place. On failure nothing named ``final`` is created; an older ``final`` is replaced
    only once the new one is complete."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except DTMError:  # the writer's own clear message (e.g. a missing input file)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # OSError, or a safetensors write error wrapping one
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not save {final}: {e}") from e
    return final


def _write_config(cfg: TrainConfig, out: Path, extra: dict) -> None:
    from dtm.store import write_text_atomic

    resolved = {**asdict(cfg), **extra, "run_id": run_id(cfg)}
    write_text_atomic(out / "config.json", json.dumps(resolved, indent=2, default=list) + "\n")
