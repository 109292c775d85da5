"""Model folders as users have them (Llama with only tokenizer.model, Qwen2, GPT-NeoX):
train -> merge -> eval through the CLI, and the merge-weight search and LM-Cocktail on
sub-models that are not the lab's."""

import json
import math

import pytest
from archs import instruction_rows, make_model, write_tasks
from conftest import dtm_cli, write_jsonl

EXPECTED_TARGETS = {
    "llama": {"gate_proj", "up_proj", "down_proj"},
    "qwen2": {"gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},  # no gate/up/down: the FFN default
}


def _data(root):
    rows = instruction_rows(24)
    data = write_jsonl(root / "data.jsonl", rows)
    # three unequal clusters: 12, 8 and 4 rows
    sizes = [0] * 12 + [1] * 8 + [2] * 4
    asg = root / "assignments.csv"
    asg.write_text(
        "id,cluster\n" + "".join(f"{r['id']},{c}\n" for r, c in zip(rows, sizes, strict=True))
    )
    held = write_jsonl(root / "held.jsonl", instruction_rows(30)[24:])
    return data, asg, held


def _train_sub(base, data, asg, cluster, out, cache, r="4", alpha="12", max_length="256", extra=()):
    res = dtm_cli(
        "train",
        "--kind",
        "sub",
        "--base",
        base,
        "--data",
        data,
        "--assignments",
        asg,
        "--cluster",
        cluster,
        "--steps",
        "2",
        "--log-every",
        "1",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--max-length",
        max_length,
        "--lora-r",
        r,
        "--lora-alpha",
        alpha,
        "--val-fraction",
        "0.25",
        "--lr",
        "1e-2",
        *extra,
        "--out",
        out,
        cache=cache,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "adapter"


@pytest.mark.bad_input
def test_rows_whose_prompt_fills_max_length_are_refused_by_name(tmp_path):
    base = make_model("llama", tmp_path / "base")
    data, asg, _ = _data(tmp_path)
    r = dtm_cli(
        "train",
        "--kind",
        "sft",
        "--base",
        base,
        "--data",
        data,
        "--steps",
        "1",
        "--max-length",
        "8",
        "--out",
        tmp_path / "run",
        cache=tmp_path / "cache",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--max-length 8" in r.stderr and "nan" not in r.stderr.lower()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_train_merge_eval_on_a_model_folder(arch, tmp_path):
    base = make_model(arch, tmp_path / "base")
    if arch == "llama":  # only the SentencePiece model, as Llama-2's folders ship it
        assert (base / "tokenizer.model").exists() and not (base / "tokenizer.json").exists()
    data, asg, held = _data(tmp_path)
    tasks = write_tasks(tmp_path / "tasks")
    cache = tmp_path / "cache"
    # scored on a user task every step: the alignment-tax curve of a model not the lab's
    a0 = _train_sub(
        base,
        data,
        asg,
        0,
        tmp_path / "s0",
        cache,
        extra=("--eval-tasks", "my_mc,my_roll", "--tasks-dir", tasks, "--eval-every", "1"),
    )
    from dtm.analysis import alignment_tax_curve
    from dtm.store import read_metrics

    tax = alignment_tax_curve(read_metrics(tmp_path / "s0" / "metrics.jsonl"))
    assert sorted(tax["step"].unique()) == [0, 1, 2]  # step 0: the base, before training
    assert set(tax["task"]) == {"my_mc"}  # my_roll has no acc: it is in the records
    recs = [x for x in read_metrics(tmp_path / "s0" / "metrics.jsonl") if x.get("bench")]
    assert all("bits_per_byte" in x["bench"]["my_roll"] for x in recs)
    a1 = _train_sub(base, data, asg, 1, tmp_path / "s1", cache, r="2", alpha="3")  # mixed ranks
    cfg = json.loads((a0 / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == EXPECTED_TARGETS[arch]
    merged = tmp_path / "merged"
    r = dtm_cli(
        "merge",
        "--base",
        base,
        "--adapters",
        a0,
        a1,
        "--weights",
        "0.25,0.75",
        "--out",
        merged,
        cache=cache,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "results.json"
    r = dtm_cli(
        "eval",
        "--model",
        base,
        "--adapter",
        merged,
        "--tasks",
        "my_mc,my_gen",
        "--tasks-dir",
        tasks,
        "--heldout",
        held,
        "--out",
        out,
        cache=cache,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["my_mc"]["n"] == 12 and 0 <= res["my_mc"]["acc"] <= 1
    assert math.isfinite(res["heldout:held"]["loss"]) and res["heldout:held"]["tokens"] > 0
    # the merged adapter is scored, not the base: its held-out loss differs
    r = dtm_cli(
        "eval", "--model", base, "--heldout", held, "--out", tmp_path / "b.json", cache=cache
    )
    assert r.returncode == 0, r.stderr[-3000:]
    base_loss = json.loads((tmp_path / "b.json").read_text())["heldout:held"]["loss"]
    assert base_loss != pytest.approx(res["heldout:held"]["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def three_subs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    base = make_model("llama", root / "base")
    data, asg, held = _data(root)
    tasks = write_tasks(root / "tasks")
    cache = root / "cache"
    adapters = [_train_sub(base, data, asg, k, root / f"s{k}", cache) for k in range(3)]
    return root, base, adapters, tasks, held, cache


def _eval(base, adapters, out, cache, *extra):
    args = ["eval", "--model", base]
    for a in adapters:
        args += ["--adapter", a]
    r = dtm_cli(*args, *extra, "--out", out, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_merge_search_writes_every_point_and_exports_the_best(three_subs, tmp_path):
    root, base, adapters, tasks, held, cache = three_subs
    out = tmp_path / "found"
    r = dtm_cli(
        "merge",
        "--base",
        base,
        "--adapters",
        *adapters,
        "--search",
        "--tasks",
        "my_mc",
        "--tasks-dir",
        tasks,
        "--heldout",
        held,
        "--budget",
        "8",
        "--out",
        out,
        cache=cache,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads((out / "search.json").read_text())
    pts = found["points"]
    assert len(pts) == 8
    w = [p["weights"] for p in pts]
    assert w[0] == pytest.approx([1 / 3] * 3)  # the uniform point, then the vertices
    assert w[1:4] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert all(abs(sum(x) - 1) < 1e-9 and min(x) >= 0 for x in w)
    assert found["best"]["score"] == max(p["score"] for p in pts)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["weights"] == pytest.approx(found["best"]["weights"])
    # kept for Compare, named by its recipe
    from dtm.merge.saved import saved_merges
    from dtm.store import Registry

    [kept] = [m for m in saved_merges(Registry(cache)) if m["path"] == str(out)]
    assert kept["source"] == "search" and kept["recipe"]["weights"] == pytest.approx(
        found["best"]["weights"]
    )
    # the uniform point's score, recomputed by `dtm eval` of the average merge: the mean
    # of my_mc's accuracy and the held-out loss counted as -loss
    res = _eval(
        base,
        adapters,
        tmp_path / "u.json",
        cache,
        "--tasks",
        "my_mc",
        "--tasks-dir",
        tasks,
        "--heldout",
        held,
    )
    expect = (res["my_mc"]["acc"] - res["heldout:held"]["loss"]) / 2
    assert pts[0]["score"] == pytest.approx(expect, abs=1e-5)


def test_cocktail_weights_are_softmax_of_minus_loss_over_t(three_subs, tmp_path):
    root, base, adapters, tasks, held, cache = three_subs
    losses = [
        _eval(base, [a], tmp_path / f"l{i}.json", cache, "--heldout", held)["heldout:held"]["loss"]
        for i, a in enumerate(adapters)
    ]
    e = [math.exp(-x / 2.0) for x in losses]
    expect = [v / sum(e) for v in e]
    out = tmp_path / "cocktail"
    r = dtm_cli(
        "merge",
        "--base",
        base,
        "--adapters",
        *adapters,
        "--cocktail",
        "--heldout",
        held,
        "--temperature",
        "2",
        "--out",
        out,
        cache=cache,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["weights"] == pytest.approx(expect, rel=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--search"], "give --tasks"),
        (["--search", "--tasks", "nope", "--tasks-dir", "TASKS"], "--tasks nope"),
        (["--search", "--tasks", "my_mc", "--tasks-dir", "TASKS", "--budget", "2"], "--budget 2"),
        (["--cocktail", "--tasks", "my_mc"], "--cocktail"),
        (["--search", "--weights", "0.5,0.25,0.25", "--tasks", "my_mc"], "--weights"),
    ],
)
def test_bad_search_inputs_exit_2(three_subs, tmp_path, extra, message):
    root, base, adapters, tasks, held, cache = three_subs
    extra = [str(tasks) if x == "TASKS" else x for x in extra]
    r = dtm_cli(
        "merge",
        "--base",
        base,
        "--adapters",
        *adapters,
        *extra,
        "--out",
        tmp_path / "o",
        cache=cache,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert not (tmp_path / "o").exists()
