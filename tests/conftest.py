import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["DTM_LAB_AUTOBUILD"] = "0"  # tests build labs explicitly, never in the background


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty DTM_CACHE for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DTM_CACHE", str(root))
    return root


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def alpaca(i: int, text: str | None = None) -> dict:
    return {
        "id": f"a{i}",
        "instruction": text or f"Instruction number {i}",
        "input": "",
        "output": f"Response {i}",
    }


def dtm_cli(*args, cache: Path | None = None, timeout: int = 600):
    """Run ``python -m dtm ARGS`` as a real subprocess (offline, optionally in ``cache``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["DTM_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "dtm", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def lab0(tmp_path_factory):
    """One small lab (seed 0) for the whole session: a real tiny Llama, data, benchmarks."""
    from dtm.lab.build import build_lab

    out = tmp_path_factory.mktemp("lab0") / "lab"
    build_lab(out, seed=0, size="small")
    return out


def round_robin_assignment(lab: Path, path: Path, k: int = 2) -> Path:
    """An assignments.csv putting the lab's training rows into k clusters in turn."""
    ids = [json.loads(x)["id"] for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
    path.write_text("id,cluster\n" + "".join(f"{i},{n % k}\n" for n, i in enumerate(ids)))
    return path


def tiny_train(lab: Path, out, **kw):
    """A TrainConfig of a few steps on the lab, fast on a CPU."""
    from dtm.train import TrainConfig

    values = {
        "base": str(lab / "model"),
        "data": str(lab / "data" / "train.jsonl"),
        "val_data": str(lab / "data" / "val.jsonl"),
        "out": str(out),
        "steps": 4,
        "log_every": 2,
        "lr": 1e-3,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_length": 96,
        "probe_size": 16,
        "fisher_size": 8,
        "reference_size": 16,
        "members": 2,
    }
    values.update(kw)
    return TrainConfig(**values)
