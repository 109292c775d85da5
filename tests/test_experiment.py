"""Experiment files (``python -m dtm run FILE``): the sub-model budget, the jobs it shares
with the Train page, validation before any work, and a merge of a base without a tokenizer.

Reference values are computed here from the files the tests write (row counts, cluster
sizes read from the csv, LoRA deltas read from the safetensors), never by the code under
test.
"""

import csv
import json
import os
import re
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import alpaca, dtm_cli, tiny_train, write_jsonl
from safetensors.torch import load_file

from dtm.disperse import DisperseConfig, run_disperse, training_inputs
from dtm.experiment import count_rows, dtm_set, load_experiment, plan
from dtm.experiment.run import disperse_all
from dtm.jobs.runner import run_training as train
from dtm.lab import default_lab_dir, lab_status
from dtm.store import Registry
from dtm.train.config import run_id

SFT_STEPS = 40


def ceil_share(steps: int, size: int, total: int) -> int:
    """max(1, ceil(steps * size / total)) in integer arithmetic."""
    return max(1, -(-steps * size // total))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. page = run


def test_train_page_and_dtm_run_plan_the_same_dtm_jobs(cache, lab0, tmp_path):
    lab = default_lab_dir(0, "small")  # where a `lab: {size: small, seed: 0}` experiment looks
    assert str(lab).startswith(str(cache))
    shutil.copytree(lab0, lab)
    reg = Registry(cache)
    # The Disperse page: cluster the lab's training data (K=3, so clusters are unequal)
    res = run_disperse(
        DisperseConfig(data=str(lab / "data" / "train.jsonl"), k=3, method="kmeans"),
        reg,
        project=False,
    )
    asg = res.artifacts["assignment"]

    # The Train page (views/train.py choose_inputs, hyperparameters, launch_panel), with
    # this lab as the ready lab
    inputs = training_inputs(asg, reg)
    status = lab_status(lab)
    assert status["state"] == "ready" and inputs["data"].startswith(status["path"])
    page = {
        **inputs,
        "base": os.path.join(status["path"], "model"),
        "val_data": os.path.join(status["path"], "data", "val.jsonl"),
        "lab": status["path"],
        "clustering": asg.meta["method"],
    }
    values = {
        "epochs": 1.0,
        "lr": 1e-3,
        "seed": 0,
        "lora_r": 4,
        "lora_alpha": 8,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_length": 96,
        "log_every": 5,
        "steps": SFT_STEPS,
    }
    common = {
        **values,
        "base": page["base"],
        "data": page["data"],
        "val_data": page["val_data"],
        "out": "-",
    }
    common["eval_lab"] = page["lab"]
    common["eval_every"] = max(common["log_every"], 100)
    counts = pd.read_csv(page["assignments"])["cluster"].value_counts()
    sizes = [int(counts.get(k, 0)) for k in range(page["k"])]
    page_set = dtm_set(common, page["assignments"], sizes, "epochs", clustering=page["clustering"])

    # The hand computation: cluster sizes counted from the csv itself
    with open(page["assignments"], newline="") as f:
        rows = list(csv.DictReader(f))
    lab_rows = (lab / "data" / "train.jsonl").read_text().splitlines()
    assert len(rows) == len(lab_rows) == 400
    mine = Counter(int(r["cluster"]) for r in rows)
    my_sizes = [mine[c] for c in range(3)]
    assert len(set(my_sizes)) > 1, my_sizes  # unequal clusters: 1/K would be wrong
    expected = [ceil_share(SFT_STEPS, n, len(rows)) for n in my_sizes]
    assert len(set(expected)) > 1, expected  # the step counts tell the clusters apart

    assert [c.kind for _, c, _ in page_set] == ["sft", "sub", "sub", "sub"]
    assert page_set[0][1].steps == SFT_STEPS
    assert [c.steps for _, c, _ in page_set[1:]] == expected
    assert [c.cluster for _, c, _ in page_set[1:]] == [0, 1, 2]

    # `dtm run` on an experiment file with the same values
    exp_file = write(
        tmp_path / "same.yaml",
        "name: same-jobs\n"
        "lab: {size: small, seed: 0}\n"
        "disperse: {k: 3, methods: [kmeans], field: instruction}\n"
        "train: {steps: 40, lr: 1.0e-3, lora_r: 4, lora_alpha: 8, batch_size: 8,\n"
        "        micro_batch_size: 8, max_length: 96, log_every: 5, eval_every: 100}\n"
        "sub_budget: epochs\n"
        "seeds: [0]\n",
    )
    exp = load_experiment(exp_file)
    dispersed = disperse_all(exp, lambda stage, fraction: None)  # as `dtm run` calls it
    csv_path, run_sizes = dispersed[("kmeans", 0)]
    assert csv_path == page["assignments"]  # the same registry copy of the assignment
    assert run_sizes == my_sizes == sizes
    planned = plan(exp, dispersed)
    sft = [j for j in planned if j.config.kind == "sft"]
    subs = sorted((j for j in planned if j.config.kind == "sub"), key=lambda j: j.config.cluster)
    assert len(sft) == 1 and len(subs) == 3
    assert [j.config.steps for j in subs] == expected
    assert [j.clustering for j in subs] == ["kmeans"] * 3 == [cl for *_, cl in page_set[1:]]
    # the same run ids: whichever launches first, the other reuses its jobs
    assert run_id(sft[0].config) == run_id(page_set[0][1])
    assert [run_id(j.config) for j in subs] == [run_id(c) for _, c, _ in page_set[1:]]
    assert len({run_id(j.config) for j in subs}) == 3


def test_disperse_all_runs_without_a_progress_callback(cache, lab0, tmp_path):
    """``disperse_all(exp)``, its progress callback left out, disperses every clustering."""
    data = write_jsonl(tmp_path / "data.jsonl", [alpaca(i) for i in range(12)])
    exp = load_experiment(
        write(
            tmp_path / "plain.yaml",
            "name: plain\n"
            f"base: {json.dumps(str(lab0 / 'model'))}\n"
            f"data: {json.dumps(str(data))}\n"
            "disperse: {k: 2, methods: [random]}\n"
            "evaluate: {tasks: [lab_knowledge]}\n",
        )
    )
    dispersed = disperse_all(exp)
    csv_path, sizes = dispersed[("random", 0)]
    with open(csv_path, newline="") as f:
        got = Counter(int(r["cluster"]) for r in csv.DictReader(f))
    assert sorted(got) == [0, 1] and sizes == [got[0], got[1]] and sum(sizes) == 12


# --------------------------------------------------------------------------- 2. budget


GOOD = {"json": 22, "csv": 25, "parquet": 19}


def data_file(fmt: str, folder: Path) -> Path:
    """A data file of ``GOOD[fmt]`` usable rows and several that the data layer drops."""
    good = [alpaca(i, f'Say "hello", then count to {i}') for i in range(GOOD[fmt])]
    if fmt == "json":
        bad = [
            {"id": "b1", "instruction": "", "output": "x"},  # empty instruction
            {"id": "b2", "instruction": "no answer"},  # missing output
            {"id": "b3", "instruction": "q", "output": 3},  # output not text
            7,  # not an object
            {"id": "b4", "prompt": "q", "completion": "a"},  # shape not recognised
        ]
        rows = good[:10] + bad[:3] + good[10:] + bad[3:]
        path = folder / "data.json"
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return path
    if fmt == "csv":
        path = folder / "data.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "instruction", "input", "output"])
            for r in good[:12]:
                w.writerow([r["id"], r["instruction"], r["input"], r["output"]])
            w.writerow(["b1", "", "", "an answer"])  # empty instruction
            w.writerow(["b2", "a question", "", "   "])  # blank output
            w.writerow(["b3", "a question"])  # too few fields: no output
            w.writerow(["b4", "a question", "", "an answer", "extra"])  # too many fields
            for r in good[12:]:
                w.writerow([r["id"], r["instruction"], r["input"], r["output"]])
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = [
        {"id": "b1", "instruction": "", "input": "", "output": "x"},
        {"id": "b2", "instruction": "q", "input": "", "output": None},
        {"id": "b3", "instruction": "   ", "input": "", "output": "x"},
    ]
    rows = bad[:1] + good[:9] + bad[1:] + good[9:]
    path = folder / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


PLAN_LINE = re.compile(r"^\s+\d+\. (.+?)\s+(sft|sub)\s+~\s*(\d+) rows\s+(\d+) steps$")


@pytest.mark.parametrize("fmt", list(GOOD))
def test_same_epochs_budget_counts_usable_rows_of_each_format(fmt, cache, lab0, tmp_path):
    data = data_file(fmt, tmp_path)
    usable = GOOD[fmt]
    exp_file = write(
        tmp_path / "budget.yaml",
        f"name: budget-{fmt}\n"
        f"base: {json.dumps(str(lab0 / 'model'))}\n"
        f"data: {json.dumps(str(data))}\n"
        "disperse: {k: 3, methods: [kmeans]}\n"
        f"train: {{steps: {SFT_STEPS}, batch_size: 8, micro_batch_size: 8, max_length: 64}}\n"
        "sub_budget: epochs\n"
        "evaluate: {tasks: [lab_knowledge]}\n",
    )
    exp = load_experiment(exp_file)
    assert count_rows(exp) == usable

    # The dry run (a subprocess) plans 1/K of the usable rows per sub-model
    r = dtm_cli("run", exp_file, "--dry-run", cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [m.groups() for x in r.stdout.splitlines() if (m := PLAN_LINE.match(x))]
    assert [(kind, int(rows), int(steps)) for _, kind, rows, steps in lines] == [
        ("sft", usable, SFT_STEPS),
        *[("sub", usable // 3, ceil_share(SFT_STEPS, usable // 3, 3 * (usable // 3)))] * 3,
    ], r.stdout
    assert not (cache / "runs").exists()

    # Real (unequal) sizes: each sub-model gets SFT's steps times its share of the rows
    sizes = [usable // 6, usable // 3, usable - usable // 6 - usable // 3]
    ids = [f"a{i}" for i in range(usable)]
    labels = [0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]
    asg = write(
        tmp_path / "assignments.csv",
        "id,cluster\n" + "".join(f"{i},{c}\n" for i, c in zip(ids, labels, strict=True)),
    )
    planned = plan(exp, {("kmeans", 0): (str(asg), sizes)})
    assert [(j.config.kind, j.est_rows) for j in planned] == [("sft", usable)] + [
        ("sub", n) for n in sizes
    ]
    assert planned[0].config.steps == SFT_STEPS
    subs = planned[1:]
    assert [j.config.steps for j in subs] == [ceil_share(SFT_STEPS, n, usable) for n in sizes]
    assert [j.config.cluster for j in subs] == [0, 1, 2]
    assert all(j.config.assignments == str(asg) for j in subs)
    assert len({j.config.steps for j in subs}) == 3


# --------------------------------------------------------------------------- 3. validation


def jobs_in_registry(cache: Path) -> int:
    db = cache / "registry.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name='jobs'").fetchone():
            return 0
        return con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "case,body,keys",
    [
        pytest.param("no-tasks-without-lab", "", ["evaluate.tasks"], id="no-tasks"),
        pytest.param(
            "unknown-baseline", "baselines: [l2, bogus]\n", ["baselines", "bogus"], id="baseline"
        ),
        pytest.param("missing-base", "BASE_MISSING", ["base:", "no-such-model"], id="base"),
        pytest.param(
            "bad-merge-param",
            "merge: {methods: [ties], params: {density: 1.5}}\n",
            ["merge.params", "density"],
            id="merge-param",
        ),
        pytest.param(
            "unknown-train-key", "TRAIN_UNKNOWN", ["train", "learning_rate"], id="train-key"
        ),
        pytest.param(
            "task-not-in-tasks-dir", "TASKS_DIR", ["evaluate.tasks", "my_nope"], id="tasks-dir"
        ),
        pytest.param(
            "together-not-a-bool", "TRAIN_TOGETHER", ["train.together", "'maybe'"], id="together"
        ),
        pytest.param(
            "bad-lab-preset", "lab: {preset: nope}\n", ["lab.preset", "'nope'"], id="preset"
        ),
        pytest.param(
            "lab-path-not-a-lab",
            "lab: {path: no-such-lab}\n",
            ["lab.path", "no-such-lab", "not a built lab"],
            id="lab-path",
        ),
        pytest.param(
            "curate-budget-over-the-data",
            "baselines: [curate]\ncurate: {budget: 500}\n",
            ["--curate-budget 500 is larger than the data"],
            id="curate-budget",
        ),
        pytest.param(
            "curate-threshold-out-of-range",
            "baselines: [curate]\ncurate: {threshold: 0}\n",
            ["train (curate)", "in (0, 1]"],
            id="curate-threshold",
        ),
        pytest.param(
            "loramoe-no-experts",
            "baselines: [loramoe]\nloramoe: {experts: 0}\n",
            ["train (loramoe)", "at least 1 expert"],
            id="loramoe-experts",
        ),
        pytest.param(
            "loramoe-section-not-a-baseline",
            "baselines: [l2]\nloramoe: {experts: 3}\n",
            ["loramoe is not in baselines"],
            id="loramoe-section",
        ),
        pytest.param(
            "heldout-missing",
            "HELDOUT_MISSING",
            ["evaluate.heldout", "nope.jsonl"],
            id="heldout",
        ),
    ],
)
def test_a_bad_experiment_file_exits_2_before_any_work(case, body, keys, cache, lab0, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [alpaca(i) for i in range(12)])
    base = tmp_path / "no-such-model" if body == "BASE_MISSING" else lab0 / "model"
    train_values = {
        "TRAIN_UNKNOWN": "{steps: 1, learning_rate: 0.1}",
        "TRAIN_TOGETHER": "{steps: 1, together: maybe}",
    }.get(body, "{steps: 1}")
    tasks = "" if case == "no-tasks-without-lab" else "evaluate: {tasks: [lab_knowledge]}\n"
    if body == "TASKS_DIR":  # a real tasks folder, and a task name it does not have
        from archs import write_tasks

        folder = write_tasks(tmp_path / "tasks")
        tasks = f"evaluate: {{tasks: [my_mc, my_nope], tasks_dir: {json.dumps(str(folder))}}}\n"
    if body == "HELDOUT_MISSING":
        tasks = f"evaluate: {{heldout: [{json.dumps(str(tmp_path / 'nope.jsonl'))}]}}\n"
    special = ("BASE_MISSING", "TRAIN_UNKNOWN", "TRAIN_TOGETHER", "TASKS_DIR", "HELDOUT_MISSING")
    extra = "" if body in special else body
    exp_file = write(
        tmp_path / f"{case}.yaml",
        f"name: {case}\n"
        f"base: {json.dumps(str(base))}\n"
        f"data: {json.dumps(str(data))}\n"
        "disperse: {k: 2, methods: [random]}\n"
        f"train: {train_values}\n" + tasks + extra,
    )
    r = dtm_cli("run", exp_file, cache=cache, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert str(exp_file) in r.stderr, r.stderr
    for key in keys:
        assert key in r.stderr, (key, r.stderr)
    assert "Traceback" not in r.stderr
    assert not (cache / "runs").exists()
    assert jobs_in_registry(cache) == 0
    assert not (cache / "experiments" / case).exists()


# --------------------------------------------------------------------------- 4. merge


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """{base weight name: (alpha / r) * B @ A} read straight from a peft adapter folder."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora")
    scale = cfg["lora_alpha"] / cfg["r"]
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in t.items():
        if ".lora_A." in key:
            b = t[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            out[name] = scale * (b.double() @ a.double())
    return out


def test_merge_cli_with_a_base_folder_without_tokenizer(lab0, tmp_path):
    base = tmp_path / "base-no-tokenizer"
    tokenizer_files = {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
    }
    shutil.copytree(lab0 / "model", base, ignore=lambda d, names: tokenizer_files & set(names))
    left = {p.name for p in base.iterdir()}
    assert "config.json" in left and "model.safetensors" in left
    assert (lab0 / "model" / "tokenizer.json").exists() and not (left & tokenizer_files)

    adapters = []
    for n in range(2):
        out = tmp_path / f"run{n}"
        train(tiny_train(lab0, out, steps=2, lora_r=4, lora_alpha=8, seed=n, log_every=1))
        adapters.append(out / "adapter")
    assert json.loads((adapters[0] / "adapter_config.json").read_text())["lora_alpha"] == 8
    deltas = [lora_deltas(a) for a in adapters]
    assert deltas[0].keys() == deltas[1].keys() and deltas[0]
    average = {k: (deltas[0][k] + deltas[1][k]) / 2 for k in deltas[0]}
    assert max(float(d.abs().max()) for d in average.values()) > 0  # the training moved them

    out = tmp_path / "merged"
    r = dtm_cli("merge", "--base", base, "--adapters", *adapters, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "recipe.json").is_file()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "average" and recipe["weights"] == [0.5, 0.5]
    merged = lora_deltas(out)
    assert merged.keys() == average.keys()
    for k, d in average.items():
        torch.testing.assert_close(merged[k], d, rtol=1e-4, atol=1e-6)

    full = tmp_path / "full"
    r = dtm_cli("merge", "--base", base, "--adapters", *adapters, "--full", "--out", full)
    assert r.returncode == 0, r.stderr[-3000:]
    written = {p.name for p in full.iterdir()}
    assert "config.json" in written and "recipe.json" in written
    assert any(name.endswith(".safetensors") for name in written)
    assert not (written & tokenizer_files), written  # the base had none to copy
    w0 = load_file(base / "model.safetensors")
    w1 = {}
    for p in full.glob("*.safetensors"):
        w1.update(load_file(p))
    for k, d in average.items():
        torch.testing.assert_close(w1[k].double(), w0[k].double() + d, rtol=1e-4, atol=1e-5, msg=k)
    untouched = [k for k in w0 if k not in average and k in w1]
    assert untouched and all(torch.equal(w0[k], w1[k]) for k in untouched)


def test_results_table_shows_folder_tasks_and_held_out_losses_beside_the_labs():
    import pandas as pd

    from dtm.experiment.report import table_columns

    table = pd.DataFrame(
        [
            ("lab_knowledge", "acc"),
            ("lab_knowledge", "acc_unseen"),
            ("my_mc", "acc"),
            ("my_mc", "acc_norm"),
            ("my_roll", "bits_per_byte"),
            ("my_roll", "word_perplexity"),
            ("heldout:val", "loss"),
            ("heldout:val", "tokens"),
        ],
        columns=["task", "metric"],
    )
    assert table_columns(table) == [
        ("lab_knowledge", "acc", "knowledge"),
        ("lab_knowledge", "acc_unseen", "knowledge (unseen)"),
        ("my_mc", "acc", "my_mc"),
        ("my_roll", "bits_per_byte", "my_roll bits_per_byte"),
        ("heldout:val", "loss", "heldout:val loss"),
    ]


def test_curate_and_loramoe_take_their_own_sections(lab0, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [alpaca(i) for i in range(20)])
    exp_file = write(
        tmp_path / "own.yaml",
        "name: own\n"
        f"base: {json.dumps(str(lab0 / 'model'))}\n"
        f"data: {json.dumps(str(data))}\n"
        "disperse: {k: 5, methods: [random]}\n"
        "train: {steps: 2}\n"
        "baselines: [curate, loramoe, l2]\n"
        "loramoe: {experts: 3, balance: 0.3, groups: 1, knowledge_sources: cbqa}\n"
        "evaluate: {tasks: [lab_knowledge]}\n",
    )
    jobs = {j.config.kind: j.config for j in plan(load_experiment(exp_file))}
    assert jobs["curate"].curate_budget == "0.2"  # 1/K of the rows by default
    assert jobs["curate"].curate_score == "ifd"
    moe = jobs["loramoe"]
    assert (moe.experts, moe.moe_balance, moe.moe_groups) == (3, 0.3, 1)
    assert moe.moe_knowledge_sources == "cbqa"
    assert jobs["l2"].experts == 4 and jobs["sft"].curate_budget is None  # theirs only


def test_the_class_story_trains_the_full_storys_seed_0_runs(cache):
    """Home's class story reuses the full story's runs: its every planned run (SFT and the
    sub-models of both clusterings) has the id of the full story's seed-0 run of the same
    name, and it plans nothing else."""
    from dtm.train.config import run_id

    root = Path(__file__).resolve().parents[1] / "experiments"
    full = {p.name: run_id(p.config) for p in plan(load_experiment(root / "lab.yaml"))}
    klass = {p.name: run_id(p.config) for p in plan(load_experiment(root / "lab-class.yaml"))}
    assert sorted(klass) == sorted(
        n for n in full if n.endswith(" s0") and "sub" in n or n == "sft s0"
    )
    assert klass == {n: full[n] for n in klass}
