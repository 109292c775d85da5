"""How long a story takes on this machine, and what its button runs: the Home page's
sentences under the story buttons, from what was measured here (never a figure from
elsewhere)."""

from __future__ import annotations

from dtm import jobs as jobs_api
from dtm.controls import FRONTIER_GRID
from dtm.errors import ConfigError, DTMError


def story_jobs(name: str, status: dict | None) -> list:
    """The training jobs of experiment ``name`` (a group job stands for its members): the
    ids its ``status.json`` lists (a run it shares with another experiment keeps the
    group of the one that submitted it first), else the jobs of its group."""
    store = jobs_api.JobStore()
    ids = (status or {}).get("jobs")
    if not ids:
        return [j for j in store.list(group=name) if j.kind != "group"]
    out = []
    for i in ids:
        try:
            job = store.get(i)
        except ConfigError:  # removed from the registry since
            continue
        out += store.list(parent=i) if job.kind == "group" else [job]
    return out


def trained_rows(exp) -> int:
    """The rows an experiment's plan trains in all (steps x batch over its runs; a soup
    trains none of its own)."""
    from dtm.experiment import plan  # lazy: the experiment's plan reads its data

    total = 0
    for pj in plan(exp):
        c = pj.config
        if pj.merges:
            continue
        total += c.steps * c.batch_size if c.steps else int(pj.est_rows * c.epochs)
    return total


def _took(status: dict | None) -> dict[str, float]:
    """Each finished stage's seconds in a ``status.json``."""
    stages = (status or {}).get("stages") or {}
    return {k: v["seconds"] for k, v in stages.items() if "seconds" in v}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def paced_seconds(exp, pace: dict) -> float:
    """The story's training, its losses and benchmark scores along the way, and the
    scoring of its models, at the unit costs of ``pace`` (``dtm.lab.pace``: seconds a
    step of ``batch_size`` rows, a log record's losses, one scoring of every benchmark).
    Its dispersal is not counted."""
    from dtm.experiment import plan  # lazy: the experiment's plan reads its data

    total, step = 0.0, pace["step_seconds"] / pace["batch_size"]
    for pj in plan(exp):
        c = pj.config
        if pj.merges:
            continue
        steps = c.steps or -(-int(pj.est_rows * c.epochs) // c.batch_size)
        total += steps * c.batch_size * step
        total += (steps // c.log_every + 1) * pace["loss_seconds"]
        if c.eval_every:  # at step 0, every eval_every steps, and at the last step
            evals = steps // c.eval_every + 1 + (1 if steps % c.eval_every else 0)
            total += evals * pace["eval_seconds"]
    grid = exp.evaluate.get("frontier", True)
    frontier = len([a for a in (FRONTIER_GRID if grid is True else grid or []) if 0 < a < 1])
    per_seed = 2 + frontier + len(exp.methods) * (1 + exp.k) + len(exp.baselines)
    return total + (1 + len(exp.seeds) * per_seed) * pace["eval_seconds"]


def story_time(
    exp, status: dict | None, others: list[tuple], now: float, pace: dict | None = None
) -> str:
    """How long the story takes on this machine, from what was measured here: while it
    runs, the time so far and the current stage's pace; else its last run's stages; else
    another story's run on the same lab (``others``: ``(experiment, status)`` pairs), its
    training stage scaled by the rows each trains; else the lab's measured ``pace``
    (``dtm.lab.pace``). Never a figure from elsewhere."""
    status = status or {}
    stages = status.get("stages") or {}
    if status.get("state") == "running":
        parts = [f"running for {_minutes(now - float(status.get('started') or now))}"]
        cur = stages.get(status.get("stage") or "", {})
        frac, began = float(cur.get("fraction") or 0), cur.get("began")
        if began and 0.05 <= frac < 1:
            left = (now - began) * (1 - frac) / frac
            parts.append(
                f"the {status['stage']} stage is {frac:.0%} through: about {_minutes(left)} "
                "more at its pace so far"
            )
        return "On this machine: " + "; ".join(parts) + "."
    took = _took(status)
    if status.get("state") == "done" and took:
        each = ", ".join(f"{k} {_minutes(v)}" for k, v in took.items())
        return f"On this machine it last took {_minutes(sum(took.values()))} ({each})."
    for other, st_ in others:
        took = _took(st_)
        if (st_ or {}).get("state") != "done" or "train" not in took:
            continue
        try:
            scale = trained_rows(exp) / max(1, trained_rows(other))
        except (DTMError, OSError):  # no lab data to plan from yet
            continue
        guess = sum(took.values()) - took["train"] + took["train"] * scale
        return (
            f"Not run here yet; from the {other.name} story's run on this machine (its "
            f"training scaled by the rows each trains): about {_minutes(guess)}."
        )
    if pace:
        try:
            guess = paced_seconds(exp, pace)
        except (DTMError, OSError):  # no lab data to plan from yet
            guess = None
        if guess is not None:
            return (
                f"Not run here yet: about {_minutes(guess)} at the pace measured on this "
                f"machine when its lab was built ({pace['step_seconds']:.2f} s a training "
                f"step of {pace['batch_size']} rows, {pace['eval_seconds']:.0f} s to score "
                "every lab benchmark), plus its dispersal; its first run measures it."
            )
    return "Not run here yet: its first run measures how long it takes on this machine."


def story_runs(exp) -> str:
    """The Home page's sentence on what the lab story's button runs."""
    n_jobs = len(exp.seeds) * (1 + exp.k * len(exp.methods) + len(exp.baselines))
    baselines = f"baselines {', '.join(exp.baselines)}" if exp.baselines else "no baselines"
    return (
        f"K={exp.k} sub-models ({', '.join(exp.methods)} clusters), vanilla SFT, {baselines}"
        f" (the shrinkage control and frontier come from SFT's adapter), seeds {exp.seeds}: "
        f"{n_jobs} training runs (SFT and the "
        "sub-models of each seed together in one process), then merging and scoring every "
        "model; what is already trained or scored is reused."
    )
