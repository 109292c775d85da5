"""Experiment files: the whole DTM experiment, headless (``python -m dtm run FILE.yaml``).

An experiment names its data and base model (or the lab, which provides both), how to
disperse (K, the clustering methods), the training values shared by every run, the
baselines and the seeds. ``plan`` turns it into the list of training jobs, in order:
for each seed, vanilla SFT, then the K sub-models of each clustering, then the
baselines. ``run`` builds or reuses the lab, disperses, submits the jobs to the chosen
backend (the same registry the dashboard reads) and waits for them.

Sub-model budget (``sub_budget``): ``epochs`` (the paper's setup) gives each sub-model the
same number of passes over its cluster as SFT makes over all the data, so with a fixed
SFT step count a sub-model gets ``steps * cluster_rows / all_rows`` steps; ``steps``
gives each sub-model the full SFT step count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError
from dtm.train import KINDS, TrainConfig, check_config

BASELINES = tuple(k for k in KINDS if k not in ("sft", "sub"))
_TOP = {
    "name",
    "description",
    "lab",
    "base",
    "data",
    "val_data",
    "disperse",
    "train",
    "sub_budget",
    "baselines",
    "seeds",
    "backend",
    "estimate",
    "evaluate",
    "merge",
}


@dataclass
class Experiment:
    name: str
    base: str | None = None
    data: str | None = None
    val_data: str | None = None
    lab: dict[str, Any] | None = None
    k: int = 4
    methods: list[str] = field(default_factory=lambda: ["kmeans"])
    embed_field: str = "instruction"
    embed_model: str | None = None
    share: str | None = None  # use the dispersal (and so the trained jobs) of this experiment
    train: dict[str, Any] = field(default_factory=dict)
    sub_budget: str = "epochs"
    baselines: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    backend: str = "local"
    estimate: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file; every error names the file and the key."""
    import yaml

    from dtm.cluster import METHODS

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping (name:, lab: or data:, ...).")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}; known: {sorted(_TOP)}.")
    if not raw.get("name"):
        raise ConfigError(f"{path}: needs a name.")
    exp = Experiment(name=str(raw["name"]), source=str(p))
    if raw.get("lab") is not None:
        lab = raw["lab"] if isinstance(raw["lab"], dict) else {}
        exp.lab = {"size": lab.get("size", "default"), "seed": int(lab.get("seed", 0))}
        if exp.lab["size"] not in ("small", "default"):
            raise ConfigError(f"{path}: lab.size must be small or default.")
    else:
        if not raw.get("base") or not raw.get("data"):
            raise ConfigError(f"{path}: give either lab: or both base: and data:.")
        exp.base, exp.data = str(raw["base"]), str(raw["data"])
        exp.val_data = raw.get("val_data")
    d = raw.get("disperse") or {}
    exp.k = int(d.get("k", 4))
    if exp.k < 1:
        raise ConfigError(f"{path}: disperse.k must be at least 1, not {exp.k}.")
    exp.methods = list(d.get("methods", ["kmeans"]))
    bad = [m for m in exp.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"{path}: disperse.methods {bad}: choose from {list(METHODS)}.")
    exp.embed_field = d.get("field", "instruction")
    exp.embed_model = d.get("model")
    exp.share = d.get("share")
    unknown = sorted(set(d) - {"k", "methods", "field", "model", "share"})
    if unknown:
        raise ConfigError(f"{path}: disperse: unknown keys {', '.join(unknown)}.")
    exp.train = dict(raw.get("train") or {})
    known = {f.name for f in fields(TrainConfig)} - {"base", "data", "out", "kind", "cluster"}
    unknown = sorted(set(exp.train) - known)
    if unknown:
        raise ConfigError(f"{path}: train: unknown keys {', '.join(unknown)}.")
    exp.sub_budget = raw.get("sub_budget", "epochs")
    if exp.sub_budget not in ("epochs", "steps"):
        raise ConfigError(f"{path}: sub_budget must be epochs or steps.")
    exp.baselines = list(raw.get("baselines") or [])
    bad = [b for b in exp.baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"{path}: baselines {bad}: choose from {list(BASELINES)}.")
    exp.seeds = [int(s) for s in (raw.get("seeds") or [0])]
    exp.backend = str(raw.get("backend", "local"))
    exp.estimate = dict(raw.get("estimate") or {})
    exp.evaluate = dict(raw.get("evaluate") or {})
    _check_evaluate(exp, path)
    exp.merge = dict(raw.get("merge") or {})
    from dtm.merge.methods import METHODS as MERGE_METHODS

    bad = [m for m in exp.merge.get("methods") or [] if m not in MERGE_METHODS]
    if bad:
        raise ConfigError(f"{path}: merge.methods {bad}: choose from {list(MERGE_METHODS)}.")
    return exp


