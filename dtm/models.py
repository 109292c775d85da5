"""The one model loader: a base causal LM, with or without LoRA adapters, loaded safely.

- Weights load from safetensors only. A folder with only pickle weights (``*.bin``) is
  refused unless ``allow_pickle``; even then ``torch.load(weights_only=True)`` refuses a
  pickle holding anything but tensors.
- A model folder's own Python code (``auto_map``) runs only with ``trust_remote_code``.
- The tokenizer is loaded only when asked for: a merge needs none, so a folder of
  weights without tokenizer files merges (``load_base(..., tokenizer=False)``).

The trainer, the merge engine, evaluation and the pages all load through ``load_base``;
``load_model(base, adapter)`` adds one peft adapter. Several adapters merged exactly in
memory are ``dtm.merge.engine.Merger``'s (``dtm.score.load_model`` picks).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dtm.adapters import CONFIG, WEIGHTS, check_fits_base, read_adapter
from dtm.errors import ConfigError
from dtm.store import canonical_json, input_key

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


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id, with a pad token (the end-of-text token
    when it has none)."""
    from transformers import AutoTokenizer  # lazy: transformers

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot load the tokenizer of {name!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    name: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    tokenizer: bool = True,
    dtype: str | None = None,
    attn: str | None = None,
):
    """``(model, tokenizer)`` from a folder or hub id (``tokenizer=False``: the tokenizer
    is None and never read), with a clear error when it is not one. ``dtype`` (bf16,
    fp16, fp32) and ``attn`` (sdpa, flash_attention_2, eager) set the weights' dtype and
    the attention implementation; None leaves ``transformers``' default."""
    import pickle

    import torch  # lazy: torch
    from transformers import AutoModelForCausalLM  # lazy: transformers

    check_base_path(name, allow_pickle=allow_pickle)
    path = Path(name).expanduser()
    pickle_only = path.is_dir() and not any(path.glob("*.safetensors"))
    weights = (
        {"use_safetensors": False, "weights_only": True}
        if allow_pickle and pickle_only
        else {"use_safetensors": True}
    )
    if dtype is not None:
        weights["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    if attn is not None:
        weights["attn_implementation"] = attn
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code) if tokenizer else None
    try:
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
    return model, tok


