"""Disperse: clusterers, determinism, keywords, registry reuse, the CLI contract, and
what each cluster holds (by source, by a lab's task)."""

import collections
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import alpaca, check_composition_sentence, dtm_cli, write_jsonl

from dtm import cluster
from dtm.disperse import DisperseConfig, other_clustering, run_disperse
from dtm.errors import ConfigError
from dtm.samples import SAMPLE_PATH, synthetic_instructions
from dtm.store import Registry


def blobs(n_per=50, k=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 5
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize("method", cluster.METHODS)
def test_clusterers_deterministic_and_in_range(method):
    x, _ = blobs()
    a = cluster.disperse(x, 4, method, seed=3)
    b = cluster.disperse(x, 4, method, seed=3)
    assert np.array_equal(a, b) and a.dtype == np.int32
    assert set(a.tolist()) == {0, 1, 2, 3}


def test_kmeans_and_agglomerative_recover_blobs():
    from sklearn.metrics import adjusted_rand_score

    x, truth = blobs()
    for method in ("kmeans", "agglomerative"):
        assert adjusted_rand_score(truth, cluster.disperse(x, 4, method)) > 0.95


def test_agglomerative_on_more_rows_than_the_exact_limit(monkeypatch):
    monkeypatch.setattr(cluster, "AGGLO_EXACT_MAX", 60)
    x, truth = blobs()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, cluster.disperse(x, 4, "agglomerative")) > 0.95


def test_random_split_is_balanced_and_seeded():
    x = np.zeros((10, 3), dtype=np.float32)
    a = cluster.disperse(x, 3, "random", seed=0)
    assert sorted(np.bincount(a).tolist()) == [3, 3, 4]
    assert not np.array_equal(a, cluster.disperse(x, 3, "random", seed=1))