def _check_evaluate(exp: Experiment, path) -> None:
    ev = exp.evaluate
    unknown = sorted(set(ev) - {"tasks", "engine", "limit"})
    if unknown:
        raise ConfigError(f"{path}: evaluate: unknown keys {', '.join(unknown)}.")
    if ev.get("engine", "quick") not in ("quick", "full"):
        raise ConfigError(f"{path}: evaluate.engine must be quick or full.")
    if not isinstance(ev.get("tasks", []), list):
        raise ConfigError(f"{path}: evaluate.tasks is a list of task names.")


def resolve_inputs(exp: Experiment) -> dict[str, str | None]:
    """base, data, val_data and the lab folder (which may not be built yet)."""
    if exp.lab is None:
        return {"base": exp.base, "data": exp.data, "val_data": exp.val_data, "lab": None}
    from dtm.lab import default_lab_dir

    lab = default_lab_dir(exp.lab["seed"], exp.lab["size"])
    return {
        "base": str(lab / "model"),
        "data": str(lab / "data" / "train.jsonl"),
        "val_data": str(lab / "data" / "val.jsonl"),
        "lab": str(lab),
    }


@dataclass
class PlannedJob:
    name: str
    seed: int
    config: TrainConfig
    method: str | None = None  # the clustering of a sub-model
    est_rows: int = 0


def plan(
    exp: Experiment, cluster_sizes: dict[tuple[str, int], list[int]] | None = None
) -> list[PlannedJob]:
    """The training jobs, in order. ``cluster_sizes[(method, seed)]`` gives real sizes
    once dispersed; otherwise each cluster is taken to hold 1/K of the rows (dry run)."""
    inputs = resolve_inputs(exp)
    n_rows = count_rows(exp)
    jobs: list[PlannedJob] = []
    common = {**exp.train, "base": inputs["base"], "data": inputs["data"], "out": "-"}
    if inputs["val_data"]:
        common.setdefault("val_data", inputs["val_data"])
    if inputs["lab"] and "eval_lab" not in common:
        common["eval_lab"] = inputs["lab"]
    if "target_modules" in common:
        common["target_modules"] = tuple(common["target_modules"])
    for seed in exp.seeds:
        sft = TrainConfig(**{**common, "kind": "sft", "seed": seed})
        jobs.append(PlannedJob(f"sft s{seed}", seed, sft, est_rows=n_rows))
        for method in exp.methods:
            sizes = (cluster_sizes or {}).get((method, seed)) or [n_rows // exp.k] * exp.k
            for c, size in enumerate(sizes):
                values = {**common, "kind": "sub", "cluster": c, "seed": seed}
                values["assignments"] = str(assignment_path(exp, method, seed))
                if exp.sub_budget == "epochs" and sft.steps is not None and n_rows:
                    values["steps"] = max(1, math.ceil(sft.steps * size / n_rows))
                cfg = TrainConfig(**values)
                jobs.append(PlannedJob(f"{method} sub {c} s{seed}", seed, cfg, method, size))
        for b in exp.baselines:
            cfg = TrainConfig(**{**common, "kind": b, "seed": seed})
            jobs.append(PlannedJob(f"{b} s{seed}", seed, cfg, est_rows=n_rows))
    for j in jobs:
        if exp.lab is None or Path(j.config.base).exists():
            check_config(j.config)
    return jobs


def assignment_path(exp: Experiment, method: str, seed: int) -> Path:
    from dtm.store import cache_dir, safe_name

    return (
        cache_dir()
        / "experiments"
        / safe_name(exp.share or exp.name)
        / f"{method}-s{seed}"
        / ("assignments.csv")
    )


def count_rows(exp: Experiment) -> int:
    """Training rows: counted for a local file, from the lab's build plan, or
    ``estimate.rows`` for hub data (nothing is downloaded)."""
    if "rows" in exp.estimate:
        return int(exp.estimate["rows"])
    if exp.lab is not None:
        from dtm.lab.build import BUILD

        return 4 * BUILD[exp.lab["size"]]["rows_per_family"]
    p = Path(exp.data).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip())
    raise ConfigError(
        f"{exp.source}: data {exp.data} is not a local file; give estimate.rows (and "
        "estimate.mean_tokens) so the plan can be sized without downloading it."
    )


