"""One interface over both engines: ``evaluate(model, tokenizer, tasks, engine=..., lab=...)``.

- ``quick``: in process, batched: the lab's tasks (``dtm.evaluate.lab``) and a tasks
  folder's (``dtm.evaluate.user``).
- ``full``: lm-evaluation-harness (``dtm.evaluate.harness``): the lab's task configs, a
  tasks folder's and the paper's benchmarks. On the lab's tasks the two give the same
  accuracies (a test checks it).

Held-out files add their mean loss (``dtm.evaluate.heldout``). ``known_tasks`` lists the
task names this tool knows; ``check_heldout`` checks held-out files before any model
loads.
"""

from __future__ import annotations

from pathlib import Path

from dtm.errors import ConfigError
from dtm.evaluate.harness import PAPER_TASKS, check_code_opt_in, flatten_user, run_harness
from dtm.evaluate.heldout import heldout_loss, result_key
from dtm.evaluate.lab import evaluate_lab
from dtm.evaluate.user import build_task, folder_tasks, quick_evaluate
from dtm.tasks import PROBES, TASKS

ENGINES = ("quick", "full")


def known_tasks(tasks_dir: str | Path | None = None) -> list[str]:
    """The task names this tool knows: the lab's first, then a ``tasks_dir``'s, then the
    paper's benchmarks (any other lm-evaluation-harness task works with the full engine)."""
    user = list(folder_tasks(tasks_dir)) if tasks_dir else []
    return [*TASKS, *PROBES, *user, *[t for t in PAPER_TASKS if t not in user]]


def check_heldout(paths) -> None:
    """Held-out files that exist and whose result names (``heldout:<stem>``) differ,
    checked before any model loads."""
    seen: dict[str, str] = {}
    for p in paths:
        if not isinstance(p, (str, Path)):
            continue
        if not Path(p).expanduser().is_file():
            raise ConfigError(f"--heldout {p}: no such file.")
        key = result_key(p)
        if key in seen:
            raise ConfigError(
                f"--heldout {p}: its result name {key} is also that of {seen[key]}; rename one."
            )
        seen[key] = str(p)


def _bench_dir(lab: str | Path | None, lab_tasks: list[str]) -> Path | None:
    """The benchmarks folder the lab's tasks read (None when none is asked for)."""
    if not lab_tasks:
        return None
    if lab is None or not (Path(lab) / "benchmarks").is_dir():
        raise ConfigError(
            f"{', '.join(lab_tasks)} are the lab's tasks: build the lab first "
            "(`python -m dtm lab build --out LAB`, or open the dashboard) or name it with "
            f"--lab{f' (no benchmarks/ in {lab})' if lab else ''}."
        )
    return Path(lab) / "benchmarks"


def _quick_user(model, tokenizer, prepared: dict, limit, seed, batch_size) -> dict:
    """A tasks folder's tasks on the quick engine, flattened as the full engine's."""
    was_training = model.training
    model.eval()
    try:
        raw = quick_evaluate(
            model,
            tokenizer,
            prepared,
            limit=limit,
            seed=seed,
            **({"batch_size": batch_size} if batch_size else {}),
        )
    finally:
        model.train(was_training)
    out = {}
    for t, task in prepared.items():
        flat = flatten_user(raw[t], task.OUTPUT_TYPE)
        flat["n"] = raw[t]["_n"]
        out[t] = flat
    return out


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    engine: str = "quick",
    lab: str | Path | None = None,
    tasks_dir: str | Path | None = None,
    heldout: list[str | Path] | tuple = (),
    limit: int | None = None,
    batch_size: int | None = None,
    allow_code: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``tasks``: ``{task: {metric: value, ..., "n": items}}``.

    - ``lab``: the lab folder whose benchmarks the ``lab_*`` tasks read.
    - ``tasks_dir``: a folder of lm-evaluation-harness task YAMLs
      (``dtm.evaluate.user``); its task names win over the lab's and the harness's.
    - ``heldout``: files whose mean response-token loss is added under
      ``heldout:<stem>`` as ``{"loss", "tokens"}`` (``dtm.evaluate.heldout``), over every
      row of each file (``limit`` is items per task).
    - ``batch_size``: the full engine's (default 64, the harness's) and the quick
      engine's on a tasks folder (default 256).

    The quick engine scores the lab's tasks and a ``tasks_dir``'s in process; ``full``
    runs every task through lm-evaluation-harness but the ``lab_bias`` probe, which has no
    harness config and is always scored here."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose quick or full.")
    if not tasks and not heldout:
        raise ConfigError("no tasks given.")
    check_heldout(heldout)
    user = folder_tasks(tasks_dir) if tasks_dir else {}
    lab_tasks = [t for t in tasks if t in TASKS + PROBES and t not in user]
    mine = [t for t in tasks if t in user]
    other = [t for t in tasks if t not in lab_tasks and t not in mine]
    check_code_opt_in(other, allow_code)
    bench = _bench_dir(lab, lab_tasks)
    if engine == "quick" and other:
        where = f" (not in --tasks-dir {tasks_dir})" if tasks_dir else ""
        raise ConfigError(
            f"the quick engine scores the lab's tasks and a --tasks-dir's only; "
            f"{', '.join(other)}{where}: run with --engine full (lm-evaluation-harness) or "
            "add a task file for it to --tasks-dir."
        )
    prepared = {t: build_task(user[t]) for t in mine}
    results: dict[str, dict[str, float]] = {}
    via_harness = [t for t in tasks if t in mine or t not in PROBES] if engine == "full" else []
    here = [t for t in lab_tasks if t not in via_harness]
    if via_harness:
        results.update(
            run_harness(
                model,
                tokenizer,
                via_harness,
                include_path=bench,
                limit=limit,
                batch_size=batch_size or 64,
                allow_code=allow_code,
                seed=seed,
                prepared={t: prepared[t] for t in via_harness if t in prepared},
            )
        )
    if here:
        results.update(evaluate_lab(model, tokenizer, bench, tuple(here), limit=limit))
    if engine == "quick" and mine:
        results.update(_quick_user(model, tokenizer, prepared, limit, seed, batch_size))
    out = {t: results[t] for t in tasks}
    for path in heldout:
        res = heldout_loss(model, tokenizer, path)
        out[result_key(path)] = {"loss": res["loss"], "tokens": res["tokens"]}
    return out
