"""What a merge is scored on, for the live score, the landscape and the weight search:
lab tasks, a tasks folder's tasks and held-out losses, in any mix, on any model.

``Objective(...).score(model, tokenizer)`` -> ``{label: value}``:
- a lab task: its short label (``knowledge``) and its ``acc``;
- a folder task: its name and its headline (``acc``; ``exact_match`` for
  ``generate_until``); a rolling log-likelihood task: ``<name>:bits_per_byte``;
- a held-out source: ``heldout:<name>`` and its mean response-token loss.

``Objective.value(scores)`` is the scalar the search maximises: the (weighted) mean of the
labels' values, where a loss or bits per byte enters with its sign flipped (lower is
better). Each source is read and tokenised once, on first use, and kept.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dtm.baselines import default_reference
from dtm.errors import ConfigError
from dtm.evaluate.harness import flatten_user
from dtm.evaluate.user import build_task, quick_evaluate
from dtm.merge.sources import run_dir_of
from dtm.models import model_and_lab
from dtm.tasks import BY_NAME, PROBES, SHORT, TASKS
from dtm.tasks.files import folder_tasks


def lower_is_better(label: str) -> bool:
    return label.startswith("heldout:") or label.endswith(":bits_per_byte")


@dataclass
class Objective:
    lab: str | None = None  # the lab folder whose benchmarks lab tasks read
    lab_tasks: tuple[str, ...] = ()  # lab task names (lab_knowledge, ...)
    tasks_dir: str | None = None
    tasks: tuple[str, ...] = ()  # task names of tasks_dir
    heldout: tuple = ()  # files, or (name, data table) pairs
    limit: int | None = 40  # items per task, rows per held-out source
    weights: dict[str, float] | None = None  # a weighted sum; None: the plain mean
    _rows: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )  # tokenizer -> {(label, file stamp): encoded rows}

    def __post_init__(self) -> None:
        self.lab_tasks = tuple(self.lab_tasks)
        self.tasks = tuple(self.tasks)
        self.heldout = tuple(self.heldout)
        bad = [t for t in self.lab_tasks if t not in TASKS + PROBES]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: not lab tasks.")
        if self.lab_tasks and not (self.lab and (Path(self.lab) / "benchmarks").is_dir()):
            raise ConfigError(
                f"{', '.join(self.lab_tasks)} are the lab's tasks, and these models have no "
                "lab (a lab task is offered only for a lab model)."
            )
        if self.tasks:
            if not self.tasks_dir:
                raise ConfigError(f"{', '.join(self.tasks)}: give the --tasks-dir they are in.")
            found = folder_tasks(self.tasks_dir)
            missing = [t for t in self.tasks if t not in found]
            if missing:
                raise ConfigError(
                    f"{', '.join(missing)}: no such task in {self.tasks_dir} "
                    f"(it has {', '.join(found) or 'none'})."
                )
            self._files = found
        if not (self.lab_tasks or self.tasks or self.heldout):
            raise ConfigError("nothing to score: choose tasks or held-out data.")
        labels = self.labels()
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ConfigError(
                f"{', '.join(twice)}: two of the chosen scores share this name (a folder task "
                "named like a lab task's label, or two held-out files with one stem)."
            )
        if self.weights:
            unknown = set(self.weights) - set(self.labels())
            if unknown:
                raise ConfigError(
                    f"objective weights name {', '.join(sorted(unknown))}, which are not "
                    f"scored (the labels are {', '.join(self.labels())})."
                )

    # -- labels

    def _heldout_items(self) -> list[tuple[str, object]]:
        from dtm.evaluate.heldout import result_key  # lazy: torch

        out = []
        for h in self.heldout:
            if isinstance(h, tuple):
                out.append((f"heldout:{h[0]}", h[1]))
            else:
                out.append((result_key(h), h))
        return out

    def _user_label(self, name: str) -> str:
        task = self._task(name)
        return f"{name}:bits_per_byte" if task.OUTPUT_TYPE == "loglikelihood_rolling" else name

    def labels(self) -> list[str]:
        return (
            [SHORT[t] for t in self.lab_tasks]
            + [self._user_label(t) for t in self.tasks]
            + [k for k, _ in self._heldout_items()]
        )

    def _task(self, name: str):
        return build_task(self._files[name])  # cached by the files' modification times

    # -- scoring

    def score(self, model, tokenizer) -> dict[str, float]:
        from dtm.evaluate import evaluate_lab  # lazy: torch
        from dtm.evaluate.heldout import encode_source, rows_loss  # lazy: torch

        out: dict[str, float] = {}
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            if self.lab_tasks:
                res = evaluate_lab(
                    model,
                    tokenizer,
                    Path(self.lab) / "benchmarks",
                    self.lab_tasks,
                    limit=self.limit,
                )
                for t in self.lab_tasks:
                    metric = BY_NAME[t].headline[0][0]
                    out[SHORT[t]] = float(res[t][metric])
            if self.tasks:
                built = {t: self._task(t) for t in self.tasks}
                raw = quick_evaluate(model, tokenizer, built, limit=self.limit, bootstrap_iters=0)
                for t in self.tasks:
                    flat = flatten_user(raw[t], built[t].OUTPUT_TYPE)
                    label = self._user_label(t)
                    value = flat.get("bits_per_byte") if label != t else flat.get("acc")
                    if value is None:
                        raise ConfigError(f"task {t}: it reports no headline metric to score.")
                    out[label] = float(value)
            pad = tokenizer.pad_token_id
            pad = tokenizer.eos_token_id if pad is None else pad
            mine = self._rows.setdefault(tokenizer, {})
            for label, src in self._heldout_items():
                stamp = Path(src).stat().st_mtime_ns if isinstance(src, (str, Path)) else None
                key = (label, stamp)
                if key not in mine:
                    mine[key] = encode_source(src, tokenizer, limit=self.limit)
                out[label] = rows_loss(model, mine[key], pad)["loss"]
        finally:
            model.train(was_training)
        return out

    def value(self, scores: dict[str, float]) -> float:
        """The scalar to maximise: the mean (or the weighted sum, when ``weights`` are
        given) of the scores, a loss or bits per byte counted as its negative."""
        signed = {k: (-v if lower_is_better(k) else v) for k, v in scores.items()}
        if self.weights:
            return float(sum(w * signed[k] for k, w in self.weights.items()))
        return float(sum(signed.values()) / len(signed))


def merge_objective(
    base: str,
    k: int,
    *,
    cocktail: bool = False,
    tasks: list[str] = (),
    tasks_dir: str | None = None,
    heldout: list[str] = (),
    lab: str | None = None,
    limit: int | None = 40,
    budget: int | None = 40,
    temperature: float = 5.0,
    default_lab: str | Path | None = None,
) -> Objective:
    """The objective of ``dtm merge --search`` (or ``--cocktail``) over ``k`` adapters of
    ``base``: lab ``tasks``, ``tasks_dir``'s tasks and ``heldout`` losses; every input is
    checked (each error names its flag) before any model loads. ``default_lab``: the
    folder of the default lab, whose benchmarks score lab tasks when ``lab`` is None."""
    from dtm.evaluate import check_heldout  # lazy: torch

    tasks = list(tasks)
    if cocktail:
        if not heldout or tasks:
            raise ConfigError(
                "--cocktail weighs each adapter by its held-out loss: give --heldout FILE "
                "(and no --tasks)."
            )
    elif not tasks and not heldout:
        raise ConfigError("--search: give --tasks (and --tasks-dir) and/or --heldout FILE.")
    user = folder_tasks(tasks_dir) if tasks_dir else {}
    mine = [t for t in tasks if t in user]
    lab_tasks = [t for t in tasks if t not in user and t in TASKS + PROBES]
    unknown = [t for t in tasks if t not in user and t not in lab_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks {', '.join(unknown)}: the search scores with the quick engine: a lab "
            f"task or a task of --tasks-dir{f' {tasks_dir}' if tasks_dir else ''}."
        )
    _, lab = model_and_lab(base, lab, default_lab) if lab_tasks else (None, None)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1.")
    if cocktail and not temperature > 0:
        raise ConfigError(f"--temperature {temperature}: must be above 0.")
    check_heldout(list(heldout))
    if not cocktail and budget is not None and budget < k + 1:
        raise ConfigError(
            f"--budget {budget}: needs at least {k + 1} evaluations (the uniform point "
            f"and the {k} vertices come first)."
        )
    return Objective(
        lab=lab,
        lab_tasks=tuple(lab_tasks),
        tasks_dir=tasks_dir,
        tasks=tuple(mine),
        heldout=tuple(heldout),
        limit=limit,
    )


def lab_objective(lab: str | None, tasks: dict[str, str], limit: int = 40) -> Objective:
    """The Merge page's default on the lab: ``tasks`` as ``{short: task name}``."""
    return Objective(lab=lab, lab_tasks=tuple(tasks.values()), limit=limit)


