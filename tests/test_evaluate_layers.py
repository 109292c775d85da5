"""The evaluate package's shape: the task table drives the scorers, the package imports
nothing above it, and its light modules load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dtm

PACKAGE = Path(dtm.__file__).parent / "evaluate"
# dtm's units above evaluate/ (layers 3 to 5): evaluate/ never imports them.
HIGHER = (
    "dtm.merge",
    "dtm.jobs",
    "dtm.score",
    "dtm.curate",
    "dtm.controls",
    "dtm.analysis",
    "dtm.experiment",
    "dtm.story",
    "dtm.lab",
    "dtm.cli",
    "dtm.__main__",
    "views",
)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_every_lab_task_names_a_known_scorer():
    from dtm.evaluate.lab import SCORERS
    from dtm.tasks import LAB_TASKS

    assert {t.scorer for t in LAB_TASKS} <= set(SCORERS)


def test_evaluate_imports_no_higher_layer():
    for path in sorted(PACKAGE.glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(HIGHER)]
        assert not bad, f"{path.name} imports {bad}"


def test_scoring_imports_nothing_of_dtm_above_the_bottom_layer():
    assert not [m for m in _imports(PACKAGE / "scoring.py") if m.startswith("dtm")]


def test_the_light_modules_load_without_torch():
    code = (
        "import sys; import dtm.evaluate.user, dtm.evaluate.harness, dtm.evaluate.checks; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
