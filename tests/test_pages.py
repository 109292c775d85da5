"""The pages under Streamlit's AppTest: they run, draw, and respond to the user."""

from pathlib import Path

import pytest
from conftest import ROOT, check_composition_sentence, write_jsonl
from streamlit.testing.v1 import AppTest

from dtm.charts import selected_rows

PAGES = ROOT / "views"


@pytest.fixture
def disperse_page(cache):
    at = AppTest.from_file(str(PAGES / "disperse.py"), default_timeout=300)
    return at.run()


def test_disperse_page_draws_the_map_and_a_selection_fills_the_table(disperse_page):
    at = disperse_page
    assert not at.exception
    assert len(at.get("plotly_chart")) == 3  # the map, the cluster sizes, what each holds
    assert [m.value for m in at.metric][:3] == ["600", "0", "4"]
    assert at.subheader[0].value == "Selected rows (0)"
    at.multiselect(key="pick_clusters").select(1).run()
    assert not at.exception
    [table] = [d for d in at.dataframe if "instruction" in d.value.columns]
    assert len(table.value) > 0 and set(table.value["cluster"]) == {1}
    assert at.subheader[0].value == f"Selected rows ({len(table.value)})"
    # A box/lasso selection on the map lands in the same place (see test below).
    at.session_state["disperse_selected"] = [0, 5, 7]
    at.run()
    [table] = [d for d in at.dataframe if "instruction" in d.value.columns]
    assert len(table.value) == 3


def test_disperse_page_search_and_new_k(disperse_page):
    at = disperse_page
    at.text_input(key="search").input("capital").run()
    assert any("matching rows" in c.value for c in at.caption)
    at.number_input(key="k").set_value(3)
    at.button(key="go").click().run()
    assert not at.exception and [m.value for m in at.metric][2] == "3"


def test_disperse_page_marks_a_saved_curate_selection(cache, tmp_path):
    import json

    import pandas as pd

    from dtm.curate import save_selection
    from dtm.samples import SAMPLE_PATH
    from dtm.train.config import TrainConfig

    ids = [json.loads(line)["id"] for line in SAMPLE_PATH.read_text().splitlines()]
    kept = set(ids[3:600:40])  # 15 rows, spread over the file
    sel = pd.DataFrame({"id": ids, "score": range(len(ids)), "kept": [int(i in kept) for i in ids]})
    cfg = TrainConfig(kind="curate", base="b", data=str(SAMPLE_PATH), out=str(tmp_path / "r"),
                      curate_budget="15", curate_score="column:q")  # fmt: skip
    save_selection(cfg, sel, tmp_path / "r")
    at = AppTest.from_file(str(PAGES / "disperse.py"), default_timeout=300).run()
    assert not at.exception
    box = at.selectbox(key="curate_overlay")
    assert box.value is None and len(box.options) == 2
    assert "kept 15 of 600" in box.options[1]
    box.select_index(1).run()
    assert not at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    [trace] = [t for t in spec["data"] if "kept" in t.get("name", "")]
    assert trace["name"] == "curated by column:q (15 kept)"
    marked = {h.split("</b>")[0].removeprefix("<b>") for h in trace["hovertext"]}
    assert marked == kept


def test_disperse_page_bad_path_shows_a_clear_error(disperse_page, tmp_path):
    at = disperse_page
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"x": 1}'])
    at.radio(key="ds_kind").set_value("Local path").run()
    assert "Choose a dataset" in at.info[0].value
    at.text_input(key="ds_path").input(str(bad)).run()
    at.button(key="go").click().run()
    assert not at.exception
    assert "no usable row" in at.error[0].value and str(bad) in at.error[0].value
    at.text_input(key="ds_path").input(str(tmp_path / "missing.jsonl")).run()
    at.button(key="go").click().run()
    assert "no such file" in at.error[0].value


def test_selection_event_maps_points_to_rows():
    event = {
        "points": [
            {"curve_number": 1, "point_index": 0, "customdata": 42},
            {"curve_number": 0, "point_index": 3, "customdata": [7]},
            {"curve_number": 2, "point_index": 0, "customdata": 42},
        ],
        "box": [],
        "lasso": [],
        "point_indices": [0, 3, 0],
    }
    assert selected_rows(event) == [7, 42]
    assert selected_rows(None) == [] and selected_rows({"points": []}) == []


