"""What a training job needs in GPU memory, from the model's shape alone (no weights
loaded), and what ``auto`` chooses for ``--dtype``, ``--attn`` and
``--gradient-checkpointing`` on the machine a run meets.

The shape is a model folder's ``config.json`` (``shape_from_config``) or, for a hub id
a dry run does not download, an experiment file's ``estimate.shape`` (``shape_from_mapping``:
hidden, intermediate, layers, heads, vocab, optionally kv_heads and tied). With ``h`` the
hidden size, ``i`` the MLP's intermediate size, ``L`` the layers, ``V`` the vocabulary,
``a`` the bytes of the weights' dtype (2 for bf16/fp16, 4 for fp32) and ``T`` the tokens
of one forward (a run: micro_batch_size x max_length; a group: the sum over its members,
whose rows share one forward), the estimate in bytes is the sum of:

- weights: ``a * N``, N = ``V*h`` (embedding) ``+ V*h`` (unless tied) ``+ L*(2*h*h +
  2*h*kv + 3*h*i + 2*h) + h``, kv = h * kv_heads / heads (Llama-type layers);
- LoRA: per member, ``r * (in + out)`` per adapted matrix per layer (gate/up: h -> i,
  down: i -> h, q/o: h -> h, k/v: h -> kv; any other name taken as h -> h), times the
  experts of a LoRAMoE, at 16 bytes a parameter: fp32 weight, gradient and AdamW's two
  moments; an ``ewc`` run adds its base Fisher, 4 bytes per adapted base weight;
- activations, the frozen base's kept for the backward pass, by Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 1): per token
  and layer ``34 * h * a / 2`` bytes (34h in 16-bit), plus, for ``eager`` attention,
  which keeps the attention matrix, ``5 * heads * max_length * a / 2`` more (SDPA and
  FlashAttention-2 keep none). Without checkpointing: all L layers, ``T * L * 34*h*a/2``.
  With checkpointing (each decoder layer recomputed in the backward pass): every
  layer's input, ``T * L * h * a``, plus one layer's full activations during its
  recompute, ``T * 34*h*a/2``;
- logits: ``V * T * 4`` (the loss upcasts them to fp32).

A job fits when the estimate is at most ``FIT_SHARE`` of the GPU's memory (the rest for
the CUDA context, the kernels' workspace and the allocator's fragmentation).

``auto`` on a GPU: bf16 where the GPU has it (else fp32); FlashAttention-2 when the
``flash_attn`` package is installed and the dtype is 16-bit, else SDPA; checkpointing
on exactly when the job would not fit without it; length-grouped batches
(``--group-by-length``). On a CPU: fp32, the attention ``transformers`` picks by default
(as every run before), no checkpointing, the plain shuffled order (the lab's figures
were measured with it).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from dtm.errors import ConfigError

GIB = 2**30
FIT_SHARE = 0.9
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTNS = ("auto", "sdpa", "flash_attention_2", "eager")
CHECKPOINTING = ("auto", "on", "off")
GROUPINGS = ("auto", "on", "off")
LORA_BYTES = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
ACT_PER_H = 34  # bytes per token, layer and hidden unit in 16-bit (Korthikanti et al.)


@dataclass(frozen=True)
class Shape:
    """A decoder's shape: what the estimate needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    tied: bool = False

    @property
    def kv(self) -> int:
        return self.hidden * (self.kv_heads or self.heads) // self.heads

    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        layer = 2 * h * h + 2 * h * self.kv + 3 * h * i + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def matrix(self, name: str) -> tuple[int, int]:
        """``(in, out)`` of an adapted linear layer by its name."""
        h, i = self.hidden, self.intermediate
        return {
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "k_proj": (h, self.kv),
            "v_proj": (h, self.kv),
        }.get(name, (h, h))


_ALIASES = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}


def shape_from_config(config: dict) -> Shape | None:
    """The shape in a ``transformers`` config (a ``config.json``'s mapping); None when it
    does not name one."""
    values = {}
    for key, names in _ALIASES.items():
        found = [config[n] for n in names if isinstance(config.get(n), int)]
        if not found:
            return None
        values[key] = found[0]
    inter = config.get("intermediate_size") or config.get("n_inner") or 4 * values["hidden"]
    kv = config.get("num_key_value_heads")
    tied = bool(config.get("tie_word_embeddings", False))
    return Shape(intermediate=int(inter), kv_heads=kv, tied=tied, **values)


