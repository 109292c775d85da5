"""Memory that fits, decided before loading: the ``--dtype``, ``--attn`` and
``--gradient-checkpointing`` flags, what ``auto`` records, the estimate from a model's
shape, the dry run's memory table, and checkpointing leaving the result as it was."""

import json
import re

import pytest
from archs import instruction_rows, make_model
from conftest import dtm_cli, write_jsonl

from dtm.errors import ConfigError
from dtm.train.config import TrainConfig, check_config, run_id
from dtm.train.memory import GIB, Job, Machine, Shape, choose, estimate, shape_from_config

# max |diff| / max |w| of the adapters with checkpointing on and off (float rounding)
REL = 1e-5


@pytest.mark.parametrize(
    "flag,value", [("--dtype", "bf17"), ("--attn", "flash"), ("--gradient-checkpointing", "yes")]
)
def test_a_bad_value_of_the_new_flags_exits_2_naming_the_flag(flag, value, tmp_path):
    r = dtm_cli("train", "--base", "b", "--data", "d", "--out", tmp_path, flag, value)
    assert r.returncode == 2 and flag in r.stderr and value in r.stderr, r.stderr
    # the same value from a config file: a ConfigError naming the flag
    cfg = TrainConfig(base="b", data="d", out="o", **{flag[2:].replace("-", "_"): value})
    with pytest.raises(ConfigError, match=re.escape(flag)):
        check_config(cfg)


def test_train_help_lists_the_three_flags():
    r = dtm_cli("train", "--help")
    for flag in ("--gradient-checkpointing", "--dtype", "--attn"):
        assert flag in r.stdout, flag


def test_default_run_ids_are_unchanged():
    # computed on the code before these fields were added
    assert run_id(TrainConfig(base="b", data="d", out="o")) == "3e317ade675be4f6d5e9"
    sub = TrainConfig(
        base="models/x", data="data.jsonl", out="o", kind="sub", assignments="a.csv", cluster=1,
        steps=5,
    )  # fmt: skip
    assert run_id(sub) == "9ece32d81a8f78a16b41"
    # how a run is computed (checkpointing, the attention kernel) is not what it computes
    how = TrainConfig(base="b", data="d", out="o", gradient_checkpointing="on", attn="eager")
    assert run_id(how) == "3e317ade675be4f6d5e9"
    assert run_id(TrainConfig(base="b", data="d", out="o", dtype="bf16")) != run_id(how)


def test_the_estimate_against_a_hand_computation():
    shape = Shape(hidden=8, intermediate=16, layers=2, heads=2, vocab=10)
    job = Job(micro_batch_size=3, max_length=5, lora_r=2, target_modules=("gate_proj", "down_proj"))
    # weights: embed + head 2*10*8 = 160; a layer 2*8*8 + 2*8*8 + 3*8*16 + 2*8 = 656; norm 8
    assert shape.params() == 160 + 2 * 656 + 8 == 1480
    est = estimate(shape, [job], "bf16", "sdpa", False)
    assert est.weights == 1480 * 2
    # LoRA: r*(8+16) per matrix, 2 matrices, 2 layers = 192 parameters at 16 bytes
    assert est.lora == 192 * 16
    # T = 15 tokens; 34*h bytes per token and layer in 16-bit; L = 2
    assert est.activations == 15 * 2 * 34 * 8
    assert est.logits == 10 * 15 * 4
    ckpt = estimate(shape, [job], "bf16", "sdpa", True)
    assert ckpt.activations == 15 * (2 * 8 * 2 + 34 * 8)  # each layer's input + one layer
    eager = estimate(shape, [job], "fp32", "eager", False)
    assert eager.activations == 15 * 2 * (68 * 8 + 5 * 2 * 5 * 2)  # fp32: a = 4
    # a group: every member's rows in one forward, each member its own adapter
    group = estimate(shape, [job] * 3, "bf16", "sdpa", False)
    assert group.activations == 3 * est.activations and group.lora == 3 * est.lora
    assert group.weights == est.weights
    # Llama-2-7b from its config.json keys
    llama = shape_from_config(
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
    )  # fmt: skip
    assert round(llama.params() / 1e9, 2) == 6.74


def test_auto_chooses_by_the_machine():
    shape = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
    cfg = TrainConfig(base="b", data="d", out="o", micro_batch_size=4, max_length=1024)
    cpu = choose([cfg], shape, Machine(gpu=False))
    assert (cpu.dtype, cpu.attn, cpu.checkpointing) == ("fp32", None, False)
    gpu = Machine(gpu=True, bf16=True, memory_gib=80)
    alone = choose([cfg], shape, gpu)
    assert (alone.dtype, alone.attn, alone.checkpointing, alone.fits) == (
        "bf16",
        "sdpa",
        False,
        True,
    )
    group = choose([cfg] * 5, shape, gpu)  # SFT + 4 sub-models: 20 rows in one forward
    assert group.checkpointing and group.fits
    flash = choose([cfg], shape, Machine(gpu=True, bf16=True, memory_gib=80, flash=True))
    assert flash.attn == "flash_attention_2"
    old = choose([cfg], shape, Machine(gpu=True, bf16=False, memory_gib=16))
    assert old.dtype == "fp32" and old.attn == "sdpa" and old.checkpointing
    set_by_hand = TrainConfig(**{**vars(cfg), "gradient_checkpointing": "off", "dtype": "fp16"})
    hand = choose([set_by_hand] * 5, shape, gpu)
    assert hand.dtype == "fp16" and not hand.checkpointing and hand.fits is False
    assert hand.estimate.total > 0.9 * 80 * GIB


