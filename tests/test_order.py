"""The order a run visits its rows (``dtm.train.order``), padding, and a micro-batch that
does not fit (``dtm.train.oom``), on a tiny random Llama that is not the lab's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from archs import corpus, make_model
from conftest import ROOT, write_jsonl

from dtm.train.order import epoch_order, padding_share, step_plan

INJECT = Path(__file__).parent / "inject_oom"


def test_the_plain_order_is_the_trainers_seeded_shuffle():
    from accelerate.data_loader import SeedableRandomSampler

    lengths = list(range(37))
    sampler = SeedableRandomSampler(data_source=lengths, data_seed=11)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        assert epoch_order(lengths, 11, epoch, 4, by_length=False) == list(sampler)


@pytest.mark.parametrize("n,step_rows", [(1000, 8), (37, 4), (300, 6)])
def test_length_grouped_is_transformers_rule_seeded_per_epoch(n, step_rows):
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [random.Random(n).randint(3, 300) for _ in range(n)]
    for epoch in (0, 3):
        g = torch.Generator()
        g.manual_seed(7 + epoch)
        want = get_length_grouped_indices(lengths, step_rows, generator=g)
        assert epoch_order(lengths, 7, epoch, step_rows, by_length=True) == want


def test_padding_of_real_length_rows_at_micro_batch_8():
    r = subprocess.run(
        [sys.executable, "-m", "bench.padding"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    row = re.search(r"a run, micro-batch 8\s+([\d.]+)%\s+([\d.]+)%", r.stdout)
    shuffled, grouped = float(row[1]) / 100, float(row[2]) / 100
    assert shuffled > 0.4  # rows of real instruction data's spread of lengths
    assert grouped <= 0.15


def test_padding_share_by_hand():
    # two batches: [5, 3] padded to 5 (2 pads), [4] alone (none): 2 of 14 positions
    assert padding_share([5, 3, 4], [[0, 1], [2]]) == pytest.approx(2 / 14)


def test_the_group_plan_splits_each_step_into_its_micro_batches():
    lengths = [1 + i % 7 for i in range(50)]
    plan = list(step_plan(lengths, 2, micro=4, accum=3, steps=6, by_length=True))
    order = epoch_order(lengths, 2, 0, 12, by_length=True)
    flat = [i for _, chunk in plan[:5] for mb in chunk for i in mb]
    assert flat == order[:50]  # epoch 0: 5 steps (4 of 12 rows, the last of 2)
    assert [len(c) for _, c in plan[:5]] == [3, 3, 3, 3, 1]
    assert plan[5][1][0] == epoch_order(lengths, 2, 1, 12, by_length=True)[:4]
    assert plan[4][0] == pytest.approx(1.0) and plan[5][0] == pytest.approx(1 + 3 / 13)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama; 40 rows whose responses run from 4 to ~60 words, in two
    unequal clusters."""
    root = tmp_path_factory.mktemp("order")
    base = make_model("llama", root / "base")
    texts = corpus(80)
    rows = [
        {
            "id": f"r{i}",
            "instruction": texts[2 * i],
            "input": "",
            "output": " ".join([texts[2 * i + 1]] * (1 + i % 6)),
        }
        for i in range(40)
    ]
    data = write_jsonl(root / "data.jsonl", rows)
    asg = root / "asg.csv"
    asg.write_text("id,cluster\n" + "".join(f"r{i},{int(i % 3 == 0)}\n" for i in range(40)))
    return base, data, asg


SETTINGS = {
    "steps": 6, "batch_size": 4, "micro_batch_size": 4, "max_length": 128, "log_every": 3,
    "probe_size": 4, "lr": 2e-3, "seed": 3, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
    "fisher_size": 4, "save_every": 3,
}  # fmt: skip