def shape_from_mapping(values: dict, where: str) -> Shape:
    """An experiment file's ``estimate.shape``: hidden, intermediate, layers, heads, vocab
    (and optionally kv_heads, tied)."""
    need = ("hidden", "intermediate", "layers", "heads", "vocab")
    missing = [k for k in need if not isinstance(values.get(k), int) or values[k] < 1]
    unknown = sorted(set(values) - {*need, "kv_heads", "tied"})
    if missing or unknown:
        bad = f"needs {', '.join(missing)} (positive integers)" if missing else ""
        bad += f"{'; ' if bad else ''}unknown keys {', '.join(unknown)}" if unknown else ""
        raise ConfigError(f"{where}: {bad}.")
    return Shape(**values)


def model_shape(base: str, shape: dict | None = None, where: str = "estimate.shape"):
    """The shape of ``base``: its folder's ``config.json`` when it is a local folder, else
    ``shape`` (an ``estimate.shape`` mapping); None when neither says."""
    cfg = Path(base).expanduser() / "config.json"
    if cfg.is_file():
        try:
            found = shape_from_config(json.loads(cfg.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            found = None
        if found is not None:
            return found
    return shape_from_mapping(dict(shape), where) if shape else None


@dataclass(frozen=True)
class Job:
    """One member's part of a forward: its micro-batch, length and adapter."""

    micro_batch_size: int
    max_length: int
    lora_r: int
    target_modules: tuple[str, ...]
    kind: str = "sft"
    experts: int = 1

    @classmethod
    def of(cls, cfg) -> Job:
        experts = cfg.experts if cfg.kind == "loramoe" else 1
        targets = tuple(cfg.target_modules)
        return cls(cfg.micro_batch_size, cfg.max_length, cfg.lora_r, targets, cfg.kind, experts)


@dataclass(frozen=True)
class Estimate:
    """Bytes per part of one job (a run, or a group over one base)."""

    weights: int
    lora: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits

    @property
    def gib(self) -> float:
        return self.total / GIB

    def fits(self, memory_gib: float) -> bool:
        return self.total <= FIT_SHARE * memory_gib * GIB


def lora_params(shape: Shape, job: Job) -> int:
    per_layer = sum(job.lora_r * sum(shape.matrix(t)) for t in job.target_modules)
    return shape.layers * per_layer * job.experts


def activation_bytes(shape: Shape, tokens: int, length: int, dtype: str, attn: str, ckpt: bool):
    """The frozen base's activations kept for the backward pass (module docstring)."""
    a = BYTES[dtype]
    per_layer = ACT_PER_H * shape.hidden * a // 2  # bytes per token
    if attn == "eager":
        per_layer += 5 * shape.heads * length * a // 2
    if ckpt:
        return tokens * (shape.layers * shape.hidden * a + per_layer)
    return tokens * shape.layers * per_layer


def estimate(shape: Shape, jobs: list[Job], dtype: str, attn: str, ckpt: bool) -> Estimate:
    """The memory of ``jobs`` (the members of one forward) over one base of ``shape``."""
    tokens = sum(j.micro_batch_size * j.max_length for j in jobs)
    length = max(j.max_length for j in jobs)
    lora = sum(lora_params(shape, j) for j in jobs) * LORA_BYTES
    for j in jobs:
        if j.kind == "ewc":
            lora += 4 * shape.layers * sum(a * b for a, b in map(shape.matrix, j.target_modules))
    return Estimate(
        weights=shape.params() * BYTES[dtype],
        lora=lora,
        activations=activation_bytes(shape, tokens, length, dtype, attn, ckpt),
        logits=shape.vocab * tokens * 4,
    )


@dataclass(frozen=True)
class Machine:
    """Where a job runs: a GPU (with bf16 or not, its memory) or the CPU."""

    gpu: bool
    bf16: bool = False
    memory_gib: float | None = None
    flash: bool = False


@functools.cache  # asked at every Train page render; the GPUs do not change
def this_machine() -> Machine:
    """The machine this process runs on."""
    import torch  # lazy: torch

    if not torch.cuda.is_available():
        return Machine(gpu=False)
    return Machine(
        gpu=True,
        bf16=torch.cuda.is_bf16_supported(),
        memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB,
        flash=importlib.util.find_spec("flash_attn") is not None,
    )


@dataclass(frozen=True)
class Choice:
    """What a job runs with: ``dtype`` (bf16, fp16, fp32), ``attn`` (None: the default
    ``transformers`` picks), ``checkpointing``, and the estimate at those settings (None
    without a shape); ``fits`` None when the machine's memory is not known; ``by_length``
    whether batches are length-grouped (``dtm.train.order``)."""

    dtype: str
    attn: str | None
    checkpointing: bool
    estimate: Estimate | None = None
    fits: bool | None = None
    by_length: bool = False

    def describe(self) -> str:
        ckpt = "checkpointing on" if self.checkpointing else "checkpointing off"
        grouped = ", length-grouped batches" if self.by_length else ""
        return f"{self.dtype}, {self.attn or 'default attention'}, {ckpt}{grouped}"


def choose(cfgs: list, shape: Shape | None, machine: Machine) -> Choice:
    """``auto``'s choices (a value set by hand stands) for the members ``cfgs`` of one
    forward (one config: a run) over a base of ``shape``, on ``machine``."""
    c = cfgs[0]
    dtype = c.dtype
    if dtype == "auto":
        dtype = "bf16" if machine.gpu and machine.bf16 else "fp32"
    attn = c.attn
    if attn == "auto":
        attn = None
        if machine.gpu:
            flash = machine.flash and dtype in ("bf16", "fp16")
            attn = "flash_attention_2" if flash else "sdpa"
    jobs = [Job.of(x) for x in cfgs]

    def at(ckpt: bool) -> Estimate | None:
        return estimate(shape, jobs, dtype, attn or "sdpa", ckpt) if shape else None

    if c.gradient_checkpointing == "auto":
        plain = at(False)
        room = machine.gpu and machine.memory_gib is not None
        ckpt = bool(room and plain is not None and not plain.fits(machine.memory_gib))
    else:
        ckpt = c.gradient_checkpointing == "on"
    est = at(ckpt)
    fits = est.fits(machine.memory_gib) if est and machine.memory_gib else None
    grouping = getattr(c, "group_by_length", "auto")
    by_length = grouping == "on" or (grouping == "auto" and machine.gpu)
    return Choice(dtype, attn, ckpt, est, fits, by_length)


def check_values(cfg) -> None:
    """A ConfigError naming the flag of a bad ``dtype``, ``attn`` or checkpointing value."""
    for name, allowed in (
        ("dtype", DTYPES),
        ("attn", ATTNS),
        ("gradient_checkpointing", CHECKPOINTING),
        ("group_by_length", GROUPINGS),
    ):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)}: choose one of "
                f"{', '.join(allowed)}."
            )


