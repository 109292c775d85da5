"""The merge engine against a dense reference on the lab's tiny Llama."""

import json
import shutil

import pytest
import torch
from conftest import cache_listing, changed_files, dtm_cli, round_robin_assignment, tiny_train

from dtm.controls import shrink_adapter
from dtm.errors import ConfigError
from dtm.jobs.runner import run_training as train
from dtm.merge.engine import Merger
from dtm.merge.lora import read_adapter
from dtm.models import load_base

W = [0.2, 0.5, 0.3]


@pytest.fixture(scope="module")
def subs(lab0, tmp_path_factory):
    """Three sub-models of a K=3 round-robin assignment (with their Fishers)."""
    root = tmp_path_factory.mktemp("subs")
    asg = round_robin_assignment(lab0, root / "asg.csv", k=3)
    for c in range(3):
        train(tiny_train(lab0, root / f"s{c}", kind="sub", assignments=str(asg), cluster=c))
    return [root / f"s{c}" / "adapter" for c in range(3)]


@pytest.fixture(scope="module")
def merger(lab0, subs):
    return Merger(str(lab0 / "model"), subs)


@pytest.fixture(scope="module")
def ids(merger):
    return merger.tokenizer(
        ["what is 2 plus 3 ?", "who lives in the capital ?"], return_tensors="pt", padding=True
    )["input_ids"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def dense_reference(lab0, adapters, weights, ids):
    """W0 + sum_k w_k s_k B_k A_k, written into a fresh base model."""
    base, _ = load_base(str(lab0 / "model"))
    sets = [read_adapter(a) for a in adapters]
    with torch.no_grad():
        for prefix in sets[0].layers:
            mod = base.get_submodule(prefix.removeprefix("base_model.model."))
            mod.weight += sum(
                w * s.layers[prefix][2] * (s.layers[prefix][1] @ s.layers[prefix][0])
                for w, s in zip(weights, sets, strict=True)
            )
    return logits(base, ids)


def test_average_equals_the_dense_merge(lab0, subs, merger, ids):
    got = logits(merger.apply("average", [2, 5, 3]), ids)  # normalised to W
    torch.testing.assert_close(got, dense_reference(lab0, subs, W, ids), rtol=0, atol=1e-4)


def test_one_hot_weights_give_that_sub_model_exactly(lab0, subs, merger, ids):
    from peft import PeftModel

    alone = PeftModel.from_pretrained(load_base(str(lab0 / "model"))[0], subs[0])
    torch.testing.assert_close(
        logits(merger.apply("average", [1, 0, 0]), ids), logits(alone, ids), rtol=0, atol=1e-5
    )


def test_ties_at_density_1_with_agreeing_signs_is_the_average(lab0, subs, tmp_path, ids):
    twice = shrink_adapter(subs[0], 2.0, tmp_path / "twice")  # same signs everywhere
    m = Merger(str(lab0 / "model"), [subs[0], twice])
    avg = logits(m.apply("average", [0.3, 0.7]), ids)
    torch.testing.assert_close(
        logits(m.apply("ties", [0.3, 0.7], density=1.0), ids), avg, rtol=0, atol=1e-5
    )
    # the dense path restores the base weights before the next linear merge
    torch.testing.assert_close(logits(m.apply("average", [0.3, 0.7]), ids), avg, rtol=0, atol=0)


def test_dare_without_drops_is_linear_and_drops_are_seeded(merger, ids):
    raw = [0.5, 0.8, -0.2]
    lin = logits(merger.apply("linear", raw), ids)
    torch.testing.assert_close(
        logits(merger.apply("dare", raw, drop=0.0), ids), lin, rtol=0, atol=1e-5
    )
    a = logits(merger.apply("dare", raw, drop=0.5, seed=1), ids)
    b = logits(merger.apply("dare", raw, drop=0.5, seed=1), ids)
    c = logits(merger.apply("dare", raw, drop=0.5, seed=2), ids)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_released_ab_averaging_is_not_the_average(lab0, subs, merger, ids):
    """mean(B) @ mean(A) != mean(B @ A): its error is far above float rounding, where the
    exact merge's is at it (the cost the Merge page shows)."""
    ref = dense_reference(lab0, subs, W, ids)
    exact = (logits(merger.apply("average", W), ids) - ref).abs().max()
    ab = (logits(merger.apply("official_ab_average", W), ids) - ref).abs().max()
    assert ab > 20 * exact, (ab, exact)


def test_exports_reproduce_the_in_memory_merge(lab0, merger, ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for method, params in [("average", {}), ("ties", {"density": 0.5}), ("fisher", {})]:
        mem = logits(merger.apply(method, W, **params), ids)
        full = merger.export(tmp_path / f"{method}-full", method, W, full=True, **params)
        adapter = merger.export(tmp_path / f"{method}-adapter", method, W, **params)
        torch.testing.assert_close(
            logits(AutoModelForCausalLM.from_pretrained(full), ids), mem, rtol=0, atol=1e-4
        )
        loaded = PeftModel.from_pretrained(load_base(str(lab0 / "model"))[0], adapter)
        torch.testing.assert_close(logits(loaded, ids), mem, rtol=0, atol=1e-4)
        recipe = json.loads((adapter / "recipe.json").read_text())
        assert recipe["method"] == method and recipe["weights"] == W
        assert all(len(a["sha256"]) == 64 for a in recipe["adapters"])


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5, 0.5], "2 weights for 3 adapters"),
        ([float("nan"), 0.5, 0.5], "NaN or infinite"),
        ([0, 0, 0], "all zero"),
    ],
)
def test_bad_weights_are_refused(merger, weights, message):
    with pytest.raises(ConfigError, match=message):
        merger.apply("average", weights)