def _fake_scores(cache):
    """Scores as `dtm run` records them: base once, SFT and DTM over two seeds."""
    from dtm.score import ModelRef, record
    from dtm.store import Registry

    reg = Registry(cache)
    values = {
        ("base", None): 0.90,
        ("sft", 0): 0.80,
        ("sft", 1): 0.84,
        ("dtm-kmeans", 0): 0.86,
        ("dtm-kmeans", 1): 0.88,
    }
    for (label, seed), v in values.items():
        ref = ModelRef(
            base="m",
            adapters=[] if label == "base" else [f"a/{label}{seed}"],
            label=label,
            group="exp",
            seed=seed,
        )
        res = {
            "lab_knowledge": {"acc": v, "n": 100},
            "lab_bias": {"acc": v, "chat_acc": v, "favourite_rate": 1 - v, "n": 50},
        }
        if label != "base":
            res["mmlu"] = {"acc": v / 2, "n": 100}
        record(ref, res, engine="quick", registry=reg)


def test_compare_page_shows_scores_over_seeds_deltas_and_the_papers_numbers(cache):
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception and "No scores yet" in at.info[0].value
    _fake_scores(cache)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    [table] = [d.value for d in at.dataframe if "model" in d.value.columns]
    rows = table.set_index("model")
    assert rows.loc["sft", "lab_knowledge.acc"] == "0.820 ± 0.028"
    assert rows.loc["base", "lab_knowledge.acc"] == "0.900"  # one value: no ±
    [delta] = [
        d.value
        for d in at.dataframe
        if "lab_knowledge" in d.value.columns and "model" not in d.value.columns
    ]
    assert delta.loc["dtm-kmeans", "lab_knowledge"] == pytest.approx(0.05)
    heads = [h.value for h in at.subheader]
    assert "Bias uptake (the lab's probe)" in heads
    assert "The paper's numbers (reported, not measured)" in heads  # mmlu is the paper's
    assert len(at.get("plotly_chart")) == 3
    assert any("No SFT or sub-model runs" in c.value for c in at.caption)


def test_home_page_tells_the_story_and_follows_a_run(cache):
    import json as _json
    import os

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()  # Home is default
    assert not at.exception, at.exception
    assert any("alignment tax" in m.value for m in at.markdown)
    assert at.button(key="home_run") and any("Not run yet" in c.value for c in at.caption)
    out = cache / "experiments" / "lab"
    out.mkdir(parents=True)
    stages = {s: {"state": "done", "fraction": 1.0} for s in ("lab", "disperse")}
    stages |= {"train": {"state": "running", "fraction": 0.5}}
    stages |= {s: {"state": "waiting", "fraction": 0.0} for s in ("merge", "evaluate")}
    (out / "status.json").write_text(
        _json.dumps(
            {
                "state": "running",
                "pid": os.getpid(),
                "started": 0,
                "stage": "train",
                "detail": "training jobs",
                "stages": stages,
            }
        )
    )
    (out / "results.md").write_text("| model | knowledge |\n|---|---|\n| sft | 0.5 |\n")
    at.run()
    assert not at.exception
    bars = [p.value for p in at.get("progress")]
    assert bars[:3] == [100, 100, 50], bars
    assert any("| sft | 0.5 |" in m.value for m in at.markdown)


def test_home_offers_the_class_story_and_shows_the_one_that_ran_last(cache):
    import json as _json

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert at.button(key="home_run_class").label == "Run the class story"
    assert at.button(key="home_run").label == "Run the full story: 3 seeds, every baseline"
    assert "home_show_bias" not in [r.key for r in at.radio]  # nothing ran: no choice
    for name, started in (("lab", 100), ("lab-class", 200)):
        out = cache / "experiments" / name
        out.mkdir(parents=True)
        (out / "status.json").write_text(
            _json.dumps({"state": "done", "started": started, "stages": {}, "detail": ""})
        )
        (out / "results.md").write_text(f"| model | which |\n|---|---|\n| sft | {name} |\n")
    at.run()
    assert not at.exception, at.exception
    show = at.radio(key="home_show_bias")
    assert show.options == ["the class story", "the full story"]
    assert show.value == "lab-class"  # the later one
    assert any("| sft | lab-class |" in m.value for m in at.markdown)
    show.set_value("lab").run()
    assert any("| sft | lab |" in m.value for m in at.markdown)
    assert not any("| sft | lab-class |" in m.value for m in at.markdown)