def test_the_paper_dry_run_prints_a_fitting_estimate_for_every_job(cache):
    r = dtm_cli("run", "experiments/paper-llama2-7b.yaml", "--dry-run", "--gpu-memory", "80", cache=cache)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("memory per job on one GPU of 80 GiB")[1].splitlines()[1:]
    names = [x.strip().split("  ")[0] for x in lines]
    # the group job (SFT and the 4 sub-models) and every job that trains on its own
    # by the plan's numbers: 1-5 SFT and the sub-models, 9 the soup (it trains nothing)
    assert names == [
        "jobs 1-5 (5 together)", "job 6 (sft)", "job 7 (sft)", "job 8 (sft)", "job 10 (l2)",
        "job 11 (ewc)", "job 12 (replay)", "job 13 (curate)", "job 14 (loramoe)",
    ], r.stdout  # fmt: skip
    assert "  9. soup s0" in r.stdout
    for line in lines:
        assert re.search(r"\d+\.\d GiB  fits  auto: bf16, sdpa, checkpointing (on|off)", line)
    assert "checkpointing on" in lines[0]  # the group's 20 rows need it at 80 GiB
    small = dtm_cli("run", "experiments/paper-llama2-7b.yaml", "--dry-run", "--gpu-memory", "24", cache=cache)  # fmt: skip
    assert small.returncode == 0 and "does NOT fit" in small.stdout
    bad = dtm_cli("run", "experiments/paper-llama2-7b.yaml", "--dry-run", "--gpu-memory", "0")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama and 30 instruction rows in two clusters."""
    root = tmp_path_factory.mktemp("memory")
    base = make_model("llama", root / "base")
    rows = instruction_rows(30)
    data = write_jsonl(root / "data.jsonl", rows)
    asg = root / "asg.csv"
    asg.write_text("id,cluster\n" + "".join(f"{r['id']},{i % 2}\n" for i, r in enumerate(rows)))
    return base, data, asg


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def _counting_layers(monkeypatch) -> list:
    """Count the MLPs' forwards: checkpointing runs each decoder layer again in backward
    (the layer's own forward is the checkpoint's wrapper, so count inside it)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    forward = LlamaMLP.forward

    def counted(self, *args, **kw):
        calls.append(1)
        return forward(self, *args, **kw)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    return calls


SETTINGS = {
    "steps": 3, "batch_size": 4, "micro_batch_size": 2, "max_length": 256, "log_every": 3,
    "probe_size": 4, "lr": 2e-3, "seed": 3, "fisher_size": 4,
}  # fmt: skip


@pytest.mark.parametrize("kind", ["sft", "subs"])
def test_checkpointing_leaves_the_adapters_as_they_were(kind, llama, tmp_path, monkeypatch):
    """On a tiny Llama (dropout 0.05 as the default: the recompute replays the RNG), a
    single run and a group run (``--kind subs --with-sft``) with checkpointing on and
    off; ``config.json`` records what was used."""
    from dtm.jobs.runner import run_training

    base, data, asg = llama
    extra = {"assignments": str(asg), "with_sft": True} if kind == "subs" else {}
    calls, folders = {}, {}
    for ckpt in ("off", "on"):
        counter = _counting_layers(monkeypatch)
        cfg = TrainConfig(
            base=str(base), data=str(data), out=str(tmp_path / ckpt), kind=kind,
            gradient_checkpointing=ckpt, **SETTINGS, **extra,
        )  # fmt: skip
        run_training(cfg)
        calls[ckpt] = len(counter)
        folders[ckpt] = (
            [tmp_path / ckpt / m for m in ("cluster-0", "cluster-1", "sft")]
            if kind == "subs"
            else [tmp_path / ckpt]
        )
    assert calls["on"] > calls["off"]  # the layers did run again in the backward pass
    for on, off in zip(folders["on"], folders["off"], strict=True):
        reached = _rel(_adapter(on), _adapter(off))
        print(f"{kind} {on.name}: checkpointing on vs off, max |diff| / max |w| = {reached:.1e}")
        assert reached < REL, on
        for folder, used in ((on, True), (off, False)):
            c = json.loads((folder / "config.json").read_text())
            assert c["gradient_checkpointing"] == ("on" if used else "off")
            assert c["gradient_checkpointing_used"] is used
            # on a CPU, auto is fp32 and the attention transformers picks by default
            assert c["dtype"] == "auto" and c["dtype_used"] == "fp32"
            assert c["attn"] == "auto" and c["attn_used"] == "sdpa"
            assert c["memory_estimate_bytes"] > 0
        assert (
            json.loads((on / "config.json").read_text())["run_id"]
            == json.loads((off / "config.json").read_text())["run_id"]
        )