def estimate(exp: Experiment, jobs: list[PlannedJob]) -> dict[str, Any]:
    """GPU-hours from the token count: 6 * N * tokens FLOPs (the dense rule; LoRA skips the
    weight gradients, so this is an upper bound) over peak FLOP/s times the MFU."""
    est = exp.estimate
    mean_tokens = float(est.get("mean_tokens", 0) or 0)
    params = float(est.get("params", 0) or 0)
    if exp.lab is not None:
        mean_tokens = mean_tokens or 40.0
        params = params or 0.75e6
    peak = float(est.get("gpu_flops", 989e12))  # H100/H200 dense bf16
    mfu = float(est.get("mfu", 0.3))
    rows, tokens = [], 0.0
    for j in jobs:
        c = j.config
        passes = (c.steps * c.batch_size / max(j.est_rows, 1)) if c.steps else c.epochs
        t = j.est_rows * passes * mean_tokens
        t *= {"soup": c.members, "replay": 2}.get(c.kind, 1)  # members; the 1:1 corpus rows
        tokens += t
        rows.append({"job": j.name, "rows": j.est_rows, "tokens": t})
    flops = 6 * params * tokens
    return {
        "tokens": tokens,
        "params": params,
        "flops": flops,
        "gpu_hours": flops / (peak * mfu) / 3600 if peak and mfu else None,
        "assumptions": f"mean {mean_tokens:g} tokens/row, N={params:.3g}, peak "
        f"{peak:.3g} FLOP/s, MFU {mfu:g}",
        "per_job": rows,
    }


def describe(exp: Experiment, jobs: list[PlannedJob]) -> str:
    est = estimate(exp, jobs)
    inputs = resolve_inputs(exp)
    lines = [
        f"experiment {exp.name} ({exp.source})",
        f"  base {inputs['base']}",
        f"  data {inputs['data']}" + (f" (val {inputs['val_data']})" if inputs["val_data"] else ""),
        f"  disperse K={exp.k} with {', '.join(exp.methods)} on the {exp.embed_field}",
        f"  backend {exp.backend}; seeds {exp.seeds}; sub-model budget: same {exp.sub_budget}",
        f"  {len(jobs)} training jobs, in order:",
    ]
    for i, (j, e) in enumerate(zip(jobs, est["per_job"], strict=True), 1):
        c = j.config
        budget = f"{c.steps} steps" if c.steps else f"{c.epochs:g} epochs"
        lines.append(f"  {i:>3}. {j.name:<22} {c.kind:<7} ~{e['rows']:>7} rows  {budget}")
    hours = est["gpu_hours"]
    lines.append(
        f"  tokens ~{est['tokens']:.3g}; compute ~{est['flops']:.3g} FLOPs"
        + (f" = ~{hours:.3g} GPU-hours" if hours is not None else "")
        + f" ({est['assumptions']})"
    )
    if exp.evaluate:
        lines.append(
            f"  then merge and evaluate on {', '.join(map(str, exp.evaluate.get('tasks', [])))}"
        )
    return "\n".join(lines)


