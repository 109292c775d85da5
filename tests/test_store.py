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