def load_model(
    base: str,
    adapter: str | Path | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """``(model, tokenizer)``: ``base`` alone or with one peft adapter (checked before the
    base loads). Several adapters merged: ``dtm.merge.engine.Merger``, which loads its
    base through ``load_base`` too (``dtm.score.load_model`` picks between them)."""
    from dtm import moe  # lazy: dtm.moe imports torch

    if adapter and moe.is_adapter_folder(adapter):  # a LoRAMoE: its own module, unmerged
        moe.read_config(adapter)
        model, tok = load_base(base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        return moe.load_adapter(model, adapter).eval(), tok
    lora = _check_adapter(Path(adapter)) if adapter else None
    model, tok = load_base(base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if adapter:
        model = apply_adapter(model, adapter, base, lora)
    return model, tok


def _check_adapter(a: Path):
    """Read a single adapter's config (and its LoRA weights) before the base loads, so a
    bad folder is reported without the cost of a model load."""
    if not (a / CONFIG).exists():
        raise ConfigError(f"{a}: not a peft adapter folder (no {CONFIG}).")
    try:
        is_lora = json.loads((a / CONFIG).read_text()).get("peft_type") == "LORA"
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{a / CONFIG}: not a readable adapter config ({e}).") from None
    return read_adapter(a) if is_lora and (a / WEIGHTS).exists() else None


def apply_adapter(model, adapter: str | Path, base: str, lora=None):
    """``model`` with one peft adapter applied (checked to fit the base first)."""
    from peft import PeftModel  # lazy: peft imports torch

    if lora is not None:
        check_fits_base(lora, model, base)
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except RuntimeError as e:  # e.g. a size mismatch: an adapter of another base
        raise ConfigError(
            f"{adapter}: cannot be applied to the base model {base}: {str(e)[:300]}"
        ) from e


# The LoRA targets of ``dtm train`` when the user names none: the paper's FFN projections
# where the model has them, else the FFN of the architectures that name it otherwise.
PAPER_TARGETS = ("gate_proj", "up_proj", "down_proj")
FFN_TARGETS = (
    ("gate_proj", "up_proj", "down_proj"),  # Llama, Mistral, Qwen2, Gemma, ...
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX (Pythia), Falcon
    ("fc1", "fc2"),  # Phi, OPT
    ("w1", "w2", "w3"),  # Mixtral-style experts
    ("c_fc", "c_proj"),  # GPT-2 (Conv1D: such adapters train; the merge refuses them)
)


def linear_names(model) -> set[str]:
    """The names of the layers LoRA can adapt: linear layers, and GPT-2's ``Conv1D``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)}


def default_targets(model) -> tuple[str, ...]:
    """The first ``FFN_TARGETS`` set whose every name is a linear layer of ``model``."""

    have = linear_names(model)
    for names in FFN_TARGETS:
        if set(names) <= have:
            return names
    raise ConfigError(
        "no default LoRA targets for this architecture (it has none of "
        f"{', '.join('/'.join(t) for t in FFN_TARGETS)}); name them with --target-modules "
        f"(its linear layers: {', '.join(sorted(have - {'lm_head'}))})."
    )


def resolve_targets(model, asked: tuple[str, ...]) -> tuple[str, ...]:
    """``asked`` when they are layers of ``model``; the architecture's default when the
    paper's default was left as it is and the model has no such layers; else an error."""

    have = linear_names(model)
    if set(asked) & have:
        missing = set(asked) - have
        if missing:
            raise ConfigError(
                f"--target-modules: {', '.join(sorted(missing))} are not layers of this model "
                f"(its linear layers: {', '.join(sorted(have - {'lm_head'}))})."
            )
        return tuple(asked)
    if tuple(asked) == PAPER_TARGETS:
        return default_targets(model)
    raise ConfigError(
        f"--target-modules {','.join(asked)}: none is a layer of this model "
        f"(its linear layers: {', '.join(sorted(have - {'lm_head'}))})."
    )


def lab_of(base: str | Path | None) -> str | None:
    """The lab folder a base model belongs to (``LAB/model`` beside ``LAB/lab.json`` and
    ``LAB/benchmarks``), else None: only a lab model is offered the lab's tasks."""
    if not base:
        return None
    here = Path(str(base)).expanduser()
    lab = here.parent
    if here.name == "model" and (lab / "lab.json").exists() and (lab / "benchmarks").is_dir():
        return str(lab)
    return None


def model_and_lab(
    model: str, lab: str | None, default_lab: str | Path | None = None
) -> tuple[str, str | None]:
    """``--model lab`` is the default lab's base model (``default_lab``: its folder, which
    the caller names: ``dtm.lab.default_lab_dir()``); a lab's ``model/`` folder brings
    its benchmarks along; otherwise the default lab (when built) scores the lab tasks."""
    default = Path(default_lab) if default_lab else None
    if model == "lab":
        lab_dir = Path(lab) if lab else default
        if lab_dir is None:
            raise ConfigError("--model lab: no default lab folder given; give --lab LAB.")
        if not (lab_dir / "model" / "config.json").exists():
            raise ConfigError(
                f"--model lab: the lab {lab_dir} is not built; run `python -m dtm lab build "
                f"--out {lab_dir}` or open the dashboard once."
            )
        return str(lab_dir / "model"), str(lab_dir)
    if lab is None:
        here = Path(model).expanduser()
        if (here.parent / "benchmarks").is_dir() and (here.parent / "lab.json").exists():
            lab = str(here.parent)
        elif default is not None and (default / "benchmarks").is_dir():
            lab = str(default)
    return model, lab


# What a model is, in the order tables show them: the base, vanilla SFT, the shrinkage
# control, a merge (DTM), a baseline, one sub-model alone.
MODEL_KINDS = ("base", "sft", "control", "merge", "baseline", "sub")


@dataclass
class ModelRef:
    """A model as the dashboard makes it: ``base`` plus LoRA ``adapters``; with several
    adapters, ``recipe`` (``{"method", "weights", "params"}``) says how they are merged.
    ``label`` (e.g. ``dtm-kmeans``), ``group`` and ``seed`` say where it belongs; ``kind``
    (one of ``MODEL_KINDS``) and ``clustering`` say what it is. A control (the shrinkage
    control, a point of a frontier) has a ``factor``: its one adapter's delta is scaled by
    it before scoring (``dtm.score.score_models`` writes the scaled copy). Only base, adapters,
    recipe and factor make its key: the same weights are the same model whatever they
    are called."""

    base: str
    adapters: list[str] = field(default_factory=list)
    recipe: dict | None = None
    label: str = ""
    group: str | None = None
    seed: int | None = None
    kind: str | None = None
    clustering: str | None = None
    factor: float | None = None

    @property
    def key(self) -> str:
        what = {"base": self.base, "adapters": self.adapters, "recipe": self.recipe}
        if self.factor is not None:  # a control before its scaled copy is written
            what["factor"] = self.factor
        return input_key("model", what)

    def describe(self) -> str:
        if not self.adapters:
            return f"{self.base} (base)"
        if len(self.adapters) == 1 and not self.recipe:
            return f"{self.base} + {self.adapters[0]}"
        r = self.recipe or {}
        return f"{self.base} + {r.get('method', 'average')} of {len(self.adapters)} adapters"

    def to_json(self) -> str:
        """The registry's ``model`` text: the model without what it is (kind, clustering,
        stored in their own columns) nor a factor (a scored control's adapter is its
        scaled copy)."""
        skip = ("kind", "clustering", "factor")
        return canonical_json({k: v for k, v in asdict(self).items() if k not in skip})

    @classmethod
    def from_json(cls, text: str, **fields) -> ModelRef:
        """``to_json``'s inverse; ``fields`` (e.g. kind, clustering) are added."""
        return cls(**json.loads(text), **fields)
