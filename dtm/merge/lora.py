"""The exact linear merge of peft LoRA adapters (read by ``dtm.adapters``).

A LoRA layer adds delta W = s * B @ A (A: r x in, B: out x r, s = alpha / r). A weighted
sum of K such deltas is itself a LoRA delta of rank sum(r_k): A' = [A_1; ...; A_K] and
B' = [w_1 s_1 B_1, ..., w_K s_K B_K] with s' = 1. So a linear merge is exact and never
builds a dense matrix; only the K weights differ between two merges. The ranks r_k (and
lora_alpha, rslora) may differ between adapters and between layers (``rank_pattern``):
the concatenated rank of each layer is written as a per-layer ``rank_pattern`` with an
``alpha_pattern`` that makes every layer's scale 1.

Adapter features whose delta is not s * B @ A of a linear layer (DoRA, ``modules_to_save``,
a LoRA bias, embedding LoRA, ``fan_in_fan_out``) are refused by ``check_mergeable``
rather than merged inexactly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dtm.adapters import (  # noqa: F401  (re-exported: the merge reads adapters here)
    CONFIG,
    PREFIX,
    WEIGHTS,
    AdapterSet,
    check_fits_base,
    read_adapter,
)
from dtm.errors import ConfigError

UNSUPPORTED_HINT = (
    "the merge refuses it rather than merge it inexactly; retrain the adapter without it, "
    "or merge it into the base with peft (merge_and_unload) first"
)


def check_mergeable(adapter: AdapterSet) -> None:
    """ConfigError naming the feature and the folder unless ``adapter``'s delta is exactly
    sum of s * B @ A over linear layers (what every merge method assumes)."""
    c, p = adapter.config, adapter.path
    found = []
    if c.get("use_dora"):
        found.append("DoRA (use_dora: true)")
    if c.get("modules_to_save"):
        found.append(f"modules_to_save {c['modules_to_save']} (fully trained modules)")
    if c.get("bias") not in (None, "none"):
        found.append(f"a LoRA bias (bias: {c['bias']!r})")
    if c.get("fan_in_fan_out"):
        found.append("fan_in_fan_out: true (Conv1D-style transposed weights)")
    if c.get("trainable_token_indices"):
        found.append("trainable_token_indices (trained token embeddings)")
    emb = sorted({k.split(".lora_embedding_")[0] for k in adapter.other_keys if "_embedding_" in k})
    if emb:
        found.append(f"embedding LoRA (an nn.Embedding target: {', '.join(emb[:3])})")
    magnitude = [k for k in adapter.other_keys if "lora_magnitude_vector" in k]
    if magnitude and not c.get("use_dora"):
        found.append("DoRA (lora_magnitude_vector weights)")
    if found:
        raise ConfigError(
            f"{p}: this adapter uses {'; '.join(found)}, which the merge does not support: "
            f"{UNSUPPORTED_HINT}."
        )


def rank_config(config: dict, ranks: dict) -> dict:
    """``config`` for an adapter whose layer ``prefix`` has rank ``ranks[prefix]`` and
    scale 1: ``r`` is the commonest rank, the others go in ``rank_pattern`` and
    ``alpha_pattern`` (alpha = rank, so every layer's scale alpha / r is 1)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n.removeprefix(PREFIX): k for n, k in ranks.items() if k != r}
    return dict(
        config,
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )


def check_compatible(adapters: list[AdapterSet]) -> None:
    """Same base model, same adapted layers with the same shapes (ranks may differ), and
    only mergeable features (``check_mergeable``); else a ConfigError."""
    for a in adapters:
        check_mergeable(a)
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


def linear_concat(adapters: list[str | Path], weights, out: str | Path) -> Path:
    """Write to ``out`` the adapter whose delta is exactly sum_k weights[k] * delta_k:
    ``weights`` are K numbers, or ``{layer prefix: K numbers}`` (each layer's own, e.g.
    its block's coefficients; the concatenated B of that layer is scaled by them)."""
    import torch
    from safetensors.torch import save_file

    sets = [read_adapter(a) for a in adapters]
    check_compatible(sets)
    per_layer = weights if isinstance(weights, dict) else dict.fromkeys(sets[0].layers, weights)
    missing = sorted(set(sets[0].layers) - set(per_layer))
    if missing:
        raise ConfigError(f"no merge weights for the layers {', '.join(missing[:3])}.")
    bad = sorted({len(w) for w in per_layer.values()} - {len(sets)})
    if bad:
        raise ConfigError(f"{bad[0]} weights for {len(sets)} adapters.")
    merged = {}
    for name in sets[0].layers:
        weights = per_layer[name]
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
    ranks = {n: int(merged[f"{n}.lora_A.weight"].shape[0]) for n in sets[0].layers}
    config = rank_config(sets[0].config, ranks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
