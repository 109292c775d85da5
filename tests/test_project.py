"""Project rules a user and CI depend on: the library stays UI-free, lint stays clean."""

import re
import shutil
import subprocess
import sys

from conftest import ROOT


def test_library_never_imports_streamlit():
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "dtm").rglob("*.py")
        if re.search(r"^\s*(import|from)\s+streamlit", p.read_text(), re.M)
    ]
    assert offenders == []


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        ruff_cmd = [sys.executable, "-m", "ruff"]
    else:
        ruff_cmd = [ruff]
    r = subprocess.run(
        [*ruff_cmd, "check", "dtm", "views", "app.py", "tests", "bench", "studies"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_cache_is_ignored_but_kept():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "cache/*" in ignore and "!cache/.gitkeep" in ignore
    assert (ROOT / "cache" / ".gitkeep").exists()
