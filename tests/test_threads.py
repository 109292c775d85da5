"""Compute threads shared between processes (``dtm.threads``): real processes claim their
share of the cores, take it again as others come and go, and the count does not change
the numbers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from conftest import ROOT

from dtm.threads import cores, share

# A process that claims, reports its threads, waits for a file, rebalances, reports again.
CLAIMER = """
import sys, time, torch
from pathlib import Path
from dtm import threads
print(threads.claim("test"), flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
time.sleep(2.1)  # past the rebalance interval
threads.rebalance()
print(torch.get_num_threads(), flush=True)
"""


def test_share_by_hand():
    assert share(1, 8) == 8 and share(2, 8) == 4 and share(3, 8) == 2 and share(9, 8) == 1
    assert share(0, 2) == 2


def _start(tmp_path, env, go):
    return subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(go)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_processes_take_their_share_and_take_it_again(tmp_path):
    env = {**os.environ, "DTM_CPU_DIR": str(tmp_path / "cpu")}
    env.pop("DTM_THREADS", None)
    go_a, go_b = tmp_path / "go-a", tmp_path / "go-b"
    a = _start(tmp_path, env, go_a)
    assert int(a.stdout.readline()) == cores()  # alone: every core
    b = _start(tmp_path, env, go_b)
    assert int(b.stdout.readline()) == share(2)  # two registered
    go_a.touch()
    assert int(a.stdout.readline()) == share(2)  # A took its share again
    assert a.wait(timeout=60) == 0
    time.sleep(0.1)
    go_b.touch()
    assert int(b.stdout.readline()) == cores()  # A ended: B has every core again
    assert b.wait(timeout=60) == 0
    assert list((tmp_path / "cpu").iterdir()) == []  # each removed its entry


def test_a_fixed_count_and_the_lab_is_the_same_with_1_thread_and_2(tmp_path):
    digests = {}
    for n in ("1", "2"):
        env = {**os.environ, "DTM_THREADS": n, "DTM_CPU_DIR": str(tmp_path / "cpu")}
        out = tmp_path / f"lab{n}"
        r = subprocess.run(
            [sys.executable, "-m", "dtm", "lab", "build", "--size", "small", "--steps", "60",
             "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        digests[n] = hashlib.sha256((out / "model" / "model.safetensors").read_bytes()).digest()
    assert digests["1"] == digests["2"]


def test_a_claim_before_torch_loads_is_the_count_torch_starts_with(tmp_path):
    env = {**os.environ, "DTM_CPU_DIR": str(tmp_path / "cpu"), "OMP_NUM_THREADS": "7"}
    env.pop("DTM_THREADS", None)
    code = (
        "import sys\nfrom dtm import threads\nn = threads.claim('test')\n"
        "assert 'torch' not in sys.modules\nimport torch\nprint(n, torch.get_num_threads())"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(cores()), str(cores())]  # alone: every core, not 7
