"""The trainer: the paper's baselines, checkpoints and resume, a graceful stop, a NaN
stop, a failed save, the sub-model Fisher, and bad inputs, on the small lab's real model."""

import json
import resource
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, dtm_cli, round_robin_assignment, tiny_train
from safetensors.torch import load_file

from dtm.errors import ConfigError
from dtm.jobs.runner import run_training as train
from dtm.merge import read_adapter
from dtm.train import TrainingError, read_metrics


def dense_deltas(adapter_dir):
    """layer -> s * B @ A of a saved adapter."""
    return {
        n: s * (b.float() @ a.float()) for n, (a, b, s) in read_adapter(adapter_dir).layers.items()
    }


def delta_norm(adapter_dir) -> float:
    return sum(float(d.pow(2).sum()) for d in dense_deltas(adapter_dir).values())


@pytest.fixture(scope="module")
def sft_run(lab0, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    res = train(tiny_train(lab0, out))
    return out, res


def test_l2_and_ewc_penalties_shrink_the_delta_replay_doubles_the_rows(lab0, sft_run, tmp_path):
    sft_out, _ = sft_run
    l2 = train(tiny_train(lab0, tmp_path / "l2", kind="l2", l2_weight=1e4))
    ewc = train(tiny_train(lab0, tmp_path / "ewc", kind="ewc", ewc_weight=1e4))
    replay = train(tiny_train(lab0, tmp_path / "replay", kind="replay"))
    base = delta_norm(sft_out / "adapter")
    assert delta_norm(tmp_path / "l2" / "adapter") < 0.5 * base
    assert delta_norm(tmp_path / "ewc" / "adapter") < 0.9 * base
    sft_cfg = json.loads((sft_out / "config.json").read_text())
    replay_cfg = json.loads((tmp_path / "replay" / "config.json").read_text())
    assert replay_cfg["train_rows"] == 2 * sft_cfg["train_rows"]
    assert replay_cfg["reference"].endswith("data/corpus.txt")  # the lab's corpus by default
    for res in (l2, ewc, replay):
        assert [m["step"] for m in res["metrics"]] == [0, 2, 4]


def test_soup_is_the_exact_uniform_average_of_its_members(lab0, tmp_path, cache):
    train(tiny_train(lab0, tmp_path / "soup", kind="soup", members=3))
    members = [tmp_path / "soup" / "members" / str(i) / "adapter" for i in range(3)]
    merged = dense_deltas(tmp_path / "soup" / "adapter")
    parts = [dense_deltas(m) for m in members]
    assert read_adapter(tmp_path / "soup" / "adapter").config["r"] == 3 * 16
    for name, d in merged.items():
        torch.testing.assert_close(d, sum(p[name] for p in parts) / 3, rtol=1e-5, atol=1e-7)
    seeds = [json.loads((m.parent / "config.json").read_text())["seed"] for m in members]
    assert seeds == [0, 1, 2]
    recs = read_metrics(tmp_path / "soup" / "metrics.jsonl")
    assert sorted({r["member"] for r in recs}) == [0, 1, 2]


def test_a_soup_members_run_id_is_sfts_whatever_the_soups_size(lab0, tmp_path):
    from dataclasses import replace

    from dtm.train.config import run_id, soup_member

    sft = tiny_train(lab0, tmp_path / "sft", lora_alpha=32)
    soup = tiny_train(lab0, tmp_path / "soup", lora_alpha=32, kind="soup", members=3)
    # only a soup reads `members`: SFT's id is the same whatever it says
    assert run_id(replace(sft, members=3)) == run_id(sft) == run_id(replace(sft, members=9))
    assert run_id(soup) != run_id(replace(soup, members=4))  # two soups of other sizes
    for i in range(3):
        assert run_id(soup_member(soup, i, tmp_path / "m")) == run_id(replace(sft, seed=i))
    assert run_id(soup_member(soup, 0, "m")) != run_id(replace(sft, lora_alpha=16))


def test_sub_model_trains_on_its_cluster_and_saves_its_fisher(lab0, tmp_path):
    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    train(tiny_train(lab0, tmp_path / "sub", kind="sub", assignments=str(asg), cluster=1))
    cfg = json.loads((tmp_path / "sub" / "config.json").read_text())
    n_train = sum(1 for _ in (lab0 / "data" / "train.jsonl").open())
    assert cfg["train_rows"] == n_train // 2
    fisher = load_file(tmp_path / "sub" / "adapter" / "fisher.safetensors")
    weights = load_file(tmp_path / "sub" / "adapter" / "adapter_model.safetensors")
    assert fisher.keys() == weights.keys()
    assert all(f.shape == weights[k].shape and (f >= 0).all() for k, f in fisher.items())
    assert sum(float(f.sum()) for f in fisher.values()) > 0


@pytest.mark.fault
def test_stop_then_resume_continues_the_curve_as_if_uninterrupted(lab0, sft_run, tmp_path):
    """A stop request saves a checkpoint; resuming from it reaches the same weights and
    losses as the run that was never stopped."""
    from dtm.train import Stopped, request_stop

    sft_out, sft = sft_run
    cfg = tiny_train(lab0, tmp_path / "run")
    stop_at = {"step": 2}

    def on_step(step, total):
        if step == stop_at["step"]:
            request_stop()

    with pytest.raises(Stopped, match="step 2"):
        train(cfg, on_step=on_step)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "adapter").exists()
    res = train(cfg, resume=True)
    steps = [m["step"] for m in res["metrics"]]
    assert steps == [0, 2, 4]
    for a, b in zip(res["metrics"], sft["metrics"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    for name, d in dense_deltas(tmp_path / "run" / "adapter").items():
        torch.testing.assert_close(d, dense_deltas(sft_out / "adapter")[name], rtol=1e-3, atol=1e-5)


@pytest.mark.fault
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(lab0, tmp_path):
    cfg = tiny_train(
        lab0, tmp_path / "nan", steps=12, lr=1e30, max_grad_norm=1e30, save_every=1, log_every=1
    )
    with pytest.raises(TrainingError, match=r"loss became nan at step (\d+)") as e:
        train(cfg)
    assert "last good checkpoint" in str(e.value)
    ckpts = sorted((tmp_path / "nan" / "checkpoints").glob("checkpoint-*"))
    assert ckpts, "the last good checkpoint was kept"
    for c in ckpts:
        w = load_file(c / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in w.values())
    assert not (tmp_path / "nan" / "adapter").exists()


@pytest.mark.fault
def test_a_failed_save_leaves_no_adapter_that_looks_complete(lab0, tmp_path):
    """The adapter write hits the file-size limit (a real EFBIG from the kernel)."""
    out = tmp_path / "run"
    cfg = tiny_train(lab0, out, save_every=100)
    limit = 40_000  # bytes: the metrics and config fit, the adapter does not

    def cap():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in [
            ("base", cfg.base),
            ("data", cfg.data),
            ("val_data", cfg.val_data),
            ("out", out),
            ("steps", 4),
            ("log_every", 2),
            ("batch_size", 8),
            ("micro_batch_size", 8),
            ("max_length", 96),
            ("save_every", 100),
        ]
    ]
    r = subprocess.run(
        [sys.executable, "-m", "dtm", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not save" in r.stderr and "File too large" in r.stderr
    assert not (out / "adapter").exists()
    assert not list(out.glob(".adapter*")), "the partial folder was cleaned up"
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):  # none half-written is kept
        assert (ckpt / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "sub"}, "kind 'sub' needs --assignments and --cluster"),
        ({"kind": "sub", "assignments": "ASG", "cluster": 5}, "cluster 5 is out of range"),
        ({"kind": "sub", "assignments": "OTHER", "cluster": 0}, "an assignment of another dataset"),
        ({"kind": "ewc", "base": "NOLAB"}, "needs a reference corpus"),
        ({"kind": "soup", "members": 1}, "soup needs at least 2 members"),
        ({"batch_size": 12, "micro_batch_size": 8}, "not a multiple of micro_batch_size"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"base": "PICKLE"}, "Pickle weights (.bin) are not loaded"),
        ({"kind": "replay", "reference": "MISSING"}, "reference corpus"),
    ],
)
def test_bad_training_inputs_get_a_clear_message(lab0, tmp_path, change, message):
    import shutil

    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    (tmp_path / "other.csv").write_text("id,cluster\nnot-a-row,0\n")
    nolab = tmp_path / "nolab" / "model"  # a copy of the model outside its lab
    shutil.copytree(lab0 / "model", nolab)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(lab0 / "model" / "config.json", pickle)
    torch.save({}, pickle / "pytorch_model.bin")
    subst = {
        "ASG": str(asg),
        "OTHER": str(tmp_path / "other.csv"),
        "NOLAB": str(nolab),
        "PICKLE": str(pickle),
        "MISSING": str(tmp_path / "missing.txt"),
    }
    change = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(tiny_train(lab0, tmp_path / "run", **change))


