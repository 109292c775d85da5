"""An experiment, run: its five stages (lab, disperse, train, merge, evaluate) with
``status.json`` progress, and the background launch the Home page uses.

``run_experiment(exp)`` builds or reuses the lab, disperses, submits every job of the
plan to the chosen backend (the same registry the dashboard reads) and waits for them,
exports each DTM merge under ``<experiment>/merged/``, scores every model (``dtm.score``)
and writes ``jobs.md``, ``results.json`` and ``results.md`` (``dtm.experiment.report``).
``Progress`` writes ``status.json``: the stage, each stage's fraction and the process
id, so a page can follow a run that another process does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dtm import jobs as jobs_api
from dtm import threads
from dtm.disperse import DisperseConfig, run_disperse, training_inputs, write_disperse_outputs
from dtm.errors import ConfigError, DTMError
from dtm.experiment.config import Experiment, experiment_dir, resolve_inputs
from dtm.experiment.plan import group_seed, plan, together_members
from dtm.experiment.report import (
    experiment_models,
    learned_file,
    results_markdown,
    summary_table,
)
from dtm.experiment.status import STAGES, Progress, read_status
from dtm.jobs.local import spawn_detached
from dtm.lab import ensure_default_lab, lab_status
from dtm.merge.engine import Merger
from dtm.merge.learn import learn_weights
from dtm.merge.objective import Objective
from dtm.score import score_models, scores
from dtm.store import (
    Registry,
    pid_alive,
    safe_name,
    write_json_atomic,
    write_text_atomic,
)
from dtm.tasks import PROBES, TASKS


def launch(experiment_file: str | Path, name: str) -> dict:
    """Start ``python -m dtm run FILE`` in the background unless this experiment is
    already running; returns its status."""

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
        if (pid and pid_alive(pid)) or (not pid and fresh):  # running, or being started
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


def run_experiment(exp: Experiment, *, command: str, wait: bool = True, echo=None) -> dict:
    """Every stage of ``exp``; returns ``{"jobs", "planned", "seconds", "results"}``
    (``results``: the markdown table, None with ``wait=False``). A job that did not
    finish is a DTMError after the results of the others are written."""
    prog = Progress(exp.name, echo=echo)
    try:
        res = _train_stages(exp, prog, wait)
        out = experiment_dir(exp.name)
        table = summary_table(res["jobs"])
        write_text_atomic(out / "jobs.md", f"# {exp.name}: training jobs\n\n{table}\n")
        res["jobs_table"], res["results"] = table, None
        if not wait:
            prog.done()
            return res
        bad = [j for j in res["jobs"] if j.state != "done"]
        t0 = time.time()
        prog.stage("merge")
        learn_block_merges(exp, res["jobs"], progress=prog)
        export_merges(exp, res["jobs"], progress=prog)
        prog.stage("evaluate")
        with threads.computing("scoring"):
            scores, timings = evaluate_experiment(exp, res["jobs"], progress=prog)
        seconds = res["seconds"] + time.time() - t0
        md = results_markdown(exp, scores, res["jobs"], command, seconds, timings)
        write_text_atomic(out / "results.md", md)
        res["results"], res["bad"] = md, bad
        if bad:
            which = "; ".join(f"{j.name} ({j.id[:12]}): {j.state}: {j.error}" for j in bad)
            raise DTMError(
                f"{len(bad)} of {len(res['jobs'])} jobs did not finish ({which}); the "
                "results table holds the models that did."
            )
        prog.done()
    except BaseException as e:
        prog.failed(str(e) or type(e).__name__)
        raise
    return res


def _train_stages(exp: Experiment, progress: Progress, wait: bool, poll: float = 2.0) -> dict:
    """Lab, disperse and train: ``{"jobs", "planned", "seconds"}``."""

    t0 = time.time()
    if exp.lab is not None:
        progress.stage("lab")
        _ensure_lab(exp, progress)
    progress.stage("disperse")
    with threads.computing("dispersal"):
        planned = plan(exp, disperse_all(exp, progress))
    progress.stage("train")
    submitted = []

    def group_of(pj) -> int | None:
        return group_seed(exp, pj)

    grouped = {group_of(pj) for pj in planned} - {None}
    for seed in sorted(grouped):  # SFT and every sub-model of the seed: one process, or
        together = [pj for pj in planned if group_of(pj) == seed]  # the fewest that fit
        members = together_members(  # on this machine's GPU
            [(pj.name, pj.config, pj.clustering) for pj in together], by_clustering=True
        )
        parts = jobs_api.submit_together(
            members,
            name=f"dtm s{seed}",
            group=exp.name,
            backend=exp.backend,
            shape=exp.estimate.get("shape"),
        )
        submitted += [job.id for job, _, _ in parts]
    store = jobs_api.JobStore()

    def submit(pjs) -> None:
        for pj in pjs:
            job, _ = jobs_api.submit(
                pj.config, name=pj.name, group=exp.name, backend=exp.backend,
                clustering=pj.clustering, store=store,
            )  # fmt: skip
            submitted.append(job.id)

    def wait_all(total: int) -> None:
        while wait:
            rows = {j.id: j for j in jobs_api.refresh(store)}
            mine = [rows[i] for i in submitted]
            progress("training jobs", sum(j.fraction for j in mine) / total)
            if all(j.state in jobs_api.FINAL for j in mine):
                break
            time.sleep(poll)

    rest = [pj for pj in planned if group_of(pj) is None]
    submit([pj for pj in rest if not pj.merges])
    progress.jobs(submitted)
    soups = [pj for pj in rest if pj.merges]
    if soups and wait:  # a soup starts once the SFT runs it averages have ended (with
        wait_all(len(submitted) + len(soups))  # free slots or Ray it would train them)
    submit(soups)
    progress.jobs(submitted)
    wait_all(len(submitted))
    final = []
    for i in submitted:  # a group's members stand for it in the results
        job = store.get(i)
        final += store.list(parent=i) if job.kind == "group" else [job]
    return {"jobs": final, "planned": planned, "seconds": round(time.time() - t0, 1)}


def disperse_all(exp: Experiment, progress=None) -> dict[tuple[str, int], tuple[str, list[int]]]:
    """Each (clustering, seed)'s ``(assignments.csv, cluster sizes)``. The csv is the
    registry's copy of the assignment (``training_inputs``), the one the Train page uses
    too; a copy with the map's columns is written under ``<experiment>/<method>-s<seed>``."""

    inputs = resolve_inputs(exp)
    progress = progress or (lambda what, fraction: None)
    reg = Registry()
    out: dict[tuple[str, int], tuple[str, list[int]]] = {}
    for seed in exp.seeds:
        for method in exp.methods:
            kw = {"model": exp.embed_model} if exp.embed_model else {}
            cfg = DisperseConfig(
                data=inputs["data"], k=exp.k, method=method, field=exp.embed_field, seed=seed, **kw
            )
            res = run_disperse(cfg, reg, project=False, progress=progress)
            write_disperse_outputs(
                res, experiment_dir(exp.share or exp.name) / f"{method}-s{seed}", cfg
            )
            csv = training_inputs(res.artifacts["assignment"], reg)["assignments"]
            out[(method, seed)] = (csv, list(res.clusters["sizes"]))
    return out


