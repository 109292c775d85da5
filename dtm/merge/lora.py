"""Reading peft LoRA adapters and the exact linear merge.

A LoRA layer adds delta W = s * B @ A (A: r x in, B: out x r, s = alpha / r). A weighted
sum of K such deltas is itself a LoRA delta of rank sum(r_k): A' = [A_1; ...; A_K] and
B' = [w_1 s_1 B_1, ..., w_K s_K B_K] with s' = 1. So a linear merge is exact and never
builds a dense matrix; only the K weights differ between two merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dtm.errors import ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass
class AdapterSet:
    """One adapter: its folder, peft config, and per-layer (A, B, scaling)."""

    path: Path
    config: dict
    layers: dict  # layer prefix -> (A (r, in), B (out, r), s)


def read_adapter(path: str | Path) -> AdapterSet:
    from safetensors.torch import load_file

    p = Path(path)
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
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(f"{p}: per-layer ranks (rank_pattern) are not supported.")
    r, alpha = config.get("r"), config.get("lora_alpha")
    for key, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{p / CONFIG}: {key} is {value!r}, not a positive number.")
    try:
        tensors = load_file(p / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ConfigError(f"{p / WEIGHTS}: not a readable safetensors file ({e}).") from e
    s = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    layers = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            prefix = key.split(".lora_A.")[0]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise ConfigError(f"{p}: {prefix} has lora_A but no lora_B.")
            layers[prefix] = (a, b, s)
    if not layers:
        raise ConfigError(f"{p}: no LoRA layers in {WEIGHTS}.")
    return AdapterSet(p, config, layers)


def check_compatible(adapters: list[AdapterSet]) -> None:
    """Same base model, same adapted layers with the same shapes; else a ConfigError."""
    first = adapters[0]
    for other in adapters[1:]:
        if other.config.get("base_model_name_or_path") != first.config.get(
            "base_model_name_or_path"
        ):
            raise ConfigError(
                f"{other.path} was trained on {other.config.get('base_model_name_or_path')}, "
                f"{first.path} on {first.config.get('base_model_name_or_path')}: "
                "adapters of different base models cannot be merged."
            )
        if set(other.layers) != set(first.layers):
            raise ConfigError(
                f"{other.path} and {first.path} adapt different layers (different target modules)."
            )
        for name, (a, b, _) in other.layers.items():
            a0, b0, _ = first.layers[name]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise ConfigError(
                    f"{name}: shape {tuple(b.shape[:1]) + tuple(a.shape[1:])} in {other.path} "
                    f"but {tuple(b0.shape[:1]) + tuple(a0.shape[1:])} in {first.path}."
                )


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


def linear_concat(adapters: list[str | Path], weights: list[float], out: str | Path) -> Path:
    """Write to ``out`` the adapter whose delta is exactly sum_k weights[k] * delta_k."""
    import torch
    from safetensors.torch import save_file

    sets = [read_adapter(a) for a in adapters]
    if len(weights) != len(sets):
        raise ConfigError(f"{len(weights)} weights for {len(sets)} adapters.")
    check_compatible(sets)
    merged = {}
    for name in sets[0].layers:
        a = torch.cat([s.layers[name][0].float() for s in sets], dim=0)
        b = torch.cat(
            [
                w * s.layers[name][2] * s.layers[name][1].float()
                for s, w in zip(sets, weights, strict=True)
            ],
            dim=1,
        )
        merged[f"{name}.lora_A.weight"] = a.contiguous()
        merged[f"{name}.lora_B.weight"] = b.contiguous()
    rank = sum(s.config["r"] for s in sets)
    config = dict(sets[0].config, r=rank, lora_alpha=rank, use_rslora=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