def run(
    exp: Experiment, *, progress=None, wait: bool = True, poll: float = 2.0, stage=None
) -> dict:
    """Build or reuse the lab, disperse, submit every job, and (``wait``) wait for them.
    Returns ``{"jobs": [...], "seconds": ...}``."""
    from dtm import jobs as jobs_api
    from dtm.pipeline import DisperseConfig, run_disperse, write_disperse_outputs
    from dtm.store import Registry

    t0 = time.time()
    inputs = resolve_inputs(exp)
    stage = stage or (lambda name: None)
    if exp.lab is not None:
        stage("lab")
        _ensure_lab(exp, progress)
    stage("disperse")
    sizes: dict[tuple[str, int], list[int]] = {}
    for seed in exp.seeds:
        for method in exp.methods:
            kw = {"model": exp.embed_model} if exp.embed_model else {}
            cfg = DisperseConfig(
                data=inputs["data"], k=exp.k, method=method, field=exp.embed_field, seed=seed, **kw
            )
            res = run_disperse(cfg, Registry(), project=False, progress=progress)
            out = assignment_path(exp, method, seed).parent
            write_disperse_outputs(res, out, cfg)
            sizes[(method, seed)] = list(res.clusters["sizes"])
    planned = plan(exp, sizes)
    stage("train")
    submitted = []
    for pj in planned:
        job, _ = jobs_api.submit(pj.config, name=pj.name, group=exp.name, backend=exp.backend)
        submitted.append(job.id)
    store = jobs_api.JobStore()
    while wait:
        rows = {j.id: j for j in jobs_api.refresh(store)}
        mine = [rows[i] for i in submitted]
        if progress:
            progress("training jobs", sum(j.fraction for j in mine) / len(mine))
        if all(j.state in jobs_api.FINAL for j in mine):
            break
        time.sleep(poll)
    final = [store.get(i) for i in submitted]
    return {"jobs": final, "planned": planned, "seconds": round(time.time() - t0, 1)}


def _ensure_lab(exp: Experiment, progress) -> None:
    from dtm.lab import ensure_default_lab, lab_status

    status = ensure_default_lab(exp.lab["seed"], exp.lab["size"])
    while status["state"] == "building":
        if progress:
            progress("building the lab", status.get("fraction", 0.0))
        time.sleep(1.0)
        status = lab_status(Path(status["path"]))
    if status["state"] == "failed":
        raise ConfigError(f"the lab build failed: {status['error']}\n{status.get('log', '')}")
    if progress:
        progress("building the lab", 1.0)


def summary_table(jobs: list) -> str:
    """A markdown table of the jobs: state, final losses, loss ratio, wall time."""
    from dtm.train import read_metrics

    lines = [
        "| job | kind | state | steps | final train loss | final val loss | loss ratio | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        recs = read_metrics(j.run_dir / "metrics.jsonl")
        last = recs[-1] if recs else {}
        wall = round(j.ended - j.started, 1) if j.ended and j.started else ""

        def f(v):
            return "" if v is None else f"{v:.4f}"

        lines.append(
            f"| {j.name} | {j.kind} | {j.state} | {j.step}/{j.total_steps or '?'} | "
            f"{f(last.get('train_loss'))} | {f(last.get('val_loss'))} | "
            f"{f(last.get('loss_ratio'))} | {wall} |"
        )
    return "\n".join(lines)
