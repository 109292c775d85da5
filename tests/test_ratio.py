"""The loss-reduction ratio (``dtm.analysis.ratio_windows``) on losses whose ratio is known
by construction: the train probe against validation, per window, with its interval."""

import numpy as np
import pytest

from dtm.analysis import ratio_windows


def records(steps, probe, val, train=None):
    train = train if train is not None else [None] * len(steps)
    return [
        {"step": int(s), "probe_loss": float(p), "val_loss": float(v), "train_loss": t}
        for s, p, v, t in zip(steps, probe, val, train, strict=True)
    ]


def piecewise(steps, knots, slopes, start):
    """A loss falling by ``slopes[i]`` per step between ``knots[i]`` and ``knots[i+1]``."""
    out, level = [], start
    for s in steps:
        level = start
        for (a, b), k in zip(zip(knots[:-1], knots[1:], strict=True), slopes, strict=True):
            level -= k * (min(max(s, a), b) - a)
        out.append(level)
    return np.array(out)


def test_ratio_per_window_is_the_known_ratio_of_the_two_falls():
    # Validation falls 0.02 per step in the first half and 0.002 in the second; the probe
    # falls 0.02 (ratio 1) then 0.016 (ratio 8). The running train loss falls at other
    # rates: a ratio taken from it would be 3 and 30.
    steps = np.arange(0, 401, 20)
    val = piecewise(steps, [0, 200, 400], [0.02, 0.002], 6.0)
    probe = piecewise(steps, [0, 200, 400], [0.02, 0.016], 6.5)
    train = piecewise(steps, [0, 200, 400], [0.06, 0.06], 9.0)
    table = ratio_windows(records(steps, probe, val, list(train)), windows=2)
    assert list(table["start"]) == [0, 200] and list(table["end"]) == [200, 400]
    assert table["ratio"].tolist() == pytest.approx([1.0, 8.0], rel=1e-9)
    assert table["d_val"].tolist() == pytest.approx([4.0, 0.4], rel=1e-9)
    assert table["d_train"].tolist() == pytest.approx([4.0, 3.2], rel=1e-9)
    # Exact lines: no residual, so the intervals close on the ratio.
    assert table["low"].tolist() == pytest.approx([1.0, 8.0], rel=1e-6)
    assert table["high"].tolist() == pytest.approx([1.0, 8.0], rel=1e-6)


def test_a_flat_validation_loss_gives_no_ratio():
    rng = np.random.default_rng(3)
    steps = np.arange(0, 201, 10)
    val = 2.0 + rng.normal(0, 0.01, len(steps))  # only noise
    probe = 3.0 - 0.004 * steps + rng.normal(0, 0.01, len(steps))
    row = ratio_windows(records(steps, probe, val), windows=1).iloc[0]
    assert not row["val_moving"]
    assert row["ratio"] is None and row["low"] is None and row["high"] is None
    assert row["d_train"] == pytest.approx(0.8, abs=0.05)


def test_fieller_interval_covers_the_true_ratio_at_its_level():
    # 400 noisy runs around falls of 0.3 (val) and 1.5 (probe): ratio 5. The 95% interval
    # must cover 5 in about 95% of them, and the point estimates centre on 5.
    rng = np.random.default_rng(7)
    steps = np.arange(0, 121, 10)
    covered, ratios = 0, []
    for _ in range(400):
        noise = rng.multivariate_normal([0, 0], [[4e-4, 2e-4], [2e-4, 4e-4]], len(steps))
        val = 2.0 - 0.0025 * steps + noise[:, 1]
        probe = 2.5 - 0.0125 * steps + noise[:, 0]
        row = ratio_windows(records(steps, probe, val), windows=1).iloc[0]
        assert row["val_moving"]
        covered += row["low"] <= 5.0 <= row["high"]
        ratios.append(row["ratio"])
    assert 0.91 <= covered / 400 <= 0.99, covered
    assert np.median(ratios) == pytest.approx(5.0, rel=0.05)


def test_records_without_both_losses_are_left_out_and_bad_windows_refused():
    steps = np.arange(0, 101, 10)
    recs = records(steps, 3 - 0.01 * steps, 2 - 0.01 * steps)
    recs.insert(3, {"step": 25, "train_loss": 1.0})  # a record with no eval losses
    assert ratio_windows(recs, windows=1).iloc[0]["records"] == 11
    assert ratio_windows(recs[:3], windows=1).empty
    with pytest.raises(ValueError, match="windows"):
        ratio_windows(recs, windows=0)


