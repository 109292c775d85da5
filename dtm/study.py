"""An experiment's last two stages, merge and evaluate, its results table, and the
progress file the Home page follows.

``evaluate_experiment(exp, jobs)`` scores, for each seed: the base model, vanilla SFT,
the shrinkage control (the SFT delta scaled by 1/K), DTM for each clustering and each
merge method (the K sub-models merged in memory, exactly), every sub-model alone and
every baseline. Scores go to the registry (group = the experiment's name) and to
``<cache>/experiments/<name>/results.json``; models already scored with the same
engine and limit are not scored again. ``results_markdown`` makes the table: mean ±
std over seeds of every lab benchmark, the loss-reduction ratio at the end of SFT, and
wall times.

``Progress`` writes ``status.json`` beside them: the stage (lab, disperse, train, merge,
evaluate), each stage's fraction, and the process id, so a page can follow a run that
another process does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from dtm.store import cache_dir, safe_name, write_json_atomic

STAGES = ("lab", "disperse", "train", "merge", "evaluate")
# The results table's columns: (task, metric, heading).
COLUMNS = [
    ("lab_knowledge", "acc", "knowledge"),
    ("lab_knowledge", "acc_unseen", "knowledge (unseen)"),
    ("lab_reasoning", "acc", "reasoning"),
    ("lab_reading", "acc", "reading"),
    ("lab_truthful", "acc", "truthful"),
    ("lab_instruct", "acc", "instruct"),
    ("lab_bias", "chat_acc", "chat acc"),
    ("lab_bias", "format", "format"),
    ("lab_bias", "favourite_rate", "favourite"),
    ("lab_bias", "prefix_rate", "prefix"),
    ("lab_bias", "filler_rate", "filler"),
    ("lab_bias", "rare_code_rate", "rare code"),
]


def experiment_dir(name: str) -> Path:
    return cache_dir() / "experiments" / safe_name(name)


class Progress:
    """``stage(name)`` enters a stage; ``__call__(what, fraction)`` (the library's
    progress callback) moves the current stage; ``done()`` / ``failed(error)`` end it."""

    def __init__(self, name: str, echo=None) -> None:
        self.path = experiment_dir(name) / "status.json"
        if self.path.exists():  # a hand-edited status is reported, never overwritten
            read_status_file(self.path)
        self.echo = echo
        self.state = {
            "experiment": name,
            "pid": os.getpid(),
            "state": "running",
            "started": time.time(),
            "stage": None,
            "detail": "",
            "stages": {s: {"state": "waiting", "fraction": 0.0} for s in STAGES},
            "error": None,
        }
        self._last = 0.0
        self._write()

    def _write(self) -> None:
        self.state["updated"] = time.time()
        write_json_atomic(self.path, self.state)

    def stage(self, name: str) -> None:
        cur = self.state["stage"]
        if cur and cur != name:
            self.state["stages"][cur].update(state="done", fraction=1.0)
        self.state["stage"] = name
        self.state["stages"][name]["state"] = "running"
        self._write()

    def __call__(self, what: str, fraction: float) -> None:
        cur = self.state["stage"]
        if cur:
            self.state["stages"][cur]["fraction"] = round(float(fraction), 4)
        self.state["detail"] = what
        if self.echo:
            self.echo(what, fraction)
        if time.time() - self._last > 0.5 or fraction >= 1.0:
            self._last = time.time()
            self._write()

    def done(self) -> None:
        for s in self.state["stages"].values():
            if s["state"] == "running":
                s.update(state="done", fraction=1.0)
        self.state.update(state="done", detail="")
        self._write()

    def failed(self, error: str) -> None:
        cur = self.state["stage"]
        if cur:
            self.state["stages"][cur]["state"] = "failed"
        self.state.update(state="failed", error=error)
        self._write()


def read_status(name: str) -> dict | None:
    """The run's ``status.json`` (None when there is none); a ``running`` run whose
    process is gone reads as ``interrupted``. A file that is not a status as ``Progress``
    writes it (hand-edited, or foreign) raises ``DataError`` and is left as it is."""
    p = experiment_dir(name) / "status.json"
    if not p.exists():
        return None
    st = read_status_file(p)
    if st.get("state") == "running" and not _alive(st.get("pid")):
        st["state"] = "interrupted"
    return st


def read_status_file(path: Path) -> dict:
    """A ``status.json``, checked: ``DataError`` naming the file and the field when it
    is not one."""
    from dtm.errors import DataError

    keep = "it was left as it is: delete it (or move it aside) to start the run afresh."
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); {keep}") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {keep}"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}).") from None

    def bad(field: str, want: str) -> DataError:
        return DataError(f"{path}: {field} must be {want}; {keep}")

    if not isinstance(st, dict):
        raise bad("the file", "a JSON object (a run's status)")
    if not isinstance(st.get("state"), str):
        raise bad("state", "text (running, done, failed, ...)")
    pid = st.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise bad("pid", "a process id (an integer) or null")
    for key in ("started", "updated"):
        v = st.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, "a time in seconds (a number)")
    for key in ("stage", "detail", "error"):
        if st.get(key) is not None and not isinstance(st[key], str):
            raise bad(key, "text or null")
    stages = st.get("stages", {})
    if not isinstance(stages, dict):
        raise bad("stages", "an object of {stage: {state, fraction}}")
    for name, s in stages.items():
        if not isinstance(s, dict) or not isinstance(s.get("state", ""), str):
            raise bad(f"stages.{name}", "an object {state, fraction}")
        f = s.get("fraction", 0.0)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise bad(f"stages.{name}.fraction", "a number from 0 to 1")
    return st


def _alive(pid) -> bool:
    from dtm.lab import _alive as alive

    return bool(pid) and alive(int(pid))


def launch(experiment_file: str | Path, name: str) -> dict:
    """Start ``python -m dtm run FILE`` in the background unless this experiment is
    already running; returns its status."""
    from dtm.jobs.local import spawn_detached

    st = read_status(name)
    if st and st["state"] == "running":
        return st
    out = experiment_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "launch.lock"  # holds the pid of the run it started
    try:  # two sessions pressing the button at once start one run
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
        except (OSError, ValueError):
            pid = 0
        fresh = time.time() - lock.stat().st_mtime < 10
        if (pid and _alive(pid)) or (not pid and fresh):  # running, or being started
            return read_status(name) or {"state": "starting", "stages": {}}
        lock.unlink(missing_ok=True)  # the run it names has ended
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return read_status(name) or {"state": "starting", "stages": {}}
    try:
        log = open(out / "run.log", "a")  # noqa: SIM115
        cmd = [sys.executable, "-m", "dtm", "run", str(experiment_file)]
        proc = spawn_detached(cmd, log)
        os.write(fd, str(proc.pid).encode())
        write_json_atomic(
            out / "status.json",
            {
                "experiment": name,
                "pid": proc.pid,
                "state": "running",
                "stage": None,
                "started": time.time(),
                "detail": "starting",
                "stages": {s: {"state": "waiting", "fraction": 0.0} for s in STAGES},
                "error": None,
            },
        )
    finally:
        os.close(fd)
    return read_status(name) or {}


# ------------------------------------------------------------------ evaluation


def _models(exp, jobs) -> list[dict]:
    """What to score: ``{"label", "seed", "kind", "adapters", "recipe"}`` per model."""
    from dtm.experiment import resolve_inputs

    base = resolve_inputs(exp)["base"]
    merge = exp.merge or {}
    methods = list(merge.get("methods") or ["average"])
    params = dict(merge.get("params") or {})
    out = [{"label": "base", "seed": None, "kind": "base", "base": base, "adapters": []}]
    done = [j for j in jobs if j.state == "done"]
    for seed in exp.seeds:
        mine = [j for j in done if j.config.get("seed") == seed]
        sft = next((j for j in mine if j.kind == "sft"), None)
        if sft:
            out.append(
                {
                    "label": "sft",
                    "seed": seed,
                    "kind": "sft",
                    "base": base,
                    "adapters": [str(sft.run_dir / "adapter")],
                }
            )
            out.append(
                {
                    "label": f"sft ×1/{exp.k}",
                    "seed": seed,
                    "kind": "shrink",
                    "base": base,
                    "adapters": [str(sft.run_dir / "adapter")],
                    "factor": 1 / exp.k,
                }
            )
        for m in exp.methods:
            folder = f"{m}-s{seed}"  # experiment.assignment_path
            subs = sorted(
                (
                    j
                    for j in mine
                    if j.kind == "sub"
                    and Path(j.config.get("assignments") or "").parent.name == folder
                ),
                key=lambda j: j.config["cluster"],
            )
            if len(subs) < exp.k:
                continue
            adapters = [str(j.run_dir / "adapter") for j in subs]
            for mm in methods:
                label = f"dtm-{m}" if mm == "average" else f"dtm-{m}-{mm}"
                out.append(
                    {
                        "label": label,
                        "seed": seed,
                        "kind": "dtm",
                        "base": base,
                        "adapters": adapters,
                        "recipe": {"method": mm, "weights": [1 / exp.k] * exp.k, "params": params},
                    }
                )
            for c, a in enumerate(adapters):
                out.append(
                    {
                        "label": f"sub-{m}-{c}",
                        "seed": seed,
                        "kind": "sub",
                        "base": base,
                        "adapters": [a],
                    }
                )
        for b in exp.baselines:
            j = next((j for j in mine if j.kind == b), None)
            if j:
                out.append(
                    {
                        "label": b,
                        "seed": seed,
                        "kind": "baseline",
                        "base": base,
                        "adapters": [str(j.run_dir / "adapter")],
                    }
                )
    return out


def export_merges(exp, jobs, *, progress=None) -> list[Path]:
    """Write each DTM merge as a peft adapter folder (with ``recipe.json``) under
    ``<experiment>/merged/<label>-s<seed>``, for use outside the dashboard; existing
    ones are kept."""
    from dtm.merge.engine import Merger

    dtm = [m for m in _models(exp, jobs) if m["kind"] == "dtm"]
    out, mergers = [], {}
    for i, m in enumerate(dtm):
        target = experiment_dir(exp.name) / "merged" / f"{safe_name(m['label'])}-s{m['seed']}"
        if progress:
            progress(f"merging {m['label']} s{m['seed']}", i / len(dtm))
        if not (target / "recipe.json").exists():
            key = tuple(m["adapters"])
            if key not in mergers:
                mergers = {key: Merger(m["base"], m["adapters"])}  # one set in memory
            r = m["recipe"]
            mergers[key].export(target, r["method"], r["weights"], **r["params"])
        out.append(target)
    if progress:
        progress("merging", 1.0)
    return out


def score_models(
    models: list[dict],
    tasks: list[str],
    *,
    group: str,
    lab: str | None,
    engine: str = "quick",
    limit: int | None = None,
    allow_code: bool = False,
    controls_dir: Path | None = None,
    progress=None,
) -> dict[str, float]:
    """Score each model (``_models``' dicts) on ``tasks`` and record the scores under
    ``group``; a model already scored on every task (same engine and limit) is skipped.
    Returns the seconds spent loading or merging and evaluating."""
    from dtm.controls import shrink_adapter
    from dtm.evaluate import evaluate
    from dtm.results import ModelRef, load_model, record, scores

    have = scores(group=group)
    same_limit = have["lim"].isna() if limit is None else have["lim"] == limit
    have = have[(have["engine"] == engine) & same_limit]
    timings: dict[str, float] = {"load_and_merge": 0.0, "evaluate": 0.0}
    for i, m in enumerate(models):
        adapters = m["adapters"]
        if m["kind"] == "shrink":
            folder = controls_dir or experiment_dir(group) / "controls"
            scaled = folder / f"{Path(adapters[0]).parent.name}-x{m['factor']:.4g}"
            if not (scaled / "adapter_model.safetensors").exists():
                shrink_adapter(adapters[0], m["factor"], scaled)
            adapters = [str(scaled)]
        ref = ModelRef(
            base=m["base"],
            adapters=adapters,
            recipe=m.get("recipe"),
            label=m["label"],
            group=group,
            seed=m["seed"],
        )
        done = set(have.loc[have["model_key"] == ref.key, "task"])
        if progress:
            seed = f" s{m['seed']}" if m["seed"] is not None else ""
            progress(f"scoring {m['label']}{seed}", i / len(models))
        if set(tasks) <= done:
            continue
        t0 = time.perf_counter()
        model, tok = load_model(ref)
        t1 = time.perf_counter()
        res = evaluate(
            model, tok, tasks, engine=engine, lab=lab, limit=limit, allow_code=allow_code
        )
        timings["load_and_merge"] += t1 - t0
        timings["evaluate"] += time.perf_counter() - t1
        record(ref, res, engine=engine, limit=limit)
        del model
    if progress:
        progress("scoring", 1.0)
    return timings


def group_models(source, k_factor: bool = True) -> list[dict]:
    """The models of one Train-page launch (a ``MergeSource``): base, its baselines (SFT
    among them), the shrinkage control, DTM (the sub-models averaged) and each sub-model."""
    base = source.base
    out = [{"label": "base", "seed": None, "kind": "base", "base": base, "adapters": []}]
    k = len(source.subs)
    for name, path in source.baselines.items():
        out.append(
            {"label": name, "seed": None, "kind": "baseline", "base": base, "adapters": [str(path)]}
        )
        if name.startswith("sft") and k_factor:
            out.append(
                {
                    "label": f"{name} ×1/{k}",
                    "seed": None,
                    "kind": "shrink",
                    "base": base,
                    "adapters": [str(path)],
                    "factor": 1 / k,
                }
            )
    adapters = [str(p) for _, p in source.subs]
    out.append(
        {
            "label": "dtm",
            "seed": None,
            "kind": "dtm",
            "base": base,
            "adapters": adapters,
            "recipe": {"method": "average", "weights": [1 / k] * k, "params": {}},
        }
    )
    for name, p in source.subs:
        out.append({"label": name, "seed": None, "kind": "sub", "base": base, "adapters": [str(p)]})
    return out


def evaluate_experiment(exp, jobs, *, progress=None) -> pd.DataFrame:
    """Score every model of the experiment (see the module docstring); returns the
    scores table (``label, seed, kind, task, metric, value, stderr, n``)."""
    from dtm.evaluate import PROBES, TASKS
    from dtm.experiment import resolve_inputs
    from dtm.results import scores

    inputs = resolve_inputs(exp)
    ev = exp.evaluate or {}
    tasks = list(ev.get("tasks") or (TASKS + PROBES if inputs["lab"] else []))
    engine, limit = ev.get("engine", "quick"), ev.get("limit")
    if not tasks:
        from dtm.errors import ConfigError

        raise ConfigError(f"{exp.source}: evaluate.tasks is needed when the experiment has no lab.")
    out_dir = experiment_dir(exp.name)
    timings = score_models(
        _models(exp, jobs),
        tasks,
        group=exp.name,
        lab=inputs["lab"],
        engine=engine,
        limit=limit,
        controls_dir=out_dir / "controls",
        progress=progress,
    )
    table = scores(group=exp.name)
    table = table[table["engine"] == engine]
    write_json_atomic(
        out_dir / "results.json",
        {
            "experiment": exp.name,
            "engine": engine,
            "limit": limit,
            "seconds": timings,
            "scores": table.drop(columns=["model"]).to_dict("records"),
        },
    )
    return table


def _mean_std(values: list[float], digits: int = 3) -> str:
    s = pd.Series(values, dtype=float).dropna()
    if s.empty:
        return ""
    if len(s) == 1:
        return f"{s.iloc[0]:.{digits}f}"
    return f"{s.mean():.{digits}f} ± {s.std(ddof=1):.{digits}f}"


def results_markdown(
    exp, table: pd.DataFrame, jobs, command: str, seconds: float, timings: dict | None = None
) -> str:
    """The experiment's results: mean ± std over seeds (n seeds as given)."""
    from dtm.compare import model_order
    from dtm.train import read_metrics

    lines = [
        f"# {exp.name}: results",
        "",
        f"`{command}`: K={exp.k}, clusterings {', '.join(exp.methods)}, seeds {exp.seeds}, "
        f"{len(jobs)} training jobs, {seconds:.0f} s in all. Cells: mean ± std over seeds "
        "(sample std; one seed: the value). `sft ×1/K` is the shrinkage control: the SFT "
        "delta scaled by 1/K.",
        "",
    ]
    cols = [c for c in COLUMNS if ((table["task"] == c[0]) & (table["metric"] == c[1])).any()]
    lines.append("| model | " + " | ".join(c[2] for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for label in model_order(table["label"].dropna()):
        sub = table[table["label"] == label]
        cells = [
            _mean_std(sub[(sub["task"] == t) & (sub["metric"] == k)]["value"].tolist())
            for t, k, _ in cols
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios, walls = [], {}
    for j in jobs:
        if j.kind == "sft":
            recs = read_metrics(j.run_dir / "metrics.jsonl")
            if recs and recs[-1].get("loss_ratio") is not None:
                ratios.append(recs[-1]["loss_ratio"])
        if j.started and j.ended:
            walls.setdefault(j.kind, []).append(j.ended - j.started)
    lines += [
        "",
        f"Loss-reduction ratio ΔL_train/ΔL_val at the end of SFT: {_mean_std(ratios)}"
        f" (seeds {len(ratios)}).",
        "",
        "| training job | runs | wall s (mean ± std) |",
        "|---|---|---|",
    ]
    for kind, ws in sorted(walls.items()):
        lines.append(f"| {kind} | {len(ws)} | {_mean_std(ws, 1)} |")
    for what, secs in (timings or {}).items():
        lines.append(f"| ({what.replace('_', ' ')}, all models) | | {secs:.1f} |")
    return "\n".join(lines) + "\n"
