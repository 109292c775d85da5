"""The run registry: reuse by input hash, atomic publication, clear errors, safe names."""

import sqlite3

import pytest

from dtm.errors import RegistryError
from dtm.store import Registry, atomic_path, safe_name, save_upload


def test_produce_runs_once_per_inputs(cache):
    reg = Registry()
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "x.txt").write_text("hello")
        return {"n": 1}

    a, new_a = reg.produce("thing", {"p": 1}, build)
    b, new_b = Registry().produce("thing", {"p": 1}, build)  # a new handle, same file
    c, new_c = reg.produce("thing", {"p": 2}, build)
    assert (new_a, new_b, new_c) == (True, False, True) and len(calls) == 2
    assert a.key == b.key != c.key and (b.path / "x.txt").read_text() == "hello"
    assert b.meta == {"n": 1} and b.inputs == {"p": 1}
    assert [x.key for x in reg.list("thing")] == [c.key, a.key]
    assert (cache / "registry.sqlite").exists()
    mode = sqlite3.connect(cache / "registry.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_failed_build_publishes_nothing_and_is_retried(cache):
    reg = Registry()

    def crash(folder):
        (folder / "half.bin").write_bytes(b"x" * 10)
        raise OSError("disk full")

    with pytest.raises(OSError):
        reg.produce("thing", {"p": 1}, crash)
    assert reg.list("thing") == [] and not list((cache / "thing").iterdir())
    art, computed = reg.produce("thing", {"p": 1}, lambda f: {})
    assert computed and reg.get("thing", art.key) is not None


def test_artifact_with_missing_folder_is_not_trusted(cache):
    import shutil

    reg = Registry()
    art, _ = reg.produce("thing", {"p": 1}, lambda f: {})
    shutil.rmtree(art.path)
    assert reg.get("thing", art.key) is None
    _, computed = reg.produce("thing", {"p": 1}, lambda f: {})
    assert computed


@pytest.mark.fault
def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.security
def test_safe_names_stay_inside_their_folder(cache):
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..") == "file" and safe_name(".hidden") == "hidden"
    assert safe_name("my data (v2).jsonl") == "my_data_v2_.jsonl"
    p = save_upload("../../evil.jsonl", b"{}")
    assert p.resolve().is_relative_to((cache / "uploads").resolve())
    with pytest.raises(RegistryError, match="over the upload limit"):
        save_upload("big.jsonl", b"x" * 100, max_bytes=10)


def test_a_schema_3_registry_gains_the_kind_and_clustering_columns_in_place(tmp_path):
    import sqlite3

    import pandas as pd

    from dtm.score import ModelRef, record, scores

    db = tmp_path / "registry.sqlite"
    con = sqlite3.connect(db)  # the schema 3 tables, as an older dtm wrote them
    con.executescript(
        "CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, model_key TEXT NOT NULL,"
        " model TEXT NOT NULL, label TEXT, grp TEXT, task TEXT NOT NULL, metric TEXT NOT NULL,"
        " value REAL, stderr REAL, n INTEGER, seed INTEGER, engine TEXT NOT NULL, lim INTEGER,"
        " created REAL NOT NULL);"
        "INSERT INTO results (model_key, model, label, grp, task, metric, value, engine, created)"
        " VALUES ('k', '{\"base\": \"b\"}', 'old', 'g', 't', 'acc', 0.5, 'quick', 1.0);"
        "PRAGMA user_version = 3;"
    )
    con.close()
    reg = Registry(tmp_path)
    with reg._connect() as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 6
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        cols = {r[1] for r in c.execute("PRAGMA table_info(results)")}
        job_cols = {r[1] for r in c.execute("PRAGMA table_info(jobs)")}
    assert {"kind", "clustering"} <= cols and {"clustering", "parent"} <= job_cols
    assert "merges" in tables
    record(
        ModelRef(base="b", label="new", group="g", kind="merge", clustering="kmeans"),
        {"t": {"acc": 0.75}},
        engine="quick",
        registry=reg,
    )
    table = scores(group="g", registry=reg).set_index("label")
    assert table.loc["old", "value"] == 0.5 and pd.isna(table.loc["old", "kind"])
    assert (table.loc["new", "kind"], table.loc["new", "clustering"]) == ("merge", "kmeans")
