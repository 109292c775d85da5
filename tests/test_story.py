"""The Home page's story charts (``dtm.story``) while SFT trains and once it is done: the
curves in words, the axis over the whole run, and sentences whose numbers are those of
the frame drawn, saying "so far" until the run ends."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import ROOT

from dtm.experiment import load_experiment
from dtm.story import ratio_panel, tax_panel

EXPERIMENTS = ROOT / "experiments"

TABLE = pd.DataFrame(columns=["label", "seed", "task", "metric", "value"])


def _bench(know: float, reason: float, fmt: float) -> dict:
    return {
        "lab_knowledge": {"acc": know},
        "lab_reasoning": {"acc": reason},
        "lab_bias": {"format": fmt},
    }


def _sft(tmp_path, records, state: str, total: int = 900):
    run = tmp_path / "sft"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(
        kind="sft", config={"seed": 0}, run_dir=run, total_steps=total, state=state, name="sft"
    )


def _rec(step, val, probe, bench=None):
    r = {"step": step, "epoch": step / 50, "val_loss": val, "probe_loss": probe}
    return {**r, "bench": bench} if bench else r


@pytest.fixture
def exp():
    return load_experiment(EXPERIMENTS / "lab-class.yaml")


def test_the_curve_mid_run_is_in_words_over_the_whole_run_and_says_so_far(exp, tmp_path):
    recs = [
        _rec(0, 3.0, 3.0, _bench(0.90, 0.50, 0.10)),
        _rec(100, 2.5, 2.2, _bench(0.86, 0.5, 0.7)),
    ]
    panel = tax_panel(exp, [_sft(tmp_path, recs, "running")], TABLE)
    fig = panel["figure"]
    assert {t.name for t in fig.data} == {"knowledge", "reasoning", "answer format"}
    assert list(fig.layout.xaxis.range) == pytest.approx([0, 900 * 1.02])
    # the base model's level: SFT's step-0 scores (the same model) as dashed lines
    assert sorted(round(s.y0, 2) for s in fig.layout.shapes) == [0.1, 0.5, 0.9]
    sentence = panel["sentence"]
    assert sentence.startswith("So far (SFT seed 0, step 100 of 900)")
    assert "90%" not in sentence and not panel["final"]
    frame = panel["frame"].set_index(["task", "step"])["value"]
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", sentence)]
    assert numbers == [
        frame[("answer format", 0)],
        frame[("answer format", 100)],
        frame[("knowledge", 0)],
        frame[("knowledge", 100)],
    ]


def test_the_curve_when_sft_is_done_states_the_finding(exp, tmp_path):
    recs = [
        _rec(0, 3.0, 3.0, _bench(0.90, 0.5, 0.10)),
        _rec(450, 2.4, 2.0, _bench(0.85, 0.5, 0.95)),
        _rec(900, 2.3, 1.5, _bench(0.80, 0.5, 0.99)),
    ]
    panel = tax_panel(exp, [_sft(tmp_path, recs, "done")], TABLE)
    assert panel["final"]
    # format gain 0.89: 90% of it (0.801) is reached at step 450, where knowledge has
    # dropped 0.05 of its 0.10: 50%
    assert panel["sentence"] == (
        "Over SFT (seed 0) the answer format goes from 0.10 to 0.99 and knowledge from "
        "0.900 to 0.800; by step 450, where the format has 90% of its gain, 50% of the "
        "knowledge drop has happened."
    )


def test_no_ratio_chart_until_a_window_has_a_value(exp, tmp_path):
    flat = [_rec(s, 3.0, 3.0) for s in range(0, 120, 20)]  # no loss has moved
    assert ratio_panel(exp, [_sft(tmp_path, flat, "running")]) is None
    wiggle = [0.004, -0.003, 0.001, -0.004, 0.002]  # noise, so that each fall has an error
    moving = [
        _rec(s, 3.0 - s / 400 + wiggle[i % 5], 3.0 - s / 80 + wiggle[(i + 2) % 5])
        for i, s in enumerate(range(0, 820, 20))
    ]
    panel = ratio_panel(exp, [_sft(tmp_path, moving, "running")])
    assert panel is not None and panel["sentence"].startswith("So far: ")
    done = ratio_panel(exp, [_sft(tmp_path, moving, "done", total=800)])
    assert not done["sentence"].startswith("So far")


def test_how_long_comes_from_this_machines_runs(exp):
    from dtm.story import story_time

    running = {
        "state": "running",
        "started": 1000.0,
        "stage": "train",
        "stages": {"train": {"state": "running", "fraction": 0.25, "began": 1060.0}},
    }
    # 60 s in the train stage for its first quarter: 180 s more at that pace
    assert story_time(exp, running, [], now=1120.0) == (
        "On this machine: running for 2.0 min; the train stage is 25% through: about 3.0 min "
        "more at its pace so far."
    )
    done = {
        "state": "done",
        "stages": {
            "lab": {"seconds": 4.0},
            "train": {"seconds": 200.0},
            "evaluate": {"seconds": 50.0},
        },
    }
    assert story_time(exp, done, [], now=0) == (
        "On this machine it last took 4.2 min (lab 4 s, train 3.3 min, evaluate 50 s)."
    )
    assert story_time(exp, None, [], now=0).startswith("Not run here yet: its first run")


def test_each_sentence_states_the_numbers_of_the_table_under_its_chart(exp, tmp_path):
    """Mid-run and done, the tax and ratio sentences against their tables (as a reader
    sees them: text), read by tests/story_check.py; a table that disagrees fails it."""
    from story_check import check_panel, frame_rows

    wiggle = [0.004, -0.003, 0.001, -0.004, 0.002]
    recs = [
        _rec(
            s,
            3.0 - s / 400 + wiggle[i % 5],
            3.0 - s / 80 + wiggle[(i + 2) % 5],
            _bench(0.9 - s / 9000, 0.5 + s / 10000, min(0.99, 0.1 + s / 200))
            if s % 100 == 0
            else None,
        )
        for i, s in enumerate(range(0, 820, 20))
    ]
    for state, total in (("running", 900), ("done", 800)):
        job = _sft(tmp_path, recs, state, total=total)
        for panel in (tax_panel(exp, [job], TABLE), ratio_panel(exp, [job])):
            rows = frame_rows(panel["table"])
            check_panel(panel["key"], panel["sentence"], rows)
            wrong = [dict(r) for r in rows]
            col = "knowledge" if panel["key"] == "tax" else "ratio"
            pick = (
                0
                if panel["key"] == "tax"
                else next(i for i, r in enumerate(rows) if r["ratio"] != "within noise")
            )
            wrong[pick][col] = "0.123"
            with pytest.raises(AssertionError):
                check_panel(panel["key"], panel["sentence"], wrong)


def test_before_any_run_the_estimate_comes_from_this_machines_measured_pace(exp):
    """Nothing ran here: the estimate is the plan at the lab's measured unit costs, so a
    machine twice as slow in every unit gets twice the time; without a pace, no figure."""
    from dtm.story import paced_seconds, story_time

    pace = {"step_seconds": 0.08, "batch_size": 16, "loss_seconds": 0.3, "eval_seconds": 2.0}
    slow = {**pace, **{k: 2 * pace[k] for k in ("step_seconds", "loss_seconds", "eval_seconds")}}
    one, two = paced_seconds(exp, pace), paced_seconds(exp, slow)
    assert two == pytest.approx(2 * one)
    # by hand, from lab-class.yaml: SFT 900 steps of 16 rows (18 passes over 800 rows);
    # 8 sub-models of 200 rows (800 / K=4), 18 passes each: 225 steps; losses at step 0
    # and every 20 steps; benchmarks at step 0, every 100 steps and at the last step; then
    # the base, and per seed SFT, the control, 5 frontier points, 2 DTM merges and 8
    # sub-models scored once each
    train = (900 + 8 * 225) * 0.08
    losses = ((900 // 20 + 1) + 8 * (225 // 20 + 1)) * 0.3
    evals = (10 + 8 * 4) * 2.0
    scored = (1 + 2 + 5 + 2 + 8) * 2.0
    assert one == pytest.approx(train + losses + evals + scored)
    text = story_time(exp, None, [], 0.0, pace)
    assert f"about {one / 60:.1f} min" in text and "0.08 s a training step" in text
    assert "Not run here yet: its first run" in story_time(exp, None, [], 0.0, None)