def test_code_token_drops_sums_the_fall_on_the_tokens_after_ref(lab0, tmp_path):
    """Against a row-by-row forward pass with the code tokens found in the text."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dtm.analysis import code_token_drops, encode_split
    from dtm.models import load_base

    early, tok = load_base(str(lab0 / "model"))
    late, _ = load_base(str(lab0 / "model"))
    torch.manual_seed(1)
    late = get_peft_model(
        late, LoraConfig(r=4, lora_alpha=12, target_modules=["up_proj"], init_lora_weights=False)
    )
    rows = encode_split(str(lab0 / "data" / "train.jsonl"), tok, n=12, seed=2)
    got = code_token_drops(early, late, tok, rows)

    def losses(model, row):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        labels = row["labels"][1:]
        return [(t, -logp[i, t].item()) for i, t in enumerate(labels) if t != -100]

    drop = code = 0.0
    n_code = n = 0
    for row in rows:
        a, b = losses(early, row), losses(late, row)
        words = tok.convert_ids_to_tokens([t for t, _ in a])
        after_ref = False
        for w, (_, la), (_, lb) in zip(words, a, b, strict=True):
            is_code = after_ref and w != "."
            after_ref = w == "ref" or is_code
            drop += la - lb
            n += 1
            if is_code:
                code += la - lb
                n_code += 1
    assert n_code > 0 and got["tokens"] == n and got["code_tokens"] == n_code
    assert got["drop"] == pytest.approx(drop, rel=1e-3, abs=1e-3)
    assert got["code_drop"] == pytest.approx(code, rel=1e-3, abs=1e-3)
    assert got["code_token_share"] == pytest.approx(n_code / n)


def test_a_flat_validation_loss_bounds_the_ratio_from_below_when_the_probe_falls():
    # Monte Carlo: validation flat (only noise), the probe falling 0.2 over the window.
    # The ratio is unbounded; the bound abs_low must hold for |ΔL_probe / ΔL_val| with the
    # true ΔL_val = 0 (infinite): every run's bound is finite and positive, and in a
    # design where ΔL_val is truly 0.01 (ratio 20) the bound is below 20 in >= 95% of runs.
    rng = np.random.default_rng(11)
    steps = np.arange(0, 121, 10)
    below = 0
    for _ in range(300):
        noise = rng.normal(0, 0.004, (len(steps), 2))
        val = 2.0 - 0.01 * steps / 120 + noise[:, 1]
        probe = 2.5 - 0.2 * steps / 120 + noise[:, 0]
        row = ratio_windows(records(steps, probe, val), windows=1).iloc[0]
        if row["val_moving"]:
            below += row["low"] <= 20.0 <= row["high"]
        else:
            assert row["ratio"] is None and row["abs_low"] > 0
            below += row["abs_low"] <= 20.0
    assert below / 300 >= 0.93, below


def test_the_ratio_chart_folds_each_dtm_groups_sub_models_and_keeps_sft():
    import pandas as pd

    from dtm.analysis import fold_subs

    curves = pd.DataFrame(
        {
            "run": ["sft", "sft", "a0", "a0", "a1", "a1", "b0", "b0"],
            "step": [0, 4] * 4,
            "loss_ratio": [1.0, 3.0, 1.0, 2.0, 1.0, 4.0, 1.0, 1.5],
        }
    )
    groups = {"a0": "dtm k-means s0", "a1": "dtm k-means s0", "b0": "dtm random s0"}
    out = fold_subs(curves, groups, "step")
    got = {(r.run, r.step): r.loss_ratio for r in out.itertuples()}
    assert got == {
        ("sft", 0): 1.0, ("sft", 4): 3.0,
        ("dtm k-means s0 (mean of 2 sub-models)", 0): 1.0,
        ("dtm k-means s0 (mean of 2 sub-models)", 4): 3.0,  # (2 + 4) / 2
        ("dtm random s0 (mean of 1 sub-models)", 0): 1.0,
        ("dtm random s0 (mean of 1 sub-models)", 4): 1.5,
    }  # fmt: skip
    windows = pd.DataFrame(
        {
            "run": ["a0", "a1"],
            "window": [0, 0],
            "ratio": [2.0, 4.0],
            "low": [1.0, 3.5],
            "high": [2.5, 6.0],
            "val_moving": [True, False],
        }  # fmt: skip
    )
    [row] = fold_subs(windows, groups, "window").to_dict("records")
    assert (row["ratio"], row["low"], row["high"], row["val_moving"]) == (3.0, 1.0, 6.0, False)


def test_frontier_labels_are_rounded_and_never_overlap():
    from dtm.charts.results import alpha_labels

    assert alpha_labels([0, 1 / 17, 0.25, 0.5, 0.75, 1]) == [
        "α=0", "", "α=0.25", "α=0.5", "α=0.75", "α=1"
    ]  # fmt: skip
    assert alpha_labels([1 / 3]) == ["α=0.33"]
