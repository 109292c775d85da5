"""Scoring one model into a results file (``python -m dtm eval``), and the two input
checks the merge search shares with it.

- ``model_and_lab`` (``dtm.models``): ``--model lab`` names the default lab's base model,
  and a lab's ``model/`` folder brings its benchmarks along;
- ``check_results_file(out)``: an existing ``out`` is replaced only when it is a results
  file as ``score_to_file`` writes it;
- ``score_to_file(...)``: every check before any model loads, then the model loaded,
  scored, written to ``out`` (``{task: {metric: number}}``) and recorded in the registry.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtm.errors import ConfigError
from dtm.evaluate.harness import check_code_opt_in
from dtm.models import model_and_lab  # noqa: F401  (the --model and --lab rule)
from dtm.score import ModelRef, load_model, record
from dtm.store import write_json_atomic
from dtm.tasks.files import folder_tasks


def check_results_file(out: Path) -> None:
    """An existing ``--out`` is replaced only when it is a results file as ``dtm eval``
    writes it (``{task: {metric: number}}``); anything else (a hand-edited or foreign
    file) is reported and left as it is."""
    if not out.exists():
        return
    keep = "it was left as it is: move it aside or choose another --out."
    try:
        data = json.loads(out.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--out {out}: exists and is not UTF-8 text ({e.reason}); {keep}"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--out {out}: exists and is not a results file (not valid JSON: {e.msg} at line "
            f"{e.lineno} column {e.colno}); {keep}"
        ) from None
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot read it ({e.strerror}); {keep}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--out {out}: exists and is not a results file (a JSON {type(data).__name__}, "
            f"not {{task: {{metric: value}}}}); {keep}"
        )
    for task, metrics in data.items():
        if not isinstance(metrics, dict):
            raise ConfigError(
                f"--out {out}: exists and is not a results file ({task!r} holds a "
                f"{type(metrics).__name__}, not {{metric: value}}); {keep}"
            )
        for metric, value in metrics.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ConfigError(
                    f"--out {out}: exists and is not a results file ({task}.{metric} is "
                    f"{value!r}, not a number); {keep}"
                )


def _check_inputs(tasks, out, engine, tasks_dir, heldout, limit, allow_code) -> None:
    """Every input checked before a model loads (each error names its flag)."""
    from dtm.evaluate import check_heldout, known_tasks  # lazy: torch

    if engine == "quick":
        unknown = [t for t in tasks if t not in known_tasks(tasks_dir)]
        if unknown:
            raise ConfigError(
                f"unknown task(s) {', '.join(unknown)}; `python -m dtm eval --list-tasks` "
                "prints the known ones."
            )
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1.")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as results.json.")
    check_results_file(out)
    check_code_opt_in(tasks, allow_code)
    check_heldout(heldout)
    if tasks_dir:
        folder_tasks(tasks_dir)  # a malformed task file: exit 2 before any model loads


def score_to_file(
    model: str,
    tasks: list[str],
    out: str | Path,
    *,
    adapters: list[str] = (),
    engine: str = "quick",
    lab: str | None = None,
    default_lab: str | Path | None = None,
    tasks_dir: str | None = None,
    heldout: list[str] = (),
    limit: int | None = None,
    batch_size: int | None = None,
    allow_code: bool = False,
    seed: int = 0,
    label: str = "",
    group: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Score ``model`` (with ``adapters``: one, or several merged by their average) on
    ``tasks`` and the ``heldout`` files; write ``out`` and record the scores. The
    results, ``{task: {metric: value}}``."""
    from dtm.evaluate import evaluate  # lazy: torch

    out = Path(out)
    _check_inputs(tasks, out, engine, tasks_dir, list(heldout), limit, allow_code)
    base, lab = model_and_lab(model, lab, default_lab)
    ref = ModelRef(base=base, adapters=list(adapters), label=label, group=group, seed=seed)
    if len(ref.adapters) > 1:
        ref.recipe = {"method": "average", "weights": None, "params": {}}
    loaded, tok = load_model(ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    results = evaluate(
        loaded,
        tok,
        tasks,
        engine=engine,
        lab=lab,
        tasks_dir=tasks_dir,
        heldout=list(heldout),
        limit=limit,
        batch_size=batch_size,
        allow_code=allow_code,
        seed=seed,
    )
    write_json_atomic(out, results)
    record(ref, results, engine=engine, limit=limit)
    return results