@pytest.mark.parametrize(
    "k,message",
    [(0, "at least 1"), (-2, "at least 1"), (11, "larger than the number of usable rows (10)")],
)
def test_bad_k(k, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cluster.disperse(np.zeros((10, 3), dtype=np.float32), k)


def test_keywords_tell_clusters_apart():
    texts = ["the river flows to the sea"] * 5 + ["write python code for sorting"] * 5
    labels = np.array([0] * 5 + [1] * 5)
    kw = cluster.cluster_keywords(texts, labels, 2, top_n=3)
    assert set(kw[0]) <= {"river", "flows", "sea"} and set(kw[1]) <= {"python", "code", "sorting"}


def test_disperse_reuses_registry_work(cache):
    cfg = DisperseConfig(data=str(SAMPLE_PATH), k=5)
    first = run_disperse(cfg, project=False)
    assert first.computed == {"embedding": True, "assignment": True}
    # The five families of the sample are found
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(first.table["source"], first.table["cluster"]) > 0.9
    again = run_disperse(cfg, project=False)
    assert again.computed == {"embedding": False, "assignment": False}
    assert again.table["cluster"].tolist() == first.table["cluster"].tolist()
    other_k = run_disperse(DisperseConfig(data=str(SAMPLE_PATH), k=3), project=False)
    assert other_k.computed == {"embedding": False, "assignment": True}
    reg = Registry()
    assert len(reg.list("embedding")) == 1 and len(reg.list("assignment")) == 2
    assert len(reg.list("dataset")) == 1


def test_same_content_at_another_path_is_the_same_dataset(cache, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(SAMPLE_PATH.read_bytes())
    a = run_disperse(DisperseConfig(data=str(SAMPLE_PATH), k=2), project=False)
    b = run_disperse(DisperseConfig(data=str(copy), k=2), project=False)
    assert a.artifacts["dataset"].key == b.artifacts["dataset"].key
    assert b.computed["embedding"] is False


def test_cli_disperse_writes_the_contract_files(cache, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        synthetic_instructions(120, seed=1) + ['{"broken": ', {"instruction": "", "output": "x"}],
    )
    out = tmp_path / "out"
    r = dtm_cli("disperse", "--data", data, "--k", 4, "--seed", 7, "--out", out, cache=cache)
    assert r.returncode == 0, r.stderr
    csv = pd.read_csv(out / "assignments.csv", dtype={"id": str})
    assert list(csv.columns) == ["id", "cluster", "x", "y"]
    assert len(csv) == 120 and csv["id"].is_unique
    assert set(csv["cluster"]) <= {0, 1, 2, 3} and csv[["x", "y"]].notna().all().all()
    info = json.loads((out / "clusters.json").read_text())
    assert sum(info["sizes"]) == 120 and len(info["keywords"]) == 4
    assert -1 <= info["silhouette"] <= 1
    assert "2 dropped" in r.stdout

    # Same seed, new cache: the same assignment and map, byte for byte.
    out2 = tmp_path / "out2"
    r2 = dtm_cli(
        "disperse",
        "--data",
        data,
        "--k",
        4,
        "--seed",
        7,
        "--out",
        out2,
        cache=tmp_path / "cache2",
    )
    assert r2.returncode == 0, r2.stderr
    assert (out2 / "assignments.csv").read_bytes() == (out / "assignments.csv").read_bytes()

    # The output is never overwritten silently.
    r3 = dtm_cli("disperse", "--data", data, "--k", 3, "--no-map", "--out", out, cache=cache)
    assert r3.returncode == 2 and "already exists" in r3.stderr
    assert (out2 / "assignments.csv").read_bytes() == (out / "assignments.csv").read_bytes()
    assert (
        "reused from the registry: embedding"
        in dtm_cli(
            "disperse",
            "--data",
            data,
            "--k",
            3,
            "--no-map",
            "--force",
            "--out",
            out,
            cache=cache,
        ).stdout
    )


def test_cli_data_check_exit_codes(cache, tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", [alpaca(1), '{"x": 1}'])
    r = dtm_cli("data", "check", good, cache=cache)
    assert r.returncode == 0 and "1 kept, 1 dropped" in r.stdout
    assert "line 2: shape not recognised" in r.stdout
    bad = write_jsonl(tmp_path / "b.jsonl", ['{"x": 1}', "nope"])
    r = dtm_cli("data", "check", bad, cache=cache)
    assert r.returncode == 2 and "no usable row" in r.stderr and str(bad) in r.stderr
    r = dtm_cli("disperse", "--data", bad, "--k", 2, "--out", tmp_path / "o", cache=cache)
    assert r.returncode == 2 and "no usable row" in r.stderr


def test_composition_names_the_top_values_and_counts_the_rest():
    rng = np.random.default_rng(3)
    values = rng.choice([f"s{i:02d}" for i in range(14)] + [""], size=900, p=None)
    labels = rng.choice(3, size=900, p=[0.6, 0.3, 0.1])
    got = cluster.composition(values.tolist(), labels, 3)
    frame = pd.DataFrame({"v": values, "c": labels}).replace({"v": {"": "(none)"}})
    for c in range(3):
        ref = frame[frame["c"] == c]["v"].value_counts()
        ranked = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))
        named = {v: int(n) for v, n in ranked[:10]}
        assert {v: n for v, n in got[c].items() if v != "(other)"} == named
        assert got[c]["(other)"] == sum(n for _, n in ranked[10:]) > 0
        assert sum(got[c].values()) == int((labels == c).sum())
    # fewer values than the top: no "(other)" at all; an empty cluster is empty
    assert cluster.composition(["a", "b", "a"], np.array([0, 0, 0]), 2) == [{"a": 2, "b": 1}, {}]


@pytest.mark.parametrize(
    "counts, noun, says, never",
    [
        (
            [{"arithmetic": 59}, {"fact": 3, "yes_no": 1}],
            "task",
            [
                "By task: cluster 0 holds 59 arithmetic rows and nothing else",
                "cluster 1 is 75% fact (3 of 4)",
                "cluster 0 has no fact or yes_no row",
                "cluster 1 has no arithmetic row.",
            ],
            ["every cluster"],
        ),
        (  # a cluster with "(other)" may hold anything: never said to lack a value
            [{"a": 5, "(other)": 2}, {"b": 1}],
            "source",
            ["cluster 0 is 71% a (5 of 7)", "cluster 1 has no a row."],
            ["cluster 0 has no", "every cluster"],
        ),
        (  # a tie goes to the first name; a random-like split holds everything everywhere
            [{"b": 2, "a": 2}, {"a": 1, "b": 3}, {"a": 1, "b": 1}],
            "source",
            [
                "cluster 0 is 50% a (2 of 4)",
                "cluster 1 is 75% b (3 of 4)",
                "every cluster holds every source.",
            ],
            ["has no", "have no"],
        ),
    ],
)
def test_composition_sentence_says_what_the_counts_say(counts, noun, says, never):
    text = cluster.composition_sentence(counts, noun)
    for part in says:
        assert part in text, text
    for part in never:
        assert part not in text, text


def many_sources(path, n=240, seed=2):
    """Synthetic rows whose ``source`` is one of 14 names (skewed), or empty: more
    sources than clusters.json names per cluster."""
    rng = np.random.default_rng(seed)
    names = [f"src_{i:02d}" for i in range(14)] + [""]
    weights = np.arange(len(names), 0, -1, dtype=float)
    rows = synthetic_instructions(n, seed=seed)
    picks = rng.choice(len(names), size=n, p=weights / weights.sum())
    for r, pick in zip(rows, picks, strict=True):
        r["source"] = names[pick]
    return write_jsonl(path, rows)


def reference(data, csv_path, field="source", ledger=None):
    """Rows per cluster by ``field`` (a Counter each), counted from the data file (or a
    lab's ledger) and assignments.csv, apart from the code."""
    rows = [json.loads(x) for x in Path(ledger or data).read_text().splitlines()]
    value = {r["id"]: (r.get(field) or "(none)") for r in rows}
    csv = pd.read_csv(csv_path, dtype={"id": str})
    k = int(csv["cluster"].max()) + 1
    out = [collections.Counter() for _ in range(k)]
    for rid, c in zip(csv["id"], csv["cluster"], strict=True):
        out[c][value[rid]] += 1
    return out


def assert_counts_match(per_cluster, ref, sizes):
    """clusters.json's counts of each cluster: its 10 largest values exactly, the rest
    as (other), summing to its size."""
    for got, counts, size in zip(per_cluster, ref, sizes, strict=True):
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        assert {v: n for v, n in got.items() if v != "(other)"} == dict(ranked[:10])
        assert got.get("(other)", 0) == sum(n for _, n in ranked[10:])
        assert sum(got.values()) == size == sum(counts.values())


def test_cli_disperse_counts_every_row_by_source(cache, tmp_path):
    """More sources than clusters.json names: each cluster's (other) holds the rest, so
    its counts sum to its size; K=3 k-means (unequal clusters); a file written before
    these counts existed still reads, and the command writes them again."""
    data, out = many_sources(tmp_path / "many.jsonl"), tmp_path / "out"
    args = ["disperse", "--data", data, "--k", 3, "--seed", 5, "--no-map", "--out", out]
    r = dtm_cli(*args, cache=cache)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "clusters.json").read_text())
    ref = reference(data, out / "assignments.csv")
    assert len(set(info["sizes"])) > 1 and len(info["sources"]) == 3
    assert_counts_match(info["sources"], ref, info["sizes"])
    assert all(d["(other)"] > 0 for d in info["sources"]) and "tasks" not in info
    [line] = [x for x in r.stdout.splitlines() if x.startswith("By source: ")]
    check_composition_sentence(line, ref, "source")

    # An assignment cached before: top 10 only, no (other). It reads as a new one.
    cfg = DisperseConfig(data=str(data), k=3, seed=5)
    res = run_disperse(cfg, project=False)
    stored = res.artifacts["assignment"].path / "clusters.json"
    old = json.loads(stored.read_text())
    old["sources"] = [{v: n for v, n in d.items() if v != "(other)"} for d in old["sources"]]
    stored.write_text(json.dumps(old))
    again = run_disperse(cfg, project=False)
    assert again.computed["assignment"] is False
    assert again.clusters["sources"] == info["sources"]
    r = dtm_cli(*args, "--force", cache=cache)
    assert r.returncode == 0 and "reused from the registry: embedding, assignment" in r.stdout
    assert json.loads((out / "clusters.json").read_text())["sources"] == info["sources"]


