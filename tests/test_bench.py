"""bench/ and studies/ run as modules from the repository root (`python -m bench.NAME`):
no script edits sys.path, and each answers --help."""

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
