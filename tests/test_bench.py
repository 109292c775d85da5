"""bench/ and studies/ run as modules from the repository root (`python -m bench.NAME`):
no script edits sys.path, and each answers --help. The GPU benchmark (bench.gpu) runs at
its CPU shape, so that it cannot rot while no GPU runs it."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted(
    p for d in ("bench", "studies") for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"
)


def test_bench_and_studies_are_packages():
    assert (ROOT / "bench" / "__init__.py").exists() and (ROOT / "studies" / "__init__.py").exists()
    assert len(SCRIPTS) >= 8


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_runs_as_a_module_without_sys_path_edits(path):
    text = path.read_text()
    assert not re.search(r"sys\.path|PYTHONPATH", text)
    module = f"{path.parent.name}.{path.stem}"
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    if 'if __name__ == "__main__":' in text:  # a script, not a helper module
        assert r.stdout.startswith("usage: ")


NUM = r"(-?\d+(?:\.\d+)?)"
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_benchmark_says_no_gpu_at_the_7b_shape_on_a_cpu():
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=CPU_ONLY,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("no GPU")


def test_gpu_benchmark_prints_every_column_at_the_small_shape():
    """bench.gpu at its CPU shape: the product's group and separate training runs, the
    merge and the quick engine run, and every figure the GPU run reports is a number."""
    from bench.gpu import RUNS, SERIAL

    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--shape", "small", "--peak-tflops", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=CPU_ONLY,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert re.search(rf"rows: 240 rows, tokens per row: mean {NUM}, median {NUM}, p95 {NUM}", out)
    assert re.search(rf"= {NUM} GFLOP per real token; peak 1 TFLOP/s", out)
    for name in [*RUNS, SERIAL]:
        row = re.search(
            rf"^{re.escape(name)} +{NUM} +{NUM}% +{NUM} +{NUM}% +{NUM} +{NUM} +({NUM}|-)( |$)",
            out,
            re.M,
        )
        assert row, f"no row for {name}:\n{out}"
        rate, padding, tflops, mfu, wall, peak, est = (row.group(i) for i in range(1, 8))
        assert float(rate) > 0 and 0 <= float(padding) < 100, row.group(0)
        assert float(tflops) > 0 and float(mfu) > 0 and float(wall) > 0 and float(peak) > 0
        assert name == SERIAL or float(est) > 0, row.group(0)
    for pattern in (
        rf"group vs {SERIAL}: {NUM}x the real tokens/s \(goal >= 1.5x\); wall {NUM} s vs {NUM} s",
        rf"group peak memory vs SFT alone: {NUM}x \(goal <= 1.3x\)",
        rf"group fits in 80 GB: (yes|no) \(peak RSS {NUM} GiB\)",
        rf"on an 80 GB GPU auto would choose .*: estimate {NUM} GiB",
        rf"live update p50 {NUM} ms, p95 {NUM} ms over 5 weight vectors; export .* {NUM} s",
        rf"multiple choice \(24 items, 4 options\): {NUM} items/s \({NUM} s; a first call {NUM}",
    ):
        found = re.search(pattern, out)
        assert found, f"{pattern}\n{out}"
        assert all(float(x) > 0 for x in found.groups() if x and x[0].isdigit()), found.group(0)
