"""Controls that tell a DTM effect from mere shrinkage.

Averaging K sub-models moves the weights less than one SFT run does. ``shrink_adapter``
scales a LoRA adapter's weight delta (delta W = s * B @ A) by ``factor`` exactly, by
scaling every ``lora_B`` matrix, so "the SFT delta scaled by 1/K" can be scored beside DTM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dtm.errors import ConfigError


def shrink_adapter(adapter_dir: str | Path, factor: float, out_dir: str | Path) -> Path:
    """Write a copy of a peft LoRA adapter whose delta is ``factor`` times the original."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    weights = src / "adapter_model.safetensors"
    if not weights.exists() or not (src / "adapter_config.json").exists():
        raise ConfigError(
            f"{src}: not a peft adapter folder (adapter_config.json and "
            "adapter_model.safetensors expected)."
        )
    tensors = load_file(weights)
    if not any(".lora_B." in k for k in tensors):
        raise ConfigError(f"{src}: no LoRA B matrices found; only LoRA adapters can be scaled.")
    scaled = {k: (v * factor if ".lora_B." in k else v) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "adapter_config.json", out / "adapter_config.json")
    save_file(scaled, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
