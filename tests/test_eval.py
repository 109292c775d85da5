"""Evaluation: the quick and full engines, `dtm eval`, the registry's scores, and the
paper's analyses (loss-reduction ratio, alignment-tax curve, token-level bias)."""

import json

import pytest
import torch
from conftest import dtm_cli, tiny_train

from dtm.tasks import TASKS


@pytest.fixture(scope="module")
def lab_model(lab0):
    from dtm.models import load_base

    return load_base(str(lab0 / "model"))


def test_quick_and_full_engines_give_identical_accuracy_on_the_lab_tasks(lab0, lab_model):
    from dtm.evaluate import evaluate

    model, tok = lab_model
    quick = evaluate(model, tok, list(TASKS), engine="quick", lab=lab0, limit=60)
    full = evaluate(model, tok, list(TASKS), engine="full", lab=lab0, limit=60)
    for task in TASKS:
        assert quick[task]["n"] == full[task]["n"] > 0, task
        assert quick[task]["acc"] == full[task]["acc"], (task, quick[task], full[task])
        assert quick[task]["acc_stderr"] == pytest.approx(full[task]["acc_stderr"]), task
    # not a degenerate agreement: the tasks are neither all solved nor all failed
    assert len({round(quick[t]["acc"], 3) for t in TASKS}) > 2


def test_eval_cli_writes_results_and_records_them(lab0, cache, tmp_path):
    listed = dtm_cli("eval", "--list-tasks", cache=cache)
    names = listed.stdout.split()
    assert listed.returncode == 0 and names[0] == "lab_knowledge"
    assert {"gsm8k", "mmlu", "bbh", "ifeval", "humaneval", "truthfulqa_mc2"} <= set(names)
    out = tmp_path / "results.json"
    r = dtm_cli(
        "eval",
        "--model",
        lab0 / "model",
        "--tasks",
        "lab_knowledge,lab_instruct,lab_bias",
        "--limit",
        "20",
        "--out",
        out,
        "--label",
        "base",
        "--group",
        "cli",
        cache=cache,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"lab_knowledge", "lab_instruct", "lab_bias"}
    for task, metrics in res.items():
        acc = [k for k in metrics if k.startswith("acc")]
        assert acc and 0 <= metrics["acc"] <= 1 and metrics["n"] == 20, task
    from dtm.score import scores
    from dtm.store import Registry

    rows = scores(group="cli", registry=Registry(cache))
    assert set(rows["task"]) == set(res) and (rows["n"] == 20).all()
    ref = json.loads(rows["model"].iloc[0])
    assert ref["base"] == str(lab0 / "model") and ref["adapters"] == []
    got = rows[(rows["task"] == "lab_knowledge") & (rows["metric"] == "acc")]["value"].item()
    assert got == res["lab_knowledge"]["acc"]


@pytest.fixture(scope="module")
def sft_run(lab0, tmp_path_factory):
    from dtm.jobs.runner import lab_eval_hook
    from dtm.jobs.runner import run_training as train

    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = tiny_train(lab0, out, steps=10, log_every=2, eval_every=4, lr=5e-3)
    train(cfg, eval_hook=lab_eval_hook(lab0))
    return out


def test_training_keeps_an_early_checkpoint_and_curves_read_from_the_run(sft_run):
    from dtm.analysis import alignment_tax_curve, loss_ratio_curves
    from dtm.train import read_metrics

    early = json.loads((sft_run / "early" / "early.json").read_text())
    assert early["step"] == 2 and (sft_run / "early" / "adapter_config.json").exists()
    recs = read_metrics(sft_run / "metrics.jsonl")
    ratio = loss_ratio_curves({"sft": recs})
    assert list(ratio["step"]) == [r["step"] for r in recs] and ratio["fraction"].iloc[-1] == 1
    assert ratio["loss_ratio"].iloc[1:].notna().all()
    tax = alignment_tax_curve(recs)
    assert sorted(set(tax["step"])) == [0, 4, 8, 10]  # every 4th step, and the last
    assert set(tax["task"]) >= set(TASKS) and (tax["metric"] == "acc").all()


def test_token_level_bias_is_exact(lab0, lab_model, sft_run):
    from peft import PeftModel

    from dtm.analysis import encode_split, token_level_bias, token_losses
    from dtm.models import load_base

    base, tok = lab_model
    train = encode_split(str(lab0 / "data" / "train.jsonl"), tok, n=24)
    val = encode_split(str(lab0 / "data" / "val.jsonl"), tok, n=24)
    same = token_level_bias(base, base, tok, train, val, min_count=1)
    assert len(same) and (same["train_drop"].abs() < 1e-9).all()  # a model against itself
    # the per-token losses average to the model's own loss on a sequence
    row = train[0]
    pairs = token_losses(base, [row])
    with torch.inference_mode():
        ids = torch.tensor([row["input_ids"]])
        ref = base(input_ids=ids, labels=torch.tensor([row["labels"]])).loss.item()
    assert sum(v for _, v in pairs) / len(pairs) == pytest.approx(ref, rel=1e-5)
    late = PeftModel.from_pretrained(load_base(str(lab0 / "model"))[0], sft_run / "adapter")
    df = token_level_bias(base, late, tok, train, val, min_count=2)
    assert list(df["gap"]) == sorted(df["gap"], reverse=True)
    assert (df["train_drop"] == df["train_early"] - df["train_late"]).all()
    assert df["train_drop"].mean() > 0  # ten steps of SFT lowered the loss on its data


@pytest.mark.fault
def test_experiment_launch_starts_one_run_and_a_dead_run_reads_interrupted(cache, tmp_path):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from dtm.experiment import launch, read_status

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: story\nlab: {size: huge}\n")  # fails at once: lab.size
    with ThreadPoolExecutor(2) as pool:  # two sessions press the button at once
        both = list(pool.map(lambda _: launch(bad, "story"), range(2)))
    pids = {st["pid"] for st in both if "pid" in st}  # the other may read "starting"
    assert len(pids) == 1 and all(st["state"] in ("running", "starting") for st in both)
    first = read_status("story")
    assert first["pid"] in pids
    end = time.time() + 60
    while time.time() < end and read_status("story")["state"] == "running":
        time.sleep(0.2)
    assert read_status("story")["state"] == "interrupted"
    log = (cache / "experiments" / "story" / "run.log").read_text()
    assert log.count("lab.size must be small or default") == 1  # one run was started
    assert launch(bad, "story")["pid"] != first["pid"]  # an ended run can start again


@pytest.mark.skipif(
    not any(__import__("shutil").which(b) for b in ("chromium", "google-chrome", "chrome")),
    reason="kaleido renders PNG/SVG with a local Chrome or Chromium",
)
def test_charts_export_as_png_and_svg():
    from dtm import charts
    from dtm.analysis import loss_ratio_curves

    fig = charts.ratio_curves(
        loss_ratio_curves({"sft": [{"step": 1, "loss_ratio": 1.0}, {"step": 2, "loss_ratio": 3.0}]})
    )
    assert charts.figure_bytes(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in charts.figure_bytes(fig, "svg")[:200]