def test_cli_disperse_counts_a_labs_rows_by_task(cache, tmp_path, lab0):
    """A lab's rows by task, from its ledger, for k-means and random; a stored file
    without ``tasks`` reads with them; the other clustering is found in the registry."""
    data, ledger = lab0 / "data" / "train.jsonl", lab0 / "data" / "train_biases.jsonl"
    infos = {}
    for method in ("kmeans", "random"):
        out = tmp_path / method
        r = dtm_cli("disperse", "--data", data, "--k", 3, "--method", method, "--no-map",
                    "--out", out, cache=cache)  # fmt: skip
        assert r.returncode == 0, r.stderr
        info = infos[method] = json.loads((out / "clusters.json").read_text())
        tasks = reference(data, out / "assignments.csv", "task", ledger=ledger)
        assert_counts_match(info["tasks"], tasks, info["sizes"])
        assert_counts_match(
            info["sources"], reference(data, out / "assignments.csv"), info["sizes"]
        )
        [line] = [x for x in r.stdout.splitlines() if x.startswith("By task: ")]
        check_composition_sentence(line, tasks, "task")
    # Random spreads every task over every cluster; k-means does not keep the shares.
    assert "every cluster holds every task" in cluster.composition_sentence(
        infos["random"]["tasks"], "task"
    )
    assert infos["kmeans"]["tasks"] != infos["random"]["tasks"]

    cfg = DisperseConfig(data=str(data), k=3)
    res = run_disperse(cfg, project=False)
    stored = res.artifacts["assignment"].path / "clusters.json"
    old = json.loads(stored.read_text())
    del old["tasks"]
    stored.write_text(json.dumps(old))
    res = run_disperse(cfg, project=False)
    assert res.clusters["tasks"] == infos["kmeans"]["tasks"]
    assert res.computed["assignment"] is False and "task" in res.table
    beside = other_clustering(res, "random", Registry(cache), compute=False)
    assert beside["tasks"] == infos["random"]["tasks"]
    assert other_clustering(res, "agglomerative", Registry(cache), compute=False) is None
    agglo = other_clustering(res, "agglomerative", Registry(cache))
    assert agglo["method"] == "agglomerative" and agglo["embedding"] == res.clusters["embedding"]
    assert sum(sum(d.values()) for d in agglo["tasks"]) == len(res.table)