def test_train_cli_kinds_and_config_file(lab0, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"steps": 2, "log_every": 1, "max_length": 64, "lr": 1e-3}))
    r = dtm_cli(
        "train",
        "--config",
        cfg_file,
        "--kind",
        "l2",
        "--base",
        lab0 / "model",
        "--data",
        lab0 / "data" / "train.jsonl",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "8",
        "--out",
        tmp_path / "run",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("run ")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["kind"] == "l2" and saved["steps"] == 2 and saved["max_length"] == 64
    (tmp_path / "bad.json").write_text(json.dumps({"stpes": 2}))
    r = dtm_cli("train", "--config", tmp_path / "bad.json", "--out", tmp_path / "x")
    assert r.returncode == 2 and "unknown keys stpes" in r.stderr


def test_adapters_of_another_base_or_other_layers_are_refused(sft_run, tmp_path):
    import shutil

    from dtm.merge import linear_concat

    sft_out, _ = sft_run
    other = tmp_path / "other"
    shutil.copytree(sft_out / "adapter", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "/somewhere/else"})
    )
    with pytest.raises(ConfigError, match="adapters of different base models cannot be merged"):
        linear_concat([sft_out / "adapter", other], [0.5, 0.5], tmp_path / "m")
    fewer = tmp_path / "fewer"
    shutil.copytree(sft_out / "adapter", fewer)
    w = load_file(fewer / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in w.items() if "down_proj" not in k}, fewer / "adapter_model.safetensors"
    )
    with pytest.raises(ConfigError, match="adapt different layers"):
        linear_concat([sft_out / "adapter", fewer], [0.5, 0.5], tmp_path / "m2")
    with pytest.raises(ConfigError, match="not a peft adapter folder"):
        linear_concat([sft_out / "adapter", tmp_path], [0.5, 0.5], tmp_path / "m3")


def test_the_last_step_is_always_recorded_with_its_train_loss(lab0, tmp_path):
    res = train(tiny_train(lab0, tmp_path / "run", steps=5, log_every=2))
    assert [m["step"] for m in res["metrics"]] == [0, 2, 4, 5]
    assert all(m["train_loss"] is not None for m in res["metrics"][1:])
