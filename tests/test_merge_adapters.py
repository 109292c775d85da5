"""The merge engine takes adapters as users have them: mixed ranks, lora_alpha and rslora
(exact for linear and dense methods, refused by the factor methods), dense exports with a
per-layer rank for GQA targets, and unsupported adapter features refused by name."""

import json
import shutil

import pytest
import torch
from conftest import dtm_cli

from dtm.errors import ConfigError
from dtm.merge.engine import Merger

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj"]
VOCAB = 96
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama with GQA (k_proj / v_proj out dim 32, q_proj 64); no tokenizer
    (a merge needs none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("base") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def load_plain(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def make_adapter(base, out, *, r, alpha, seed, targets=TARGETS, **kw):
    """A peft LoRA adapter with random (seeded) lora_B, so its delta is not zero."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **kw)
    model = get_peft_model(load_plain(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory):
    """Adapters of ranks 2, 4, 8 (lora_alpha != r, one rslora), and one with a per-layer
    rank and alpha (rank_pattern / alpha_pattern)."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(base, root / "r2", r=2, alpha=5, seed=1),
        make_adapter(base, root / "r4", r=4, alpha=3, seed=2, use_rslora=True),
        make_adapter(base, root / "r8", r=8, alpha=16, seed=3),
        make_adapter(
            base,
            root / "pattern",
            r=4,
            alpha=8,
            seed=4,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"k_proj": 3},
        ),
    ]


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def dense_reference(base, adapters, weights, blocks_of_layer=None):
    """W0 + sum_k w_k s_k B_k A_k, read here straight from each adapter's files (s_k =
    alpha / r, or alpha / sqrt(r) with rslora; per-layer r and alpha from the patterns).
    With ``blocks_of_layer`` ({layer: block}), ``weights`` is a K x B table and layer l
    takes ``weights[k][block of l]``."""
    import re

    from safetensors.torch import load_file

    model = load_plain(base)
    with torch.no_grad():
        for k, path in enumerate(adapters):
            cfg = json.loads((path / "adapter_config.json").read_text())
            tensors = load_file(path / "adapter_model.safetensors")
            for key, a in tensors.items():
                if ".lora_A." not in key:
                    continue
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                module = key.split(".lora_A.")[0].removeprefix(PREFIX)
                r, alpha = cfg["r"], cfg["lora_alpha"]
                for pat, v in (cfg.get("rank_pattern") or {}).items():
                    r = v if module.endswith(pat) else r
                for pat, v in (cfg.get("alpha_pattern") or {}).items():
                    alpha = v if module.endswith(pat) else alpha
                assert a.shape[0] == r
                s = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
                w = weights[k]
                if blocks_of_layer is not None:
                    layer = int(re.search(r"\.layers\.(\d+)\.", module).group(1))
                    w = weights[k][blocks_of_layer[layer]]
                model.get_submodule(module).weight += w * s * (b.float() @ a.float())
    return logits(model)


def with_adapter(base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_plain(base), folder).eval()


