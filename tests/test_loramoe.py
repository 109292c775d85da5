"""LoRAMoE (``dtm.moe``): the forward against a hand computation, the localized balancing
constraint against its formula, and ``dtm train --kind loramoe`` -> ``dtm eval`` through
the CLI on a model that is not the lab's (a tiny Qwen2), with non-default experts, rank,
alpha, groups and weight."""

import json

import numpy as np
import pytest
import torch
from archs import instruction_rows, make_model, write_tasks
from conftest import dtm_cli, write_jsonl

from dtm import moe


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_model("qwen2", tmp_path_factory.mktemp("moe") / "qwen2")


def _inject(folder, experts=3, r=2, alpha=6.0, groups=1):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    names = [n for n, m in model.named_modules() if n.endswith(("up_proj", "down_proj"))]
    cfg = moe.LoRAMoEConfig(experts, r, alpha, 0.0, names, groups, 0.2, 0.5)
    return moe.inject(model, cfg), names


def test_the_forward_is_the_gated_sum_of_the_experts_computed_by_hand(qwen):
    from transformers import AutoModelForCausalLM

    model, names = _inject(qwen)
    base = AutoModelForCausalLM.from_pretrained(qwen).eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():  # B = 0 at the start: the model is the base
        assert torch.equal(model(ids).logits, base(ids).logits)
    torch.manual_seed(1)
    layer = model.get_submodule(names[0])
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        model(ids)
    x, y = seen["x"][0].double(), seen["y"][0].double()  # (T, in), (T, out)
    w = layer.base.weight.detach().double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    wg = layer.router.weight.detach().double()
    want = []
    for t in range(x.shape[0]):  # token by token, expert by expert
        logits = [float(wg[e] @ x[t]) for e in range(3)]
        g = np.exp(logits) / np.exp(logits).sum()
        out = w @ x[t]
        for e in range(3):
            out = out + (6.0 / 2) * g[e] * (b[e] @ (a[e] @ x[t]))
        want.append(out)
    assert torch.allclose(y, torch.stack(want), atol=1e-4)
    assert torch.allclose(layer.gates[0].double().sum(-1), torch.ones(6, dtype=torch.float64))