def test_app_navigation_runs(cache):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    assert not at.exception
    assert Path(ROOT / ".streamlit" / "config.toml").read_text().count('address = "127.0.0.1"')


def fake_lab(cache, state="ready"):
    """A default-lab folder as the app sees it: ready (lab.json + data) or failed."""
    from dtm.lab import default_lab_dir
    from dtm.samples import SAMPLE_PATH

    lab = default_lab_dir()
    if state == "ready":
        (lab / "data").mkdir(parents=True)
        rows = SAMPLE_PATH.read_text().splitlines()[:150]
        (lab / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
        (lab / "lab.json").write_text("{}")
    else:
        lab.parent.mkdir(parents=True)
        lab.with_name(lab.name + ".progress.json").write_text(
            '{"state": "failed", "error": "RuntimeError: out of memory"}'
        )
        lab.with_name(lab.name + ".log").write_text("Traceback ...\nRuntimeError: out of memory\n")
    return lab


def test_disperse_page_defaults_to_the_lab_when_ready(cache):
    fake_lab(cache)
    at = AppTest.from_file(str(PAGES / "disperse.py"), default_timeout=300).run()
    assert not at.exception
    assert at.radio(key="ds_kind").value == "Alignment-tax lab"
    assert [m.value for m in at.metric][0] == "150"


def chart_by_key(at, key: str) -> dict:
    import json

    [chart] = [c for c in at.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    return json.loads(chart.proto.spec)


def test_disperse_page_shows_what_each_cluster_holds_beside_random(cache):
    """A lab's rows by task (from the ledger beside its data) and by source: a stacked
    bar per cluster and a sentence, k-means and, when asked, random beside it; each
    counted again here from the files and the registry's labels."""
    import collections
    import json
    import re

    import numpy as np

    from dtm.store import Registry

    lab = fake_lab(cache)
    rows = [json.loads(x) for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
    task = {
        r["id"]: "sums" if r["source"] == "cot_math" else f"t{i % 3}" for i, r in enumerate(rows)
    }
    ledger = [{"id": i, "source": "", "task": t, "biases": []} for i, t in task.items()]
    write_jsonl(lab / "data" / "train_biases.jsonl", ledger)
    at = AppTest.from_file(str(PAGES / "disperse.py"), default_timeout=300).run()
    assert not at.exception
    assert at.radio(key="composition_by").options == ["task", "source"]
    assert at.selectbox(key="composition_beside").value is None  # random is not there yet
    at.selectbox(key="composition_beside").select("random").run()
    assert not at.exception
    reg = Registry(cache)
    labels = {a.inputs["method"]: np.load(a.path / "labels.npy") for a in reg.list("assignment")}
    assert set(labels) == {"kmeans", "random"}
    for noun, value in (("task", lambda r: task[r["id"]]), ("source", lambda r: r["source"])):
        at.radio(key="composition_by").set_value(noun).run()
        sentences = [m.value for m in at.markdown if m.value.startswith(f"By {noun}:")]
        assert len(sentences) == 2
        for i, method in enumerate(("kmeans", "random")):
            ref = [collections.Counter() for _ in range(4)]
            for r, c in zip(rows, labels[method], strict=True):
                ref[c][value(r)] += 1
            spec = chart_by_key(at, f"composition_chart_{i}")
            assert spec["layout"]["title"]["text"].startswith(f"{method}, K=4")
            drawn = {t["name"]: t["y"] for t in spec["data"]}
            assert drawn == {v: [ref[c][v] for c in range(4)] for v in set().union(*ref)}
            check_composition_sentence(re.sub(r"\\(.)", r"\1", sentences[i]), ref, noun)
    at.multiselect(key="pick_clusters").select(0).run()  # the selected rows show their task
    [table] = [d.value for d in at.dataframe if "instruction" in d.value.columns]
    assert len(table) and list(table["task"]) == [task[i] for i in table["id"]]


def test_sidebar_reports_lab_states(cache):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    assert not at.exception and not at.sidebar.error  # missing, autobuild off in tests
    fake_lab(cache, "failed")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    assert "out of memory" in at.sidebar.error[0].value
    assert at.sidebar.button(key="lab_retry")


def test_train_page_launches_the_dtm_set_once_and_shows_it_live(cache, lab0):
    """A saved K=2 assignment of the lab's data: one button queues SFT + 2 sub-models as
    one group job (the default); pressing it again starts nothing new; the members finish
    and their curves are drawn."""
    import time

    from dtm import jobs
    from dtm.disperse import DisperseConfig, run_disperse
    from dtm.lab import default_lab_dir
    from dtm.store import Registry

    at = AppTest.from_file(str(PAGES / "train.py"), default_timeout=120).run()
    assert not at.exception and "No saved cluster assignment" in at.info[0].value
    lab = default_lab_dir()
    lab.parent.mkdir(parents=True)
    lab.symlink_to(lab0, target_is_directory=True)
    reg = Registry(cache)
    res = run_disperse(
        DisperseConfig(data=str(lab / "data" / "train.jsonl"), k=2, method="random"),
        reg,
        project=False,
    )
    reg.set_name("assignment", res.artifacts["assignment"].key, "lab random K=2")
    at.run()
    assert not at.exception
    assert at.radio(key="train_base_kind").value == "Lab base model"
    # the memory estimate before a launch: a run and the group of SFT + 2 sub-models
    [note] = [c.value for c in at.caption if c.value.startswith("Memory on this CPU")]
    assert "a run ~" in note and "the group of 3 ~" in note and "fp32" in note, note
    at.number_input(key="hp_steps").set_value(4)
    at.number_input(key="hp_log").set_value(2)
    at.number_input(key="hp_len").set_value(96)
    at.number_input(key="hp_batch").set_value(8)
    at.number_input(key="hp_micro").set_value(8)
    at.button(key="launch_dtm").click().run()
    assert not at.exception
    store = jobs.JobStore(reg)
    assert sorted(j.name for j in store.list()) == ["dtm set", "sft", "sub 0", "sub 1"]
    [grp] = [j for j in store.list() if j.kind == "group"]
    assert {j.parent for j in store.list() if j.kind != "group"} == {grp.id}
    at.button(key="launch_dtm").click().run()
    assert len(store.list()) == 4
    end = time.time() + 300
    while time.time() < end and not all(j.state == "done" for j in jobs.refresh(store)):
        time.sleep(1)
    assert [j.state for j in store.list()] == ["done"] * 4
    at.run()
    assert not at.exception
    [table] = [d.value for d in at.dataframe if "state" in d.value.columns]
    assert list(table["state"]) == ["done"] * 4 and list(table["progress"]) == [1.0] * 4
    assert len(at.get("plotly_chart")) == 2  # train and validation loss curves
    import json

    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert sorted(t["name"] for t in spec["data"]) == ["sft", "sub 0", "sub 1"]  # per member
    assert "step 4: train_loss" in at.code[0].value


def test_merge_page_scores_live_maps_the_landscape_and_exports(cache, lab0):
    """Two finished sub-models and SFT (real jobs): the sliders re-merge and re-score; a
    one-hot weight scores exactly as that sub-model; the landscape and export work."""
    import time

    from conftest import round_robin_assignment, tiny_train

    from dtm import jobs
    from dtm.lab import default_lab_dir
    from dtm.store import Registry

    at = AppTest.from_file(str(PAGES / "merge.py"), default_timeout=300).run()
    assert not at.exception and "Nothing to merge yet" in at.info[0].value
    lab = default_lab_dir()
    lab.parent.mkdir(parents=True)
    lab.symlink_to(lab0, target_is_directory=True)
    store = jobs.JobStore(Registry(cache))
    asg = round_robin_assignment(lab, cache / "asg.csv", k=2)
    common = {"eval_lab": str(lab), "eval_every": 8, "steps": 8, "lr": 3e-3}
    for cfg in [
        tiny_train(lab, "-", kind="sub", assignments=str(asg), cluster=c, **common) for c in (0, 1)
    ] + [tiny_train(lab, "-", **common)]:
        jobs.submit(cfg, group="g", store=store, name=None)
    end = time.time() + 300
    while time.time() < end and not all(j.state == "done" for j in jobs.refresh(store)):
        time.sleep(1)
    at.run()
    assert not at.exception
    assert [m.label for m in at.metric] == ["knowledge", "reasoning", "instruct", "merge + score"]
    assert at.slider(key="w_0").value == 0.5
    at.slider(key="w_0").set_value(1.0)
    at.slider(key="w_1").set_value(0.0)
    at.run()
    [table] = [d.value for d in at.dataframe if "model" in d.value.columns]
    rows = table.set_index("model")
    assert rows.loc["merged"].equals(rows.loc["sub 0"])  # one-hot weights = that sub-model
    assert {"base", "sft", "sub 0", "sub 1"} <= set(rows.index)
    at.selectbox(key="m_method").set_value("ties").run()
    assert not at.exception
    at.button(key="m_land").click().run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    at.button(key="m_export").click().run()
    assert not at.exception and "recipe.json" in at.success[0].value
    [out] = list((cache / "merged").iterdir())
    assert (out / "adapter_model.safetensors").exists() and (out / "recipe.json").exists()


def _folder_subs(root):
    """Two sub-models of a Qwen2 folder (not the lab's) trained in process: unequal
    clusters (14 and 6 rows), lora_alpha != r."""
    from archs import instruction_rows, make_model

    from dtm.jobs.runner import run_training as train
    from dtm.train import TrainConfig

    base = make_model("qwen2", root / "base")
    rows = instruction_rows(20)
    data = write_jsonl(root / "data.jsonl", rows)
    asg = root / "asg.csv"
    asg.write_text(
        "id,cluster\n" + "".join(f"{r['id']},{int(i >= 14)}\n" for i, r in enumerate(rows))
    )
    adapters = []
    for c in (0, 1):
        cfg = TrainConfig(
            base=str(base),
            data=str(data),
            out=str(root / f"s{c}"),
            kind="sub",
            assignments=str(asg),
            cluster=c,
            steps=2,
            log_every=1,
            lr=1e-2,
            batch_size=2,
            micro_batch_size=2,
            max_length=128,
            lora_r=4,
            lora_alpha=8,
            val_fraction=0.3,
            probe_size=4,
            fisher_size=4,
        )
        train(cfg)
        adapters.append(root / f"s{c}" / "adapter")
    return base, adapters


def test_merge_page_on_adapter_folders_with_a_tasks_folder_and_held_out_losses(cache, tmp_path):
    import math

    from archs import write_tasks

    from dtm.merge.saved import saved_merges
    from dtm.store import Registry

    base, adapters = _folder_subs(tmp_path)
    tasks = write_tasks(tmp_path / "tasks")
    at = AppTest.from_file(str(PAGES / "merge.py"), default_timeout=300).run()
    at.radio(key="m_from").set_value("adapter folders").run()
    at.text_input(key="m_base").set_value(str(base))
    at.text_area(key="m_paths").set_value(f"{adapters[0]}\n{tmp_path / 'nope'}").run()
    assert not at.exception and "adapter 2" in at.error[0].value  # named, not a traceback
    at.text_area(key="m_paths").set_value("\n".join(map(str, adapters))).run()
    assert not at.exception
    assert "m_tasks" not in [m.key for m in at.multiselect]  # no lab task for this model
    at.text_input(key="m_tasks_dir").set_value(str(tasks)).run()
    at.multiselect(key="m_user_tasks").set_value(["my_mc"])
    at.multiselect(key="m_heldout").set_value(["each sub-model's held-out rows"]).run()
    assert not at.exception
    labels = [m.label for m in at.metric]
    assert labels == ["my_mc", "heldout:s0", "heldout:s1", "merge + score"]
    [table] = [d.value for d in at.dataframe if "model" in d.value.columns]
    rows = table.set_index("model")
    assert {"merged", "base", "s0", "s1"} <= set(rows.index)
    # each sub-model fits its own held-out rows better than the base does
    assert rows.loc["s0", "heldout:s0"] < rows.loc["base", "heldout:s0"]
    # LM-Cocktail: softmax(-loss / T) of each sub-model's mean held-out loss
    at.number_input(key="m_temp").set_value(0.5)
    at.button(key="m_cocktail").click().run()
    assert not at.exception
    losses = [(rows.loc[n, "heldout:s0"] + rows.loc[n, "heldout:s1"]) / 2 for n in ("s0", "s1")]
    e = [math.exp(-x / 0.5) for x in losses]
    want = [v / sum(e) for v in e]
    got = [at.slider(key=f"w_{i}").value for i in range(2)]
    assert got == pytest.approx(want, abs=0.011)
    # the search: every point evaluated, the sliders set to the best one
    at.number_input(key="m_budget").set_value(5)
    at.button(key="m_find").click().run()
    assert not at.exception
    found = at.session_state["m_search"][3]
    assert len(found["points"]) == 5
    best = found["best"]["weights"]
    assert [at.slider(key=f"w_{i}").value for i in range(2)] == pytest.approx(best, abs=0.006)
    assert len(at.get("plotly_chart")) == 1  # the search's points are on the landscape
    at.button(key="m_keep").click().run()
    at.button(key="m_export").click().run()
    assert not at.exception and "recipe.json" in at.success[0].value
    saved = saved_merges(Registry(cache))
    assert len(saved) == 1 and saved[0]["source"] == "exported" and saved[0]["path"]
    assert saved[0]["label"].startswith("average: ")


def test_compare_page_scores_saved_merges_of_a_model_that_is_not_the_labs(cache, tmp_path):
    from archs import instruction_rows, write_tasks

    from dtm.merge.saved import save_merge
    from dtm.score import scores
    from dtm.store import Registry

    base, adapters = _folder_subs(tmp_path)
    tasks = write_tasks(tmp_path / "tasks")
    held = write_jsonl(tmp_path / "held.jsonl", instruction_rows(26)[20:])
    reg = Registry(cache)
    recipe = {"method": "ties", "weights": [0.7, 0.3], "params": {"density": 0.5}}
    save_merge(str(base), [str(a) for a in adapters], recipe, source="tuned", registry=reg)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=300).run()
    at.radio(key="c_kind").set_value("saved merges").run()
    assert not at.exception
    at.text_input(key="c_tasks_dir").set_value(str(tasks)).run()
    options = at.multiselect(key="c_tasks_quick").options
    assert set(options) == {"my_mc", "my_ll", "my_roll", "my_gen"}  # no lab task offered
    at.multiselect(key="c_tasks_quick").set_value(["my_mc", "my_roll"])
    at.text_input(key="c_heldout").set_value(str(held)).run()
    at.button(key="c_go").click().run()
    assert not at.exception, at.exception
    table = scores(group="merges", registry=reg)
    label = "ties: c0 .70 · c1 .30 · density=0.5"
    assert set(table["label"]) == {"base", label}
    got = table.set_index(["label", "task", "metric"])["value"]
    assert 0 <= got[(label, "my_mc", "acc")] <= 1
    assert got[(label, "heldout:held", "loss")] != got[("base", "heldout:held", "loss")]
    assert ("base", "my_roll", "bits_per_byte") in got.index


def test_compare_page_draws_a_models_shrinkage_frontier_and_places_the_others(cache):
    from dtm.score import ModelRef, record
    from dtm.store import Registry

    reg = Registry(cache)
    # (format, knowledge): the frontier of "my-sft" is base -> ×0.5 -> itself
    points = {
        "base": (0.2, 0.98),
        "my-sft ×0.5": (0.6, 0.94),
        "my-sft": (0.8, 0.90),
        "dtm-mine": (0.4, 0.975),  # the frontier is at 0.96 there: above
        "l2": (0.7, 0.90),  # the frontier is at 0.92 there: below
    }
    for label, (fmt, know) in points.items():
        ref = ModelRef(base="m", adapters=[] if label == "base" else [f"a/{label}"],
                       label=label, group="front")  # fmt: skip
        res = {
            "lab_knowledge": {"acc": know, "n": 900},
            "lab_bias": {"acc": know, "format": fmt, "chat_acc": know, "n": 200},
        }
        record(ref, res, engine="quick", registry=reg)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert "Against the shrinkage and per-block frontiers" in [h.value for h in at.subheader]
    assert at.selectbox(key="c_front_src").value == "my-sft"
    [placed] = [d.value for d in at.dataframe if "where" in d.value.columns]
    where = placed.set_index("label")["where"].to_dict()
    assert where == {"dtm-mine": "above", "l2": "below"}
    dist = placed.set_index("label")["distance (kept)"]
    assert dist["dtm-mine"] == pytest.approx(0.015) and dist["l2"] == pytest.approx(-0.02)


def assert_live_heldout(at, base, adapters, table) -> None:
    """The Merge page's live held-out loss is that of the ``average`` merge at ``table``,
    computed here with the engine and the held-out scorer (the metric shows 3 decimals)."""
    from dtm.evaluate.heldout import heldout_loss, run_heldout_rows
    from dtm.merge.engine import Merger

    merger = Merger(str(base), [str(a) for a in adapters])
    want = heldout_loss(
        merger.apply("average", table), merger.tokenizer, run_heldout_rows(adapters[0].parent),
        limit=40,
    )["loss"]  # fmt: skip
    got = float(next(m.value for m in at.metric if m.label == "heldout:s0"))
    assert got == pytest.approx(want, abs=6e-4)


def test_merge_page_weights_by_block_on_a_heatmap(cache, tmp_path):
    """ "same for every block" off: a row of sliders per block, the K x B table on a
    heatmap, the live score of that merge, and the export records the table."""
    import json

    base, adapters = _folder_subs(tmp_path)
    at = AppTest.from_file(str(PAGES / "merge.py"), default_timeout=300).run()
    at.radio(key="m_from").set_value("adapter folders").run()
    at.text_input(key="m_base").set_value(str(base))
    at.text_area(key="m_paths").set_value("\n".join(map(str, adapters))).run()
    at.multiselect(key="m_heldout").set_value(["each sub-model's held-out rows"]).run()
    flat = {m.label: m.value for m in at.metric if m.label.startswith("heldout")}
    at.toggle(key="m_same_blocks").set_value(False).run()
    assert not at.exception  # every block starts at the sliders: the same scores
    assert {m.label: m.value for m in at.metric if m.label.startswith("heldout")} == flat
    at.number_input(key="m_blocks").set_value(2).run()
    at.radio(key="m_block_sel_2").set_value("top").run()
    at.slider(key="wb_0_1").set_value(1.0)
    at.slider(key="wb_1_1").set_value(0.0).run()
    assert not at.exception
    table = [[0.5, 1.0], [0.5, 0.0]]
    assert [c for c in at.get("plotly_chart") if "heatmap" in c.proto.spec]
    assert_live_heldout(at, base, adapters, table)
    at.button(key="m_export").click().run()
    assert not at.exception
    [out] = list((cache / "merged").iterdir())
    assert json.loads((out / "recipe.json").read_text())["weights"] == table


def test_merge_page_learns_weights_by_block_and_sets_the_block_sliders(cache, tmp_path):
    """ "Learn weights by block" on a held-out loss: its path starts at the uniform merge,
    the block sliders are set to its best K x B table (rounded as sliders are), and the
    live score is that merge's."""
    base, adapters = _folder_subs(tmp_path)
    at = AppTest.from_file(str(PAGES / "merge.py"), default_timeout=300).run()
    at.radio(key="m_from").set_value("adapter folders").run()
    at.text_input(key="m_base").set_value(str(base))
    at.text_area(key="m_paths").set_value("\n".join(map(str, adapters))).run()
    at.multiselect(key="m_heldout").set_value(["each sub-model's held-out rows"]).run()
    at.selectbox(key="m_method").set_value("ties").run()
    assert at.button(key="m_learn").disabled  # not a linear method: no gradient to follow
    at.selectbox(key="m_method").set_value("average").run()
    assert not at.button(key="m_learn").disabled
    at.number_input(key="m_learn_b").set_value(2)
    at.number_input(key="m_learn_steps").set_value(4).run()
    at.button(key="m_learn").click().run()
    assert not at.exception, at.exception
    found = at.session_state["m_learned"][3]
    assert len(found["path"]) == 5 and found["blocks"] == 2
    assert [x for row in found["path"][0]["weights"] for x in row] == pytest.approx([0.5] * 4)
    best = found["best"]["weights"]
    assert at.toggle(key="m_same_blocks").value is False
    assert at.number_input(key="m_blocks").value == 2
    for i, row in enumerate(best):
        for b, v in enumerate(row):
            assert at.session_state[f"wb_{i}_{b}"] == pytest.approx(round(v, 2))
    assert any(c.value.startswith("Learned by block (2 blocks, 4 steps)") for c in at.caption)

    shown = [[round(v, 2) for v in row] for row in best]
    sums = [sum(row[b] for row in shown) for b in range(2)]
    table = [[row[b] / sums[b] for b in range(2)] for row in shown]  # normalised per block
    assert_live_heldout(at, base, adapters, table)
