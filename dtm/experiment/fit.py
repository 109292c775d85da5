"""The dry run's memory table: each training job's estimate on a GPU of a given size
(``dtm.train.memory``, from the model's shape alone), whether it fits, and what ``auto``
chooses there. A group job (SFT and the sub-models of a seed, trained together) is one
job: its members' rows share one forward. A group that does not fit is split as
``dtm run`` splits it on a GPU of that size (``dtm.train.split``): the table names which
jobs go together."""

from __future__ import annotations

from dtm.experiment.config import Experiment, resolve_inputs
from dtm.experiment.plan import PlannedJob, group_seed
from dtm.train.memory import Machine, Shape, choose, model_shape
from dtm.train.split import split_members

DEFAULT_GPU_GIB = 80.0  # an A100/H100 80 GB


def job_parts(
    exp: Experiment, jobs: list[PlannedJob], shape: Shape | None = None, machine=None
) -> list[tuple[str, list[list[PlannedJob]]]]:
    """The jobs as they are submitted: ``(name, parts)``, a group job first per seed
    (``dtm s<seed>``), then every job that trains on its own (a soup trains none), one
    part each, except a group that does not fit one GPU of ``machine`` with a base of
    ``shape``: the fewest groups that do (``dtm.train.split``), as ``dtm run`` submits
    them there."""
    units: dict[str, list[PlannedJob]] = {}
    for j in jobs:
        if j.merges:
            continue
        seed = group_seed(exp, j)
        units.setdefault(j.name if seed is None else f"dtm s{seed}", []).append(j)
    out = []
    for name, members in units.items():
        parts = [list(range(len(members)))]
        if machine is not None and group_seed(exp, members[0]) is not None:
            parts = split_members([m.config for m in members], shape, machine)
        out.append((name, [[members[i] for i in p] for p in parts]))
    return out


def job_units(
    exp: Experiment, jobs: list[PlannedJob], shape: Shape | None = None, machine=None
) -> list[tuple[str, list[PlannedJob]]]:
    """``job_parts`` flat: ``(name, members)`` per job submitted, a split group's parts
    named ``dtm s<seed> 1/n``, ``dtm s<seed> 2/n``, ..."""
    out = []
    for name, parts in job_parts(exp, jobs, shape, machine):
        n = len(parts)
        out += [(name if n == 1 else f"{name} {k}/{n}", p) for k, p in enumerate(parts, 1)]
    return out


def experiment_shape(exp: Experiment) -> Shape | None:
    """The base's shape: its folder's ``config.json``, else the file's ``estimate.shape``."""
    base = resolve_inputs(exp)["base"]
    return model_shape(base, exp.estimate.get("shape"), f"{exp.source}: estimate.shape")


def memory_lines(exp: Experiment, jobs: list[PlannedJob], gpu_gib: float) -> list[str]:
    """The dry run's lines: per job, the estimate in GiB, fits or not, auto's choice; a
    group that does not fit, split into the groups that do."""
    base = resolve_inputs(exp)["base"]
    shape = experiment_shape(exp)
    if shape is None:
        return [
            f"  memory: no shape for {base} (no config.json there yet); give estimate.shape "
            "(hidden, intermediate, layers, heads, vocab) to size it"
        ]
    gpu = Machine(gpu=True, bf16=True, memory_gib=gpu_gib)
    lines = [
        f"  memory per job on one GPU of {gpu_gib:g} GiB with bf16 (a job fits in 90% of "
        f"it; {shape.params() / 1e9:.3g}B parameters; attention sdpa, or "
        "flash_attention_2 where installed):"
    ]
    number = {id(j): i for i, j in enumerate(jobs, 1)}  # as the plan above numbers them
    rows = []
    for _, parts in job_parts(exp, jobs, shape, gpu):
        if len(parts) > 1:
            members = [m for p in parts for m in p]
            est = choose([m.config for m in members], shape, gpu).estimate
            spans = " | ".join(_label([number[id(m)] for m in p], p) for p in parts)
            fit = all(choose([m.config for m in p], shape, gpu).fits for p in parts)
            lines.append(
                f"    {_label([number[id(m)] for m in members], members)} would need "
                f"{est.gib:.1f} GiB: split into {len(parts)} group jobs"
                + (" that fit" if fit else " (a run that does not fit even alone is one)")
                + f": {spans}"
            )
        rows += parts
    for members in rows:
        choice = choose([m.config for m in members], shape, gpu)
        est = choice.estimate
        label = _label([number[id(m)] for m in members], members)
        parts = (
            f"weights {est.weights / 2**30:.1f}, LoRA state {est.lora / 2**30:.2f}, "
            f"activations {est.activations / 2**30:.1f}, logits {est.logits / 2**30:.1f}"
        )
        lines.append(
            f"    {label:<26} {est.gib:6.1f} GiB  {'fits' if choice.fits else 'does NOT fit'}"
            f"  auto: {choice.describe()}  ({parts})"
        )
    return lines


def _label(numbers: list[int], members: list[PlannedJob]) -> str:
    """``job 13 (curate)``, or a group's ``jobs 1-5 (5 together)``: by the plan's numbers,
    so each job's own line above stays the one line that names it."""
    if len(numbers) == 1:
        return f"job {numbers[0]} ({members[0].config.kind})"
    run = numbers == list(range(numbers[0], numbers[-1] + 1))
    span = f"{numbers[0]}-{numbers[-1]}" if run else ",".join(map(str, numbers))
    return f"jobs {span} ({len(members)} together)"
