"""Disperse: clusterers, determinism, keywords, registry reuse, and the CLI contract."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import alpaca, dtm_cli, write_jsonl

from dtm import cluster
from dtm.disperse import DisperseConfig, run_disperse
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