def _ensure_lab(exp: Experiment, progress) -> None:
    if exp.lab.get("path"):  # a named lab: checked when the file was read
        return
    status = ensure_default_lab(exp.lab["seed"], exp.lab["size"], preset=exp.lab["preset"])
    while status["state"] == "building":
        if progress:
            progress("building the lab", status.get("fraction", 0.0))
        time.sleep(1.0)
        status = lab_status(Path(status["path"]))
    if status["state"] == "failed":
        raise ConfigError(f"the lab build failed: {status['error']}\n{status.get('log', '')}")
    if progress:
        progress("building the lab", 1.0)


def learn_block_merges(exp, jobs, *, progress=None) -> list[Path]:
    """With ``merge.blocks`` B: for each seed and clustering, learn the K x B weights of
    the DTM merge (``average``) on the validation rows (``dtm.merge.learn``,
    ``merge.learn_steps`` steps) and keep the result (its path and the point of lowest
    validation loss) in ``report.learned_file``; an existing file is kept."""
    blocks = (exp.merge or {}).get("blocks")
    if not blocks:
        return []
    steps = int(exp.merge.get("learn_steps") or 30)
    val = resolve_inputs(exp)["val_data"]
    merges = [
        m
        for m in experiment_models(exp, jobs)
        if m.kind == "merge" and m.label == f"dtm-{m.clustering}"
    ]
    objective = Objective(heldout=(val,), limit=None)
    out = []
    for i, m in enumerate(merges):
        target = learned_file(exp, m.clustering, m.seed)
        if progress:
            progress(f"learning per-block weights {m.label} s{m.seed}", i / len(merges))
        if not target.is_file():
            merger = Merger(m.base, m.adapters)
            b = min(blocks, merger.n_layers)  # a model of fewer layers: one block each
            found = learn_weights(merger, "average", objective, b, steps)
            found["validation"] = val
            write_json_atomic(target, found)
            del merger
        out.append(target)
    if progress:
        progress("learning per-block weights", 1.0)
    return out


def export_merges(exp, jobs, *, progress=None) -> list[Path]:
    """Write each DTM merge as a peft adapter folder (with ``recipe.json``) under
    ``<experiment>/merged/<label>-s<seed>``, for use outside the dashboard; existing
    ones are kept."""

    dtm = [m for m in experiment_models(exp, jobs) if m.kind == "merge"]
    out, mergers = [], {}
    for i, m in enumerate(dtm):
        target = experiment_dir(exp.name) / "merged" / f"{safe_name(m.label)}-s{m.seed}"
        if progress:
            progress(f"merging {m.label} s{m.seed}", i / len(dtm))
        if not (target / "recipe.json").exists():
            key = tuple(m.adapters)
            if key not in mergers:
                mergers = {key: Merger(m.base, m.adapters)}  # one set in memory
            r = m.recipe
            mergers[key].export(target, r["method"], r["weights"], **r["params"])
        out.append(target)
    if progress:
        progress("merging", 1.0)
    return out


def evaluate_experiment(exp, jobs, *, progress=None):
    """Score every model of the experiment (``report.experiment_models``) and write
    ``results.json``; returns ``(scores table, timings)``."""

    inputs = resolve_inputs(exp)
    ev = exp.evaluate or {}
    tasks = list(ev.get("tasks") or (TASKS + PROBES if inputs["lab"] else []))
    engine, limit = ev.get("engine", "quick"), ev.get("limit")
    heldout = list(ev.get("heldout") or [])
    if not tasks and not heldout:  # load_experiment refuses this; kept for code-made ones
        raise ConfigError(f"{exp.source}: evaluate.tasks is needed when the experiment has no lab.")
    out_dir = experiment_dir(exp.name)
    timings = score_models(
        experiment_models(exp, jobs),
        tasks,
        group=exp.name,
        lab=inputs["lab"],
        engine=engine,
        limit=limit,
        controls_dir=out_dir / "controls",
        progress=progress,
        tasks_dir=ev.get("tasks_dir"),
        heldout=heldout,
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
    return table, timings
