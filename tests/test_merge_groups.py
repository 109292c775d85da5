"""The groups a merge is made of (one launch, one clustering, one seed), what Compare
scores for each, and the merges' readable labels: registry rows of a real SQLite
registry, references written out by hand."""

import time
from dataclasses import replace

import pytest

from dtm.jobs.queue import _new_job
from dtm.lineup import launch_models
from dtm.merge.labels import SINGLE, recipe_label, vertex_of, weights_label, weights_table
from dtm.merge.saved import save_merge
from dtm.merge.sources import merge_sources
from dtm.store import Registry
from dtm.store.jobs import JobStore


def _job(store, root, name, kind, seed, *, cluster=None, clustering=None, state="done",
         launch="lab"):  # fmt: skip
    jid = f"{launch}-{name}".replace(" ", "-")
    run = root / "runs" / jid
    (run / "adapter").mkdir(parents=True)
    config = {"base": "/m/base", "seed": seed, "kind": kind, "eval_lab": "/m/lab"}
    if cluster is not None:
        config["cluster"] = cluster
    job = _new_job(jid, kind, name, launch, config, "local", run, clustering)
    store.add(replace(job, state=state))
    time.sleep(0.01)  # the adapters' times order the groups


@pytest.fixture
def launch(cache):
    """One launch of two clusterings and two seeds (K=3 k-means, K=2 random; k-means seed
    0 still training its third sub-model), SFT and l2 per seed, a soup member; and a
    second launch with one group."""
    store = JobStore(Registry(cache))
    for seed in (0, 1):
        _job(store, cache, f"sft s{seed}", "sft", seed)
        for c in range(3):
            left = seed == 0 and c == 2
            _job(store, cache, f"kmeans sub {c} s{seed}", "sub", seed, cluster=c,
                 clustering="kmeans", state="running" if left else "done")  # fmt: skip
        for c in range(2):
            _job(store, cache, f"random sub {c} s{seed}", "sub", seed, cluster=c,
                 clustering="random")  # fmt: skip
    _job(store, cache, "l2 s0", "l2", 0)
    _job(store, cache, "sft s2 (soup member)", "sft", 2)
    for c in range(2):
        _job(store, cache, f"sub {c}", "sub", 0, cluster=c, clustering="kmeans", launch="other")
    return store


def test_groups_are_one_launch_clustering_and_seed_never_a_mix(launch):
    sources = {s.id: s for s in merge_sources(launch)}
    assert set(sources) == {
        "lab · k-means, seed 0, K=3",
        "lab · k-means, seed 1, K=3",
        "lab · random, seed 0, K=2",
        "lab · random, seed 1, K=2",
        "other · k-means, seed 0, K=2",
    }
    for s in sources.values():
        jobs = {j.name: j for j in launch.list()}
        members = [jobs[n] for n, _ in s.subs]
        assert {(j.group, j.clustering, j.config["seed"]) for j in members} == {
            (s.group, s.clustering, s.seed)
        }
    training = sources["lab · k-means, seed 0, K=3"]
    assert [n for n, _ in training.subs] == ["kmeans sub 0 s0", "kmeans sub 1 s0"]
    assert training.label() == "lab · k-means, seed 0, K=3 (2 of 3 finished, still training)"
    assert sources["lab · random, seed 1, K=2"].label() == "lab · random, seed 1, K=2"
    assert set(training.baselines) == {"sft s0", "l2 s0"}  # this seed's, no soup member
    assert set(sources["lab · k-means, seed 1, K=3"].baselines) == {"sft s1"}
    assert sources["other · k-means, seed 0, K=2"].baselines == {}
    assert sources["lab · random, seed 1, K=2"].cluster_names == ["c0", "c1"]


def test_compare_has_a_dtm_row_and_a_control_per_group_with_its_k(launch, cache):
    sources = {s.id: s for s in merge_sources(launch)}
    full = launch_models(sources["lab · k-means, seed 1, K=3"])
    by = {m.label: m for m in full}
    assert list(by) == ["base", "sft s1", "sft s1 ×1/3", "dtm", *(f"kmeans sub {c} s1" for c in range(3))]  # fmt: skip
    assert by["sft s1 ×1/3"].factor == pytest.approx(1 / 3)
    assert by["dtm"].recipe["weights"] == pytest.approx([1 / 3] * 3)
    assert {by["dtm"].clustering, by["dtm"].seed} == {"kmeans", 1}
    assert len(by["dtm"].adapters) == 3
    part = {m.label: m for m in launch_models(sources["lab · k-means, seed 0, K=3"])}
    assert "dtm" not in part and part["dtm (2 of 3 sub-models)"].recipe["weights"] == [0.5, 0.5]
    assert part["sft s0 ×1/3"].factor == pytest.approx(1 / 3)  # the group's K, not 2
    # a kept merge is a row of its group only, named by its clusters' weights
    src = sources["lab · random, seed 0, K=2"]
    recipe = {"method": "ties", "weights": [0.7, 0.3], "params": {"density": 0.5}}
    reg = Registry(cache)
    save_merge(src.base, list(src.adapters), recipe, source="tuned", group=src.id,
               names=src.cluster_names, registry=reg)  # fmt: skip
    rows = {m.label: m for m in launch_models(src, reg)}
    assert rows["ties: c0 .70 · c1 .30 · density=0.5"].kind == "merge"
    other = launch_models(sources["lab · random, seed 1, K=2"], reg)
    assert not [m for m in other if m.label.startswith("ties")]


def test_readable_labels_of_flat_and_per_block_weights():
    assert weights_label([0.25, 0.25, 0.5]) == "c0 .25 · c1 .25 · c2 .50"
    assert weights_label([1.0, 0.0], ["c2", "c5"]) == "c2 1.00 · c5 .00"
    assert recipe_label({"weights": [1 / 3] * 3}) == "average: c0 .33 · c1 .33 · c2 .33"
    table = [[0.25, 0.75, 0.2], [0.75, 0.25, 0.8]]  # K=2 rows of 3 blocks, bottom first
    assert weights_label(table) == "by block ×3: c0 .25/.75/.20 · c1 .75/.25/.80"
    assert recipe_label({"method": "ties", "weights": table}).startswith("ties: by block ×3")
    assert weights_table(table)[2] == {"block": 2, "c0": 0.2, "c1": 0.8}
    assert weights_table([0.5, 0.5]) == []
    assert weights_label([[0.3, 0.3], [0.7, 0.7]]) == weights_label([0.3, 0.7])  # blocks agree
    assert vertex_of([0.0, 1.0, 0.0]) == 1 and vertex_of([0.002, 0.998]) == 1
    assert vertex_of([0.5, 0.5]) is None and vertex_of([0.0, 0.0]) is None
    assert vertex_of([[0, 0], [1, 1]]) == 1 and vertex_of([[0, 1], [1, 0]]) is None
    assert SINGLE == "a single sub-model, not a merge"