def heldout_tables(runs: list[tuple[str, Path]]) -> list[tuple[str, pd.DataFrame]]:
    """``(name, validation rows)`` of each training run folder: a sub-model's run holds
    its own cluster's held-out rows."""
    from dtm.evaluate.heldout import run_heldout_rows  # lazy: torch

    return [(name, run_heldout_rows(run)) for name, run in runs]


def heldout_options(source) -> dict[str, object]:
    """The held-out sources a merge source offers, ``{label: file or data table}``:
    each sub-model's own held-out rows (its run's validation split), the validation file
    the runs were given, and the reference corpus (the lab's pretraining text, or the
    runs' ``reference``), as far as the runs' folders tell."""
    out: dict[str, object] = {}
    runs = [(name, run_dir_of(p)) for name, p in source.subs]
    configs = []
    for _, run in runs:
        if run is not None:
            try:
                configs.append(json.loads((run / "config.json").read_text()))
            except (OSError, ValueError):
                pass
    if runs and all(r is not None for _, r in runs):
        # hashable, for the page's caches: (name, run folder) pairs
        out["each sub-model's held-out rows"] = ("clusters", tuple((n, str(r)) for n, r in runs))
    vals = {c.get("val_data") for c in configs if c.get("val_data")}
    if len(vals) == 1:
        out["validation split"] = vals.pop()
    refs = {c.get("reference") for c in configs if c.get("reference")}
    ref = refs.pop() if len(refs) == 1 else default_reference(source.base)
    if ref:
        out["reference corpus"] = ref
    return out


def expand_heldout(choice) -> list:
    """Objective ``heldout`` entries of one ``heldout_options`` value: a file, or one
    ``(name, rows)`` pair per sub-model for the clusters' held-out rows."""
    if isinstance(choice, tuple) and choice and choice[0] == "clusters":
        return heldout_tables([(n, Path(r)) for n, r in choice[1]])
    return [choice]


def objective_from_choices(
    lab: str | None,
    lab_tasks: tuple = (),
    tasks_dir: str | None = None,
    tasks: tuple = (),
    heldout: tuple = (),
    limit: int | None = 40,
) -> Objective:
    """The Merge page's objective: ``heldout`` holds ``heldout_options`` values (each
    expanded by ``expand_heldout``) or files."""
    entries = [entry for choice in heldout for entry in expand_heldout(choice)]
    return Objective(
        lab=lab,
        lab_tasks=lab_tasks,
        tasks_dir=tasks_dir,
        tasks=tasks,
        heldout=tuple(entries),
        limit=limit,
    )
