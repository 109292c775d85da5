"""One training run's configuration and the registry of run kinds.

``TrainConfig`` fields carry their help text; ``add_arguments(parser)`` makes the
``dtm train`` flags from them and ``config_from_args(args)`` maps the flags (and an
optional ``--config`` file) back. ``KINDS`` is the one table of run kinds: what data each
trains on, which penalty or corpus it adds, and how many tokens it costs per row of its
data (for the plan's estimate).

Defaults are the paper's released command: LoRA r=16, alpha=16, dropout 0.05 on
``gate_proj, up_proj, down_proj``; lr 3e-4, cosine with warmup, AdamW (0.9, 0.98), eps
1e-6, no weight decay, max grad norm 0.3, 1 epoch, effective batch 16, max length 1024.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dtm.baselines import default_reference
from dtm.errors import ConfigError
from dtm.store import input_key, write_text_atomic
from dtm.tasks import PROBES, TASKS
from dtm.tasks.files import folder_tasks
from dtm.train.memory import ATTNS, CHECKPOINTING, DTYPES, GROUPINGS, check_values


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """One LoRA SFT run. Every field can be set from the CLI, a config file or an
    experiment file."""

    base: str = field(metadata={"help": "model folder or hub id"})
    data: str = field(metadata={"help": "instruction data file (or hub dataset id)"})
    out: str = field(metadata={"help": "run folder"})
    kind: str = _f("sft", "what to train (see KINDS): sft, sub, or a baseline")
    val_data: str | None = _f(None, "held-out data file (default: a split of --data)")
    val_fraction: float = _f(0.05, "share of the rows held out when no --val-data is given")
    assignments: str | None = _f(None, "assignments.csv of a disperse run (kind sub)")
    cluster: int | None = _f(None, "the cluster to train on (kind sub)")
    clusters: str = _f("all", "kind subs: the clusters trained together, all or e.g. 0,2")
    with_sft: bool = _f(False, "kind subs: add vanilla SFT on all rows as one more member")
    steps: int | None = _f(None, "optimizer steps; overrides --epochs", exclusive="budget")
    epochs: float = _f(1.0, "passes over the training rows", exclusive="budget")
    lora_r: int = _f(16, "LoRA rank r")
    lora_alpha: int = _f(16, "LoRA alpha (the delta is scaled by alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input, in [0, 1)")
    target_modules: tuple[str, ...] = _f(
        ("gate_proj", "up_proj", "down_proj"), "comma-separated module names to adapt"
    )
    lr: float = _f(3e-4, "peak learning rate")
    scheduler: str = _f("cosine", "transformers learning-rate schedule (cosine, linear, ...)")
    warmup_ratio: float = _f(0.03, "share of the steps spent warming up the learning rate")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.98, "AdamW beta2")
    adam_epsilon: float = _f(1e-6, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(0.3, "gradient-norm clipping")
    batch_size: int = _f(16, "rows per optimizer step")
    micro_batch_size: int = _f(16, "rows per forward pass (batch_size must be a multiple)")
    max_length: int = _f(1024, "tokens per row; longer rows are cut")
    log_every: int = _f(10, "steps between metrics records (train, probe and val losses)")
    probe_size: int = _f(64, "training rows in the fixed train probe of the loss ratio")
    seed: int = _f(0, "seed of the split, the data order, the probe and LoRA's init")
    members: int = _f(4, "soup: members, trained with seeds seed..seed+n-1")
    l2_weight: float = _f(1.0, "l2: weight of ||delta W||^2")
    ewc_weight: float = _f(1.0, "ewc: weight of F * delta W^2")
    reference: str | None = _f(None, "ewc/replay corpus; default: the lab's pretraining text")
    reference_size: int = _f(256, "ewc: documents for the base model's Fisher")
    fisher_size: int = _f(128, "sub: rows for the adapter Fisher the fisher merge uses")
    curate_budget: str | None = _f(
        None, "curate: rows kept, a count (e.g. 800) or a fraction of the rows (e.g. 0.25)"
    )
    curate_score: str = _f(
        "ifd",
        "curate: the row score: ifd (the base's instruction-following difficulty), "
        "column:NAME (a column of the data), or deita:COMPLEXITY_MODEL,QUALITY_MODEL",
    )
    curate_threshold: float = _f(
        0.9, "curate: a row is kept only if its cosine similarity to every kept row is below"
    )
    experts: int = _f(4, "loramoe: LoRA experts per adapted layer")
    moe_balance: float = _f(0.1, "loramoe: weight of the localized balancing constraint")
    moe_groups: int | None = _f(
        None, "loramoe: experts in the first (world-knowledge) group (default: half)"
    )
    moe_delta: float = _f(0.1, "loramoe: the constraint's group contrast delta, in [0, 1)")
    moe_knowledge_sources: str | None = _f(
        None,
        "loramoe: comma-separated data sources (the rows' source) of the world-knowledge "
        "type, as the paper's CBQA data; every other row is of the task type",
    )
    save_every: int | None = _f(None, "checkpoint interval in steps (default: ~10 per run)")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones are removed)")
    eval_lab: str | None = _f(None, "a lab folder: score its benchmarks during training")
    eval_every: int | None = _f(None, "steps between benchmark scores (default: log_every)")
    eval_tasks: tuple[str, ...] = _f(
        (),
        "comma-separated tasks scored every eval_every steps, the alignment-tax curve: lab "
        "tasks (with --eval-lab) or tasks of --tasks-dir; default with --eval-lab: the lab's",
    )
    tasks_dir: str | None = _f(None, "a folder of lm-evaluation-harness task YAMLs")
    trust_remote_code: bool = _f(
        False, "run the Python code a model folder ships (its auto_map); off by default"
    )
    allow_pickle: bool = _f(
        False,
        "load a base model that has only pickle (.bin) weights (a pickle can run code)",
        flag="--allow-pickle-weights",
    )
    gradient_checkpointing: str = _f(
        "auto",
        "recompute each layer's activations in the backward pass (less memory, ~1/3 more "
        "compute): auto (on when the memory estimate says the run would not fit without "
        "it; off on a CPU), on, off",
        choices=CHECKPOINTING,
    )
    dtype: str = _f(
        "auto",
        "the base's weights and compute: auto (bf16 on a GPU that has it, else fp32), "
        "bf16, fp16, fp32",
        choices=DTYPES,
    )
    attn: str = _f(
        "auto",
        "attention implementation: auto (on a GPU flash_attention_2 when installed, else "
        "sdpa; on a CPU the default transformers picks), sdpa, flash_attention_2, eager",
        choices=ATTNS,
    )
    group_by_length: str = _f(
        "auto",
        "batch rows of about one length together within a seeded shuffle, so little of "
        "a batch is padding: auto (on a GPU; off on a CPU, keeping the lab's data "
        "order), on, off",
        choices=GROUPINGS,
    )


@dataclass(frozen=True)
class Kind:
    """A run kind: ``data`` is ``all`` (every training row) or ``cluster`` (one cluster
    of an assignment); ``tokens`` is the rows trained per row of its data, for the
    estimate (a soup trains its members, replay mixes in as many corpus rows)."""

    name: str
    help: str
    data: str = "all"
    baseline: bool = True
    needs_reference: bool = False
    penalty: str | None = None  # the name of the penalty in dtm.baselines

    def tokens(self, cfg: TrainConfig) -> float:
        return {"soup": cfg.members, "replay": 2}.get(self.name, 1)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("sft", "vanilla SFT on all rows", baseline=False),
        Kind("sub", "a DTM sub-model: one cluster of an assignment", "cluster", False),
        Kind(
            "subs",
            "DTM's sub-models of the chosen clusters (and SFT, with --with-sft) trained "
            "together in one process over one shared base",
            "cluster",
            False,
        ),
        Kind("soup", "K members on all rows with seeds S..S+K-1, merged uniformly"),
        Kind("l2", "SFT plus an L2 penalty on the LoRA delta", penalty="l2"),
        Kind(
            "ewc",
            "SFT plus EWC with the base's Fisher on a corpus",
            needs_reference=True,
            penalty="ewc",
        ),
        Kind("replay", "SFT with the reference corpus mixed in 1:1", needs_reference=True),
        Kind(
            "curate",
            "SFT on a selected subset (Deita-style: score first, then diversity by "
            "embedding cosine)",
        ),
        Kind(
            "loramoe",
            "LoRA experts with a token-level router and the localized balancing "
            "constraint (Dou et al. 2023); cannot be merged into the base",
        ),
    )
}
BASELINES = tuple(k for k, v in KINDS.items() if v.baseline)
# The fields only one kind reads, with their defaults (any other kind refuses another value)
KIND_FIELDS = {
    kind: {f.name: f.default for f in fields(TrainConfig) if f.name in names}
    for kind, names in {
        "curate": ("curate_budget", "curate_score", "curate_threshold"),
        "loramoe": ("experts", "moe_balance", "moe_groups", "moe_delta", "moe_knowledge_sources"),
    }.items()
}


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
    check_values(cfg)
    kind = KINDS[cfg.kind]
    if cfg.kind == "soup" and cfg.members < 2:
        raise ConfigError(f"soup needs at least 2 members, not {cfg.members}.")
    if cfg.kind == "subs":
        if cfg.assignments is None:
            raise ConfigError("kind 'subs' needs --assignments.")
        if cfg.cluster is not None:
            raise ConfigError("kind 'subs' takes --clusters (all or 0,2,...), not --cluster.")
    elif kind.data == "cluster" and (cfg.assignments is None or cfg.cluster is None):
        raise ConfigError(f"kind {cfg.kind!r} needs --assignments and --cluster.")
    elif cfg.clusters != "all" or cfg.with_sft:
        raise ConfigError(f"--clusters and --with-sft are for kind 'subs', not {cfg.kind!r}.")
    if cfg.eval_tasks:
        check_eval_tasks(cfg)
    check_curate(cfg)
    check_loramoe(cfg)
    if kind.needs_reference:
        if not (cfg.reference or default_reference(cfg.base)):
            raise ConfigError(
                f"kind {cfg.kind!r} needs a reference corpus (--reference FILE); only a lab "
                "base model has a default one."
            )


def curate_budget(cfg: TrainConfig, n_rows: int | None = None) -> int | float:
    """``--curate-budget`` as a row count (int) or a fraction in (0, 1] (float); with
    ``n_rows``, checked against the data and returned as a count."""
    raw = str(cfg.curate_budget).strip()
    try:
        value: int | float = int(raw) if raw.isdigit() else float(raw)
    except ValueError:
        raise ConfigError(
            f"--curate-budget {raw}: give a row count (e.g. 800) or a fraction (e.g. 0.25)."
        ) from None
    if isinstance(value, float) and not 0 < value <= 1:
        raise ConfigError(f"--curate-budget {raw}: a fraction is in (0, 1].")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"--curate-budget {raw}: keep at least 1 row.")
    if n_rows is None:
        return value
    if isinstance(value, float):
        return max(1, round(value * n_rows))
    if value > n_rows:
        raise ConfigError(
            f"--curate-budget {value} is larger than the data: {cfg.data} has {n_rows} "
            "training rows."
        )
    return value


def _only_for(cfg: TrainConfig, kind: str) -> None:
    """A ConfigError when ``cfg`` (of another kind) sets a field only ``kind`` reads."""
    for name, default in KIND_FIELDS[kind].items():
        if getattr(cfg, name) != default:
            raise ConfigError(f"--{name.replace('_', '-')} is for kind {kind}.")


def check_curate(cfg: TrainConfig) -> None:
    if cfg.kind != "curate":
        return _only_for(cfg, "curate")
    if cfg.curate_budget is None:
        raise ConfigError("kind curate needs --curate-budget N or FRACTION.")
    curate_budget(cfg)
    if not 0 < cfg.curate_threshold <= 1:
        raise ConfigError(
            f"--curate-threshold {cfg.curate_threshold}: a cosine similarity threshold is "
            "in (0, 1]."
        )
    score = cfg.curate_score
    if score == "ifd":
        return
    if score.startswith("column:") and score[7:].strip():
        return
    if score.startswith("deita:") and len([m for m in score[6:].split(",") if m.strip()]) == 2:
        return
    raise ConfigError(
        f"--curate-score {score}: give ifd, column:NAME or deita:COMPLEXITY_MODEL,QUALITY_MODEL."
    )


def check_loramoe(cfg: TrainConfig) -> None:
    if cfg.kind != "loramoe":
        return _only_for(cfg, "loramoe")
    if cfg.experts < 1:
        raise ConfigError(f"--experts {cfg.experts}: a LoRAMoE needs at least 1 expert.")
    if not cfg.moe_balance >= 0 or not math.isfinite(cfg.moe_balance):
        raise ConfigError(f"--moe-balance {cfg.moe_balance}: a weight is 0 or more.")
    if cfg.moe_groups is not None and not 0 <= cfg.moe_groups <= cfg.experts:
        raise ConfigError(
            f"--moe-groups {cfg.moe_groups}: the first group holds 0..{cfg.experts} of the "
            f"{cfg.experts} experts."
        )
    if not 0 <= cfg.moe_delta < 1:
        raise ConfigError(f"--moe-delta {cfg.moe_delta}: the group contrast is in [0, 1).")


def check_eval_tasks(cfg: TrainConfig) -> None:
    """Every --eval-tasks name is a lab task (with --eval-lab) or a --tasks-dir task."""
    user: dict = {}
    if cfg.tasks_dir:
        user = folder_tasks(cfg.tasks_dir)
    for t in cfg.eval_tasks:
        if t in user:
            continue
        if t in TASKS + PROBES:
            if not cfg.eval_lab:
                raise ConfigError(f"--eval-tasks {t}: a lab task needs --eval-lab LAB.")
            continue
        where = f" nor a task of --tasks-dir {cfg.tasks_dir}" if cfg.tasks_dir else ""
        raise ConfigError(
            f"--eval-tasks {t}: not a lab task{where} (name the folder of its task YAML "
            "with --tasks-dir)."
        )


# The name's mark of an SFT job planned only as a soup's member (a seed beyond an
# experiment's): a run of its own, not one of the experiment's models
SOUP_MEMBER = "(soup member)"


def soup_member(cfg: TrainConfig, i: int, out: str | os.PathLike) -> TrainConfig:
    """Member ``i`` of soup ``cfg``: vanilla SFT with seed ``cfg.seed + i`` and every other
    value the soup's, so its run id is that of the same SFT submitted on its own (an
    experiment's SFT of that seed)."""
    return replace(cfg, kind="sft", seed=cfg.seed + i, out=str(out))


