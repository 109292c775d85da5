"""Faults on the way to saving: a full disk (a real, small tmpfs filled by the test) gives
a clear error, and what was saved before is left exactly as it was."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import uuid

import pytest
from conftest import dtm_cli

from dtm.samples import SAMPLE_PATH

pytestmark = pytest.mark.fault


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (the test needs root, as CI has; otherwise it skips)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk) -> None:
    """Write zeros until the file system says it is full."""
    with open(disk / f"filler-{uuid.uuid4().hex[:6]}", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def digests(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith("filler")
    }


def test_disk_full_while_saving_a_dispersal_keeps_the_previous_one(cache, small_disk):
    out = small_disk / "k4"
    args = ["disperse", "--data", SAMPLE_PATH, "--k", 4, "--method", "random", "--no-map"]
    first = dtm_cli(*args, "--out", out, cache=cache)
    assert first.returncode == 0, first.stderr
    before = digests(out)
    assert set(before) == {"assignments.csv", "clusters.json"}
    fill(small_disk)
    again = dtm_cli(*args[:4], 3, *args[5:], "--out", out, "--force", cache=cache)
    assert again.returncode == 2, again.stderr
    assert "the disk is full" in again.stderr and str(out) in again.stderr
    assert "the previous assignments.csv is unchanged" in again.stderr
    assert "Traceback" not in again.stderr
    assert digests(out) == before  # no partial file, no temporary left behind


def test_disk_full_while_saving_scores_keeps_the_previous_results(lab0, cache, small_disk):
    out = small_disk / "results.json"
    args = ["eval", "--model", lab0 / "model", "--tasks", "lab_knowledge", "--limit", 8]
    first = dtm_cli(*args, "--out", out, cache=cache)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    fill(small_disk)
    again = dtm_cli(*args[:-1], 16, "--out", out, cache=cache)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert "the disk is full" in again.stderr and "results.json is unchanged" in again.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("filler")) == [
        "results.json"
    ]


def test_disk_full_in_the_cache_fails_the_artifact_cleanly(cache, tmp_path, small_disk):
    """The cache itself on the full disk: the registry and earlier artifacts survive, and a
    later run with room finishes the work."""
    disk_cache = small_disk / "cache"
    args = ["disperse", "--data", SAMPLE_PATH, "--k", 2, "--method", "random", "--no-map"]
    first = dtm_cli(*args, "--out", tmp_path / "a", cache=disk_cache)
    assert first.returncode == 0, first.stderr
    db = disk_cache / "registry.sqlite"
    rows = dtm_cli("jobs", "list", cache=disk_cache)
    assert rows.returncode == 0
    fill(small_disk)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(SAMPLE_PATH.read_text().splitlines(True)[:300]))
    full = dtm_cli(
        "disperse", "--data", other, "--k", 2, "--no-map", "--out", tmp_path / "b", cache=disk_cache
    )
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "the disk is full" in full.stderr and "unchanged" in full.stderr
    assert not list(disk_cache.rglob(".tmp-*"))  # no half-written artifact folder
    for p in small_disk.glob("filler-*"):
        p.unlink()
    assert db.exists()
    redo = dtm_cli(
        "disperse", "--data", other, "--k", 2, "--no-map", "--out", tmp_path / "b", cache=disk_cache
    )
    assert redo.returncode == 0, redo.stderr
    again = dtm_cli(*args, "--out", tmp_path / "c", cache=disk_cache)  # the first is reused
    assert again.returncode == 0 and "reused" in again.stdout, again.stdout
