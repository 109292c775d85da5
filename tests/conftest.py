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