def test_merge_cli_contract_and_errors(lab0, subs, tmp_path):
    """Also: the suite's merges (no `cache` fixture here) are recorded in the session's
    DTM_CACHE, and the checkout's cache/ and registry are left as they were."""
    import os

    from dtm.merge.saved import save_merge, saved_merges
    from dtm.store import Registry

    checkout = cache_listing()
    out = tmp_path / "merged"
    args = ["merge", "--base", lab0 / "model", "--adapters", *subs]
    r = dtm_cli(*args, "--weights", "0.2,0.5,0.3", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    save_merge(
        str(lab0 / "model"), list(map(str, subs)), {"weights": [0.5, 0.3, 0.2]}, source="tuned"
    )
    kept = saved_merges(Registry(os.environ["DTM_CACHE"]))  # other tests' merges too
    assert any(m["source"] == "exported" and m["path"] == str(out) for m in kept)
    assert any(m["source"] == "tuned" and m["recipe"]["weights"] == [0.5, 0.3, 0.2] for m in kept)
    assert changed_files(checkout, cache_listing()) == []
    assert (out / "adapter_model.safetensors").exists() and (out / "recipe.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3 * 16
    r = dtm_cli(*args, "--weights", "0.2,0.5,0.3", "--out", out)
    assert r.returncode == 2 and "not empty" in r.stderr  # nothing is overwritten
    r = dtm_cli(*args, "--weights", "nan,1,1", "--out", tmp_path / "x")
    assert r.returncode == 2 and "NaN" in r.stderr
    no_fisher = tmp_path / "nofisher"
    shutil.copytree(subs[0], no_fisher)
    (no_fisher / "fisher.safetensors").unlink()
    r = dtm_cli(
        "merge",
        "--base",
        lab0 / "model",
        "--adapters",
        no_fisher,
        subs[1],
        "--method",
        "fisher",
        "--out",
        tmp_path / "f",
    )
    assert r.returncode == 2 and "no fisher.safetensors" in r.stderr
    r = dtm_cli("merge", "--base", lab0 / "model", "--adapters", tmp_path, "--out", tmp_path / "y")
    assert r.returncode == 2 and "not a peft adapter folder" in r.stderr


def test_the_checkout_cache_check_sees_a_file_added_changed_or_removed(tmp_path):
    (tmp_path / "registry.sqlite").write_text("a")
    before = cache_listing(tmp_path)
    assert changed_files(before, cache_listing(tmp_path)) == []
    (tmp_path / "merged" / "m").mkdir(parents=True)
    (tmp_path / "merged" / "m" / "recipe.json").write_text("{}")
    assert changed_files(before, cache_listing(tmp_path)) == ["merged/m/recipe.json"]
    (tmp_path / "registry.sqlite").write_text("ab")
    (tmp_path / "merged" / "m" / "recipe.json").unlink()
    assert changed_files(before, cache_listing(tmp_path)) == ["registry.sqlite"]


def test_learned_weights_lower_the_heldout_loss_and_record_their_path(lab0, subs, tmp_path):
    """``dtm merge --learn`` on the small lab: the path starts at the uniform merge, the
    best point's held-out loss is below it, and the exported merge, loaded in peft and
    scored apart from the finder, has that loss."""
    from peft import PeftModel

    from dtm.evaluate.heldout import heldout_loss

    out = tmp_path / "learned"
    val = lab0 / "data" / "val.jsonl"
    r = dtm_cli(
        "merge", "--base", lab0 / "model", "--adapters", *subs, "--learn", "--heldout", val,
        "--blocks", "2", "--steps", "6", "--limit", "24", "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads((out / "learn.json").read_text())
    path, best = found["path"], found["best"]
    assert len(path) == 7 and found["evaluations"] == 7
    assert [x for row in path[0]["weights"] for x in row] == pytest.approx([1 / 3] * 6)
    assert all(len(p["weights"]) == 3 and len(p["weights"][0]) == 2 for p in path)
    assert best["loss"] == min(p["loss"] for p in path) < path[0]["loss"] - 1e-4
    recipe = json.loads((out / "recipe.json").read_text())
    flat = [x for row in best["weights"] for x in row]
    assert [x for row in recipe["weights"] for x in row] == pytest.approx(flat)
    model = PeftModel.from_pretrained(load_base(str(lab0 / "model"))[0], out).eval()
    tok = Merger(str(lab0 / "model"), subs[:1]).tokenizer
    got = heldout_loss(model, tok, val, limit=24)["loss"]
    assert got == pytest.approx(best["loss"], abs=1e-4)
    m = Merger(str(lab0 / "model"), subs)  # the uniform merge, scored the same way
    uniform = heldout_loss(m.apply("average", [1, 1, 1]), m.tokenizer, val, limit=24)["loss"]
    assert uniform == pytest.approx(path[0]["loss"], abs=1e-4)