def _flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _train(base, data, out, *extra, oom_rows=None, oom_after=0, **values):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if oom_rows is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(INJECT), env.get("PYTHONPATH", "")])
        env["DTM_TEST_OOM_ROWS"], env["DTM_TEST_OOM_AFTER"] = str(oom_rows), str(oom_after)
    cmd = [sys.executable, "-m", "dtm", "train", "--base", str(base), "--data", str(data)]
    cmd += _flags({**SETTINGS, **values}) + [*extra, "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    """The run at its planned micro-batch (4; the shuffled order: auto on a CPU) and the
    same run planned at micro-batch 2: the references of the tests below."""
    base, data, _ = llama
    root = tmp_path_factory.mktemp("plain")
    for name, extra in (("plain", {}), ("planned2", {"micro_batch_size": 2})):
        r = _train(base, data, root / name, **extra)
        assert r.returncode == 0, r.stderr[-2000:]
    return root / "plain", root / "planned2"


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def test_a_run_with_length_grouped_batches_computes_fewer_pads(llama, plain, tmp_path):
    base, data, _ = llama
    r = _train(base, data, tmp_path / "on", "--group-by-length", "on")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {"off": _records(plain[0]), "on": _records(tmp_path / "on")}
    for grouping, folder in (("off", plain[0]), ("on", tmp_path / "on")):
        used = json.loads((folder / "config.json").read_text())
        assert used["group_by_length_used"] is (grouping == "on")
    real = {g: sum(x["tokens"] for x in recs) for g, recs in runs.items()}
    computed = {g: sum(x["padded_tokens"] for x in recs) for g, recs in runs.items()}
    assert real["on"] == real["off"]  # one epoch of 40 rows in 10 steps: the same rows
    assert computed["on"] < computed["off"]
    assert all(x["padded_tokens"] >= x["tokens"] for recs in runs.values() for x in recs)


@pytest.mark.fault
def test_out_of_memory_splits_the_micro_batch_and_keeps_the_maths(llama, plain, tmp_path):
    """Micro-batch 4 runs out of memory at the first step: the run goes on at 2 (two
    accumulation steps, the same batch) and its adapter is that of a run planned at 2."""
    base, data, _ = llama
    r = _train(base, data, tmp_path / "oom", oom_rows=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "out of memory at micro-batch 4" in r.stderr and "going on with micro-batch 2" in r.stderr
    )
    assert "Traceback" not in r.stderr
    cfg = json.loads((tmp_path / "oom" / "config.json").read_text())
    assert cfg["micro_batch_size_used"] == 2
    assert cfg["out_of_memory"] == [
        {"step": 0, "micro_batch_size": 2, "accumulation": 2, "from": 4}
    ]
    assert _rel(_adapter(tmp_path / "oom"), _adapter(plain[1])) < 1e-4
    steps = [x["step"] for x in _records(tmp_path / "oom")]
    assert steps == [x["step"] for x in _records(plain[1])] == [0, 3, 6]


@pytest.mark.fault
def test_out_of_memory_after_a_checkpoint_resumes_from_it(llama, plain, tmp_path):
    """The error comes at step 5, after the checkpoint of step 3: the run goes on from
    that checkpoint at micro-batch 2; its records and adapter are those of a run with no
    error (to float rounding)."""
    base, data, _ = llama
    r = _train(base, data, tmp_path / "late", oom_rows=2, oom_after=4)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 3: going on with micro-batch 2" in r.stderr, r.stderr[-2000:]
    assert _rel(_adapter(tmp_path / "late"), _adapter(plain[0])) < 1e-4
    late, want = _records(tmp_path / "late"), _records(plain[0])
    assert [x["step"] for x in late] == [x["step"] for x in want]
    for x, y in zip(late, want, strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)


@pytest.mark.fault
def test_out_of_memory_at_micro_batch_1_exits_2_and_keeps_the_checkpoint(llama, tmp_path):
    base, data, _ = llama
    out = tmp_path / "none"
    r = _train(base, data, out, oom_rows=0, oom_after=4)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = next(x for x in r.stderr.splitlines() if x.startswith("error:"))
    assert "out of memory at micro-batch 1" in last and "128 tokens" in last, last
    assert re.search(r"memory estimate for the planned micro-batch 4 was ~\d+ MiB", last)
    assert (out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert not (out / "adapter").exists()


@pytest.mark.fault
def test_a_group_splits_its_micro_batches_and_equals_a_group_planned_smaller(llama, tmp_path):
    """SFT + 2 sub-models at micro-batch 4 hold 12 rows in one forward; with room for 6 the
    group goes on at micro-batch 2, and each member's adapter is that of the group
    planned at micro-batch 2."""
    base, data, asg = llama
    group = ["--kind", "subs", "--with-sft", "--assignments", str(asg)]
    r = _train(base, data, tmp_path / "oom", *group, oom_rows=6)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("going on with micro-batch 2") == 3  # one line per member
    planned = _train(base, data, tmp_path / "planned", *group, micro_batch_size=2)
    assert planned.returncode == 0, planned.stderr[-2000:]
    for member in ("sft", "cluster-0", "cluster-1"):
        got, want = tmp_path / "oom" / member, tmp_path / "planned" / member
        assert _rel(_adapter(got), _adapter(want)) < 1e-4, member
        assert json.loads((got / "config.json").read_text())["micro_batch_size_used"] == 2
