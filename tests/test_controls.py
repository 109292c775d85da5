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


def score_rows(points, seed=0):
    """Registry-shaped score rows: ``points`` maps a label to (format, knowledge)."""
    import pandas as pd

    rows = []
    for label, (fmt, know) in points.items():
        s = None if label == "base" else seed
        kind = "merge" if label.startswith("dtm") else "control"
        rows += [
            {"label": label, "seed": s, "kind": kind, "task": "lab_bias", "metric": "format",
             "value": fmt},
            {"label": label, "seed": s, "kind": kind, "task": "lab_knowledge", "metric": "acc",
             "value": know},
        ]  # fmt: skip
    return pd.DataFrame(rows)


def test_frontier_is_read_by_interpolation_on_its_upper_envelope():
    from dtm.controls import frontier_at

    # alpha 0, 0.5, 1: (gained, kept) = (0.2, 0.98), (0.6, 0.94), (0.8, 0.90).
    pts = [(0.2, 0.98), (0.6, 0.94), (0.8, 0.90)]
    assert frontier_at(pts, 0.4) == pytest.approx(0.96)  # halfway between the first two
    assert frontier_at(pts, 0.7) == pytest.approx(0.92)
    assert frontier_at(pts, 0.9) is None  # no alpha reaches it
    # A frontier that turns back (gained falls again at alpha 1): the higher branch wins.
    back = [(0.2, 0.98), (0.8, 0.92), (0.6, 0.80)]
    assert frontier_at(back, 0.7) == pytest.approx(0.93)  # not 0.86 on the way back


def test_each_merge_is_placed_above_on_or_below_its_seeds_frontier():
    import pandas as pd

    from dtm.controls import control_label, frontier_rows, label_factor

    assert control_label(0.25, 4) == "sft ×1/4" and label_factor("sft ×1/4") == 0.25
    assert control_label(0.4, 4) == "sft ×0.4" and label_factor("sft ×0.4") == 0.4
    assert label_factor("sft") is None and label_factor("sft ×x") is None
    tables = []
    for seed, dtm_know in ((0, 0.97), (1, 0.975), (2, 0.965)):
        # Frontier: (0.2, .98) at alpha 0 (the base), (0.6, .94) at 0.5, (0.8, .90) at 1.
        pts = {"sft ×0.5": (0.6, 0.94), "sft": (0.8, 0.90), "dtm-kmeans": (0.4, dtm_know)}
        pts |= {"dtm-random": (0.7, 0.92 + (seed - 1) * 0.001), "dtm-far": (0.95, 0.9)}
        if seed == 0:
            pts["base"] = (0.2, 0.98)
        tables.append(score_rows(pts, seed))
    table = pd.concat(tables, ignore_index=True)
    rows = {
        r["label"]: r
        for r in frontier_rows(table, ["dtm-kmeans", "dtm-random", "dtm-far"])
        if r["gained"] == ("lab_bias", "format")
    }
    # dtm-kmeans at format 0.4: the frontier is at 0.96; it is 0.01, 0.015, 0.005 above.
    k = rows["dtm-kmeans"]
    assert k["where"] == "above" and k["seeds"] == 3
    assert k["mean"] == pytest.approx(0.01) and k["std"] == pytest.approx(0.005)
    # dtm-random at 0.7: the frontier is at 0.92; distances -0.001, 0, +0.001: on it.
    assert rows["dtm-random"]["where"] == "on"
    assert rows["dtm-random"]["mean"] == pytest.approx(0.0, abs=1e-12)
    # dtm-far gains more format than any alpha reaches.
    assert rows["dtm-far"]["where"] == "beyond" and rows["dtm-far"]["beyond"] == 3


def test_the_per_block_frontier_is_the_pareto_front_of_every_per_block_point():
    """Per-block points beside the shrinkage frontier: a merge above the shrinkage
    frontier can be below the per-block one; the front drops dominated points."""
    import pandas as pd

    from dtm.controls import frontier_rows, hma_frame, hma_label, hma_models, label_alphas
    from dtm.models import ModelRef

    assert hma_label((0, 0.5, 1)) == "sft ×[0/0.5/1]"
    assert label_alphas("sft ×[0/0.5/1]") == (0.0, 0.5, 1.0)
    assert label_alphas("sft ×0.5") is None and label_alphas("sft ×[x]") is None
    sft = ModelRef(base="b", adapters=["a"], label="sft", seed=0, kind="sft")
    made = hma_models(sft)
    assert len(made) == 27 - 3 and len({m.key for m in made}) == 24
    m = next(x for x in made if x.label == "sft ×[1/0/0.5]")
    assert m.recipe == {"method": "linear", "weights": [[1.0, 0.0, 0.5]], "params": {}}
    tables = []
    for seed, dtm_know in ((0, 0.97), (1, 0.972), (2, 0.968)):
        # shrinkage: (0.2, .98), (0.6, .94), (0.8, .90); per-block: (0.4, .985) beats it,
        # (0.5, .90) is dominated and not on the front
        pts = {"sft ×0.5": (0.6, 0.94), "sft": (0.8, 0.90), "dtm-kmeans": (0.4, dtm_know)}
        pts |= {"sft ×[0/0.5/1]": (0.4, 0.985), "sft ×[1/0/0]": (0.5, 0.90)}
        if seed == 0:
            pts["base"] = (0.2, 0.98)
        tables.append(score_rows(pts, seed))
    table = pd.concat(tables, ignore_index=True)
    fmt = ("lab_bias", "format")
    shrink = [r for r in frontier_rows(table, ["dtm-kmeans"]) if r["gained"] == fmt][0]
    hma = [r for r in frontier_rows(table, ["dtm-kmeans"], front="hma") if r["gained"] == fmt]
    assert shrink["where"] == "above" and shrink["front"] == "shrinkage"
    # the per-block front at 0.4 is 0.985: the merge is 0.015 below it in every seed
    assert hma[0]["where"] == "below" and hma[0]["front"] == "hma"
    assert hma[0]["mean"] == pytest.approx(-0.015)
    front = hma_frame(table, ("lab_knowledge", "acc"), fmt)
    # the base (0.2, .98) is beaten by (0.4, .985) on both
    assert list(front["label"]) == ["sft ×[0/0.5/1]", "sft ×0.5", "sft"]
