"""LoRA adapter files: a peft LoRA adapter read into its per-layer factors, and the
check that it fits a base model. The bottom of the stack: loading a model with an adapter
(``dtm.models``) and the exact merges (``dtm.merge.lora``) both read adapters here.

A LoRA layer adds delta W = s * B @ A (A: r x in, B: out x r, s = alpha / r, or
alpha / sqrt(r) with rslora); ``rank_pattern`` and ``alpha_pattern`` give a layer its own
rank and alpha, by peft's own matching rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dtm.errors import ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MOE_CONFIG = "loramoe_config.json"  # a LoRAMoE adapter folder (dtm.moe) has this file


@dataclass
class AdapterSet:
    """One adapter: its folder, peft config, and per-layer (A, B, scaling)."""

    path: Path
    config: dict
    layers: dict  # layer prefix -> (A (r, in), B (out, r), s)
    other_keys: tuple = field(default=())  # tensors that are not lora_A / lora_B

    def ranks(self) -> dict:
        """Layer prefix -> its LoRA rank."""
        return {n: int(a.shape[0]) for n, (a, _, _) in self.layers.items()}


PREFIX = "base_model.model."


def _pattern_value(pattern: dict, module: str, default):
    """The value peft uses for ``module`` (its ``get_pattern_key`` rule)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def read_adapter(path: str | Path) -> AdapterSet:
    """The adapter in folder ``path``; ConfigError naming the file and what is wrong when
    it is not a readable LoRA adapter (a LoRAMoE, another peft type, damaged files)."""
    from safetensors.torch import load_file  # lazy: torch

    p = Path(path)
    if (p / MOE_CONFIG).is_file():
        raise ConfigError(
            f"{p}: a LoRAMoE adapter; it cannot be merged (its router mixes the experts per "
            "token, so no single weight delta equals it). Score it as it is with `dtm eval "
            "--adapter`."
        )
    if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
        raise ConfigError(f"{p}: not a peft adapter folder ({CONFIG} and {WEIGHTS} expected).")
    try:
        config = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p / CONFIG}: not valid JSON ({e}); it was left as it is.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{p / CONFIG}: expected a JSON object (a peft adapter config).")
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{p}: a {config.get('peft_type')} adapter; only LoRA can be merged.")
    r, alpha = config.get("r"), config.get("lora_alpha")
    for key, value in (("r", r), ("lora_alpha", alpha)):
        if not _positive(value):
            raise ConfigError(f"{p / CONFIG}: {key} is {value!r}, not a positive number.")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        pat = config.get(key) or {}
        if not isinstance(pat, dict) or not all(_positive(v) for v in pat.values()):
            raise ConfigError(f"{p / CONFIG}: {key} must map module names to positive numbers.")
        patterns[key] = pat
    try:
        tensors = load_file(p / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ConfigError(f"{p / WEIGHTS}: not a readable safetensors file ({e}).") from e
    layers, other = {}, []
    for key, a in tensors.items():
        if ".lora_A." in key:
            prefix = key.split(".lora_A.")[0]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise ConfigError(f"{p}: {prefix} has lora_A but no lora_B.")
            module = prefix.removeprefix(PREFIX)
            r_l = _pattern_value(patterns["rank_pattern"], module, r)
            alpha_l = _pattern_value(patterns["alpha_pattern"], module, alpha)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r_l or b.shape[1] != r_l:
                raise ConfigError(
                    f"{p}: {prefix} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"but its config gives it rank {r_l}."
                )
            s = alpha_l / (r_l**0.5) if config.get("use_rslora") else alpha_l / r_l
            layers[prefix] = (a, b, s)
        elif ".lora_B." not in key:
            other.append(key)
    if not layers:
        if any("lora_embedding_" in k for k in other):
            raise ConfigError(
                f"{p}: embedding LoRA (lora_embedding_A/B) only, and no LoRA of a linear layer."
            )
        raise ConfigError(f"{p}: no LoRA layers in {WEIGHTS}.")
    return AdapterSet(p, config, layers, tuple(other))


def check_fits_base(adapter: AdapterSet, model, base: str) -> None:
    """ConfigError unless every layer of ``adapter`` is a layer of ``model`` (the loaded
    base ``base``) with matching shapes: an adapter of another base is refused."""
    params = dict(model.named_parameters())
    for prefix, (a, b, _) in adapter.layers.items():
        name = prefix.removeprefix("base_model.model.") + ".weight"
        w = params.get(name)
        if w is None:
            raise ConfigError(
                f"{adapter.path}: layer {prefix} is not in the base model {base} "
                f"(an adapter of another base? it was trained on "
                f"{adapter.config.get('base_model_name_or_path')})."
            )
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ConfigError(
                f"{adapter.path}: layer {prefix} has shape {(b.shape[0], a.shape[1])}, "
                f"the base model's is {tuple(w.shape)} (an adapter of another base? it was "
                f"trained on {adapter.config.get('base_model_name_or_path')})."
            )