def test_mixed_ranks_linear_exact(base, mixed, tmp_path):
    weights = [0.7, -0.4, 1.3, 0.5]
    ref = dense_reference(base, mixed, weights)
    plain = logits(load_plain(base))
    assert (ref - plain).abs().max() > 1e-2  # the deltas matter
    merger = Merger(str(base), mixed)
    got = logits(merger.apply("linear", weights))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # average: the same with the weights normalised to sum 1
    avg = logits(merger.apply("average", weights))
    total = sum(weights)
    ref_avg = dense_reference(base, mixed, [w / total for w in weights])
    torch.testing.assert_close(avg, ref_avg, atol=1e-4, rtol=1e-4)

    out = merger.export(tmp_path / "concat", "linear", weights)
    cfg = json.loads((out / "adapter_config.json").read_text())
    # per layer: 2 + 4 + 8 + (4, or 2 on k_proj)
    assert cfg["r"] == 18 and set(cfg["rank_pattern"].values()) == {16}
    assert all(k.endswith("k_proj") for k in cfg["rank_pattern"])
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and not cfg["use_rslora"]
    torch.testing.assert_close(logits(with_adapter(base, out)), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize("method", ["fisher", "official_ab_average"])
def test_factor_methods_refuse_mixed_ranks(base, mixed, method, tmp_path):
    # checked before the base loads: a base folder that does not exist is never reached
    with pytest.raises(ConfigError) as e:
        Merger(str(tmp_path / "no-such-base"), mixed[:3], method=method)
    msg = str(e.value)
    assert method in msg and "ranks 2, 4, 8" in msg and "average, ties or dare" in msg
    merger = Merger(str(base), mixed[:3])
    for call in (
        lambda: merger.apply(method, [1, 1, 1]),
        lambda: merger.export(tmp_path / "out", method, [1, 1, 1]),
    ):
        with pytest.raises(ConfigError, match=r"ranks 2, 4, 8"):
            call()
    assert not (tmp_path / "out").exists()


def test_ties_export_gqa_loads_in_peft(base, mixed, tmp_path):
    weights = [0.6, 0.8, 1.0, 0.4]
    merger = Merger(str(base), mixed)
    out = merger.export(tmp_path / "ties", "ties", weights, density=0.5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    # full rank min(out, in): 64 for q_proj / gate_proj, 32 for the GQA k_proj / v_proj
    assert cfg["r"] == 64 and cfg["lora_alpha"] == 64
    assert {k.rsplit(".", 1)[-1] for k in cfg["rank_pattern"]} == {"k_proj", "v_proj"}
    assert set(cfg["rank_pattern"].values()) == {32}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    exported = logits(with_adapter(base, out))
    in_memory = logits(merger.apply("ties", weights, density=0.5))
    assert (in_memory - logits(load_plain(base))).abs().max() > 1e-2
    torch.testing.assert_close(exported, in_memory, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return make_adapter(base, tmp_path_factory.mktemp("good") / "a", r=4, alpha=8, seed=5)


def edited(good, folder, **changes):
    shutil.copytree(good, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "changes, feature",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_features_refused(base, good, tmp_path, changes, feature):
    bad = edited(good, tmp_path / "bad", **changes)
    with pytest.raises(ConfigError) as e:
        Merger(str(base), [good, bad])
    assert feature in str(e.value) and str(bad) in str(e.value)
    from dtm.merge.lora import linear_concat

    with pytest.raises(ConfigError, match=feature):
        linear_concat([bad, good], [0.5, 0.5], tmp_path / "m")


@pytest.mark.bad_input
def test_embedding_lora_refused(base, good, tmp_path):
    emb = make_adapter(
        base, tmp_path / "emb", r=4, alpha=8, seed=6, targets=["embed_tokens", "q_proj"]
    )
    with pytest.raises(ConfigError) as e:
        Merger(str(base), [good, emb])
    assert "embedding LoRA" in str(e.value) and "embed_tokens" in str(e.value)
    assert str(emb) in str(e.value)


@pytest.mark.bad_input
def test_cli_refuses_dora(base, good, tmp_path):
    bad = edited(good, tmp_path / "dora", use_dora=True)
    res = dtm_cli(
        "merge", "--base", base, "--adapters", good, bad, "--out", tmp_path / "out", timeout=300
    )
    assert res.returncode == 2, res.stderr
    assert "DoRA" in res.stderr and str(bad) in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def by_block_reference(base, adapters, table, blocks_of_layer):
    """W0 + sum_k table[k][b(l)] s_k B_k A_k, layer l in block b(l) (``dense_reference``
    with each layer's block's weights)."""
    return dense_reference(base, adapters, table, blocks_of_layer)


def test_per_block_linear_merge_is_exact_and_exports_exactly(base, mixed, tmp_path):
    """A K x B table: layer 0 takes block 0's weights, layer 1 block 1's (2 layers in 2
    blocks); mixed ranks, lora_alpha != r, rslora and a rank pattern."""
    table = [[0.7, -0.2], [-0.4, 0.9], [1.3, 0.1], [0.5, 0.6]]
    ref = by_block_reference(base, mixed, table, {0: 0, 1: 1})
    merger = Merger(str(base), mixed)
    flat0 = logits(merger.apply("linear", [row[0] for row in table]))
    assert (ref - flat0).abs().max() > 1e-2  # the blocks' weights matter
    torch.testing.assert_close(logits(merger.apply("linear", table)), ref, atol=1e-4, rtol=1e-4)
    # average normalises each block's column to sum 1
    norm = [[row[b] / sum(r[b] for r in table) for b in (0, 1)] for row in table]
    torch.testing.assert_close(
        logits(merger.apply("average", table)),
        by_block_reference(base, mixed, norm, {0: 0, 1: 1}),
        atol=1e-4,
        rtol=1e-4,
    )
    out = merger.export(tmp_path / "blocks", "linear", table)
    torch.testing.assert_close(logits(with_adapter(base, out)), ref, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "recipe.json").read_text())["weights"] == table
    # a table whose columns agree is the one-number merge, and is recorded as one
    same = [[w, w] for w in (0.7, -0.4, 1.3, 0.5)]
    torch.testing.assert_close(
        logits(merger.apply("linear", same)),
        logits(merger.apply("linear", [0.7, -0.4, 1.3, 0.5])),
        atol=0,
        rtol=0,
    )
    assert merger.recipe("linear", same, {})["weights"] == [0.7, -0.4, 1.3, 0.5]
    # a block of zeros keeps the base's weights in its layers (the per-block frontier's)
    zero = [[0.0, w] for w in (0.7, -0.4, 1.3, 0.5)]
    torch.testing.assert_close(
        logits(merger.apply("linear", zero)),
        by_block_reference(base, mixed, zero, {0: 0, 1: 1}),
        atol=1e-4,
        rtol=1e-4,
    )


def test_per_block_dense_merge_uses_each_layers_block(base, mixed):
    """ties with a K x B table: each layer's weights are exactly ties' with its block's
    column (layer 0: block 0, layer 1: block 1)."""
    merger = Merger(str(base), mixed)
    table = [[0.9, 0.1], [0.1, 0.2], [0.3, 1.0], [0.2, 0.4]]

    def weights_now():
        return {n: m.base_layer.weight.detach().clone() for n, m in merger.layers.items()}

    merger.apply("ties", table, density=0.5)
    got = weights_now()
    merger.apply("ties", [row[0] for row in table], density=0.5)
    col0 = weights_now()
    merger.apply("ties", [row[1] for row in table], density=0.5)
    col1 = weights_now()
    for n, w in got.items():
        want = col0[n] if ".layers.0." in n else col1[n]
        other = col1[n] if ".layers.0." in n else col0[n]
        assert torch.equal(w, want), n
        assert not torch.equal(w, other), n


@pytest.mark.bad_input
def test_cli_refuses_weight_tables_that_do_not_fit(base, good, tmp_path):
    """K = 2 adapters on a 2-layer base: each bad table exits 2 naming what is wrong,
    before anything is written."""
    other = make_adapter(base, tmp_path / "other", r=2, alpha=3, seed=9)
    args = ["merge", "--base", base, "--adapters", good, other, "--out", tmp_path / "out"]
    cases = [
        (["--weights", "0.5,0.5;0.2,0.3,0.5"], "block 2: 3"),
        (["--weights", "0.5,0.5;0.2,0.8", "--blocks", "1"], "2 blocks, but --blocks 1"),
        (["--weights", "0.5,0.5;0.2,0.8;0.1,0.9"], "3 blocks but the model has 2 layers"),
        (["--weights", "1,1", "--blocks", "3"], "3 blocks but the model has 2 layers"),
    ]
    for extra, message in cases:
        res = dtm_cli(*args, *extra, timeout=300)
        assert res.returncode == 2, (extra, res.stderr[-1500:])
        assert message in res.stderr and "Traceback" not in res.stderr, (extra, res.stderr)
    assert not (tmp_path / "out").exists()
