"""The shrinkage control scales a LoRA adapter's weight delta exactly."""

import pytest
import torch

from dtm.controls import shrink_adapter
from dtm.errors import ConfigError


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


def merged_weights(adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), adapter_dir).merge_and_unload()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factor", [0.0, 0.25, 1.0])
def test_shrunk_delta_is_factor_times_the_delta(tmp_path, factor):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )  # random B: a non-zero delta
    peft_model.save_pretrained(tmp_path / "a")
    base = tiny_llama().state_dict()
    full = merged_weights(tmp_path / "a")
    shrunk = merged_weights(shrink_adapter(tmp_path / "a", factor, tmp_path / "s"))
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert changed and all("mlp" in k for k in changed)
    for k in base:
        torch.testing.assert_close(
            shrunk[k] - base[k], factor * (full[k] - base[k]), atol=1e-6, rtol=1e-5
        )


def test_not_an_adapter(tmp_path):
    with pytest.raises(ConfigError, match="not a peft adapter folder"):
        shrink_adapter(tmp_path, 0.5, tmp_path / "out")