def run_id(cfg: TrainConfig) -> str:
    """A stable id for a configuration (its run folder does not count)."""
    # allow_pickle is a permission, not a parameter of the run: it does not change the id;
    # nor do checkpointing and the attention kernel (the same numbers, to float rounding)
    how = ("out", "allow_pickle", "gradient_checkpointing", "attn")
    values = {k: v for k, v in asdict(cfg).items() if k not in how}
    for later in ("dtype", "group_by_length"):  # added later: at auto the id stays as it was
        if values.get(later) == "auto":
            values.pop(later)
    for later in ("eval_tasks", "tasks_dir", "with_sft"):  # added later: unset, the id
        if not values.get(later):  # stays as it was
            values.pop(later, None)
    for name, default in {**KIND_FIELDS["curate"], **KIND_FIELDS["loramoe"]}.items():
        if values.get(name) == default:  # added later: at its default the id stays as it was
            values.pop(name, None)
    if cfg.kind != "soup":  # only a soup reads it: an SFT run is a soup's member whatever
        values["members"] = TrainConfig.members  # its soup's size (ids at the default stay)
    if values.get("clusters") == "all":
        values.pop("clusters")
    return input_key("run", values)


def from_mapping(values: dict[str, Any], where: str) -> TrainConfig:
    """A TrainConfig from plain values (a config or experiment file, a job row); unknown
    keys are an error naming ``where``."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}.")
    values = dict(values)
    for name in ("target_modules", "eval_tasks"):
        if isinstance(values.get(name), str):
            values[name] = tuple(x.strip() for x in values[name].split(",") if x.strip())
        elif values.get(name) is not None:
            values[name] = tuple(values[name])
    missing = [n for n in ("base", "data", "out") if not values.get(n)]
    if missing:
        raise ConfigError(f"{where} needs {', '.join('--' + m for m in missing)}.")
    return TrainConfig(**values)


def read_config(cfg_dict: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a job's stored config (JSON lists back to tuples)."""
    values = dict(cfg_dict)
    for name in ("target_modules", "eval_tasks"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return TrainConfig(**values)


def write_config(cfg: TrainConfig, out: Path, extra: dict) -> None:
    """``out/config.json``: the run's settings, what the run resolved (``extra``: its
    steps, targets, ...) and its run id."""
    resolved = {**asdict(cfg), **extra, "run_id": run_id(cfg)}
    write_text_atomic(out / "config.json", json.dumps(resolved, indent=2, default=list) + "\n")