def resolved(choice: Choice, model=None) -> dict:
    """What ``config.json`` records of a choice: the dtype and attention the loaded model
    has, the checkpointing, the estimate in GiB."""
    dtype, attn = choice.dtype, choice.attn
    if model is not None:
        dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
            str(getattr(model, "dtype", "")), dtype
        )
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or attn
    out = {"dtype_used": dtype, "attn_used": attn}
    out["gradient_checkpointing_used"] = choice.checkpointing
    out["group_by_length_used"] = choice.by_length
    if choice.estimate is not None:
        out["memory_estimate_bytes"] = choice.estimate.total
        out["memory_estimate_gib"] = round(choice.estimate.gib, 2)
    return out


def launch_note(cfg, members: int, machine: Machine | None = None) -> str:
    """One line for a launch: the estimate of a run of ``cfg`` and of a group of
    ``members`` such runs over one base, on ``machine`` (default: this one), whether
    each fits and what ``auto`` chooses."""
    machine = machine or this_machine()
    shape = model_shape(cfg.base)
    if shape is None:
        return f"Memory: no estimate ({cfg.base} has no config.json here)."
    where = f"this GPU's {machine.memory_gib:.0f} GiB" if machine.gpu else "this CPU"
    parts = []
    for label, n in (("a run", 1), (f"the group of {members}", members)):
        c = choose([cfg] * n, shape, machine)
        fits = "" if c.fits is None else (" fits" if c.fits else " does NOT fit")
        parts.append(f"{label} ~{c.estimate.gib:.2f} GiB{fits} ({c.describe()})")
    return f"Memory on {where}: " + "; ".join(parts) + "."