def test_shrinking_a_loramoe_adapter_scales_each_layers_delta_and_keeps_the_gates(qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    from dtm.controls import is_scaled, shrink_adapter

    model, names = _inject(qwen)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in moe.layers(model):
            layer.lora_B.normal_()
            layer.router.weight.normal_()
    moe.save_adapter(model, tmp_path / "a")
    out = shrink_adapter(tmp_path / "a", 0.4, tmp_path / "a-x0.4")
    assert is_scaled(out) and not is_scaled(tmp_path / "empty")
    scaled = moe.load_adapter(AutoModelForCausalLM.from_pretrained(qwen).eval(), out)
    x = torch.randn(5, model.get_submodule(names[1]).base.in_features)
    with torch.no_grad():
        full, small = model.get_submodule(names[1]), scaled.get_submodule(names[1])
        base = full.base(x)
        assert torch.allclose(small(x) - base, 0.4 * (full(x) - base), atol=1e-5)
        assert torch.equal(small.gates, full.gates)


def test_the_balancing_constraint_is_var_over_mean_of_the_weighted_importance():
    torch.manual_seed(0)
    gates = torch.softmax(torch.randn(2, 4, 3), -1)  # 2 rows, 4 tokens, 3 experts
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    types = torch.tensor([1, 0])  # a knowledge row, a task row
    got = float(moe.balance_term(gates, mask, types, groups=1, delta=0.2))
    g = gates.numpy()
    q = np.array([[g[m, : int(mask[m].sum()), e].sum() for m in range(2)] for e in range(3)])
    coef = np.array([[1.2, 0.8], [0.8, 1.2], [0.8, 1.2]])  # expert 0 is the knowledge group
    z = coef * q
    assert got == pytest.approx(z.var() / z.mean(), rel=1e-5)
    uniform = torch.full((2, 4, 3), 1 / 3)  # equal importance and delta 0: no penalty
    assert float(moe.balance_term(uniform, None, None, groups=1, delta=0.0)) == pytest.approx(0)


def _train(qwen, data, out, *extra):
    return dtm_cli(
        "train", "--kind", "loramoe", "--base", qwen, "--data", data, "--steps", "3",
        "--log-every", "1", "--save-every", "2", "--batch-size", "4", "--micro-batch-size", "2",
        "--max-length", "64", "--lora-r", "4", "--lora-alpha", "12", "--lora-dropout", "0",
        "--lr", "5e-3", "--val-fraction", "0.25", "--out", out, *extra,
    )  # fmt: skip


def test_train_loramoe_writes_a_run_folder_that_eval_loads_and_merge_refuses(qwen, tmp_path):
    rows = instruction_rows(16)
    for i, r in enumerate(rows):
        r["source"] = "cbqa" if i % 3 == 0 else "chat"
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    extra = ["--experts", "3", "--moe-groups", "1", "--moe-balance", "0.5"]
    r = _train(qwen, data, run, *extra, "--moe-knowledge-sources", "cbqa")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        0, 1, 2, 3,
    ]  # fmt: skip
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "loramoe" and cfg["experts"] == 3
    adapter = run / "adapter"
    mcfg = json.loads((adapter / "loramoe_config.json").read_text())
    assert mcfg["experts"] == 3 and mcfg["groups"] == 1 and mcfg["r"] == 4
    assert mcfg["alpha"] == 12 and mcfg["balance"] == 0.5
    assert {n.rpartition(".")[2] for n in mcfg["target_modules"]} == {
        "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert (ckpt / "loramoe_model.safetensors").exists()  # the experts, not the base
    assert not (ckpt / "model.safetensors").exists()

    from safetensors.torch import load_file

    from dtm.models import load_model

    saved = load_file(adapter / "loramoe_model.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("lora_B"))
    model, _ = load_model(str(qwen), adapter)
    for name, layer in moe.layers(model):
        assert torch.equal(layer.lora_B, saved[f"{name}.lora_B"])
        assert torch.equal(layer.router.weight, saved[f"{name}.router.weight"])

    tasks = write_tasks(tmp_path / "tasks")
    scores = {}
    for name, adapter_args in (("moe", ["--adapter", adapter]), ("base", [])):
        res = dtm_cli(
            "eval", "--model", qwen, *adapter_args, "--tasks", "my_mc,my_ll", "--tasks-dir",
            tasks, "--out", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(scores["moe"]) == {"my_mc", "my_ll"}
    assert scores["moe"]["my_ll"] != scores["base"]["my_ll"]  # the experts were applied

    merged = dtm_cli(
        "merge", "--base", qwen, "--adapters", adapter, adapter, "--out", tmp_path / "m"
    )
    assert merged.returncode == 2
    assert "LoRAMoE adapter; it cannot be merged" in merged.stderr

    # Stopped after 2 steps, then resumed to 3 from the LoRAMoE checkpoint
    assert _train(qwen, data, tmp_path / "run2", *extra, "--steps", "2").returncode == 0
    again = _train(qwen, data, tmp_path / "run2", *extra, "--resume")
    assert again.returncode == 0, again.stderr
    metrics = (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == [0, 1, 2, 3]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--experts", "0"], "at least 1 expert"),
        (["--experts", "3", "--moe-groups", "4"], "the first group holds 0..3"),
        (["--moe-delta", "1.5"], "group contrast is in [0, 1)"),
        (["--moe-knowledge-sources", "nowhere"], "no row of"),
    ],
)
def test_bad_loramoe_parameters_exit_2_naming_them(qwen, tmp_path, extra, message):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_rows(8))
    r = _train(qwen, data, tmp_path / "run", *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


@pytest.mark.bad_input
def test_an_moe_flag_on_another_kind_exits_2(qwen, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_rows(8))
    r = dtm_cli("train", "--base", qwen, "--data", data, "--experts", "3", "--out", tmp_path / "r")
    assert r.returncode == 2 and "--experts is for kind loramoe" in r.stderr
