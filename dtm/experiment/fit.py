"""The dry run's memory table: each training job's estimate on a GPU of a given size
(``dtm.train.memory``, from the model's shape alone), whether it fits, and what ``auto``
chooses there. A group job (SFT and the sub-models of a seed, trained together) is one
job: its members' rows share one forward."""

from __future__ import annotations

from dtm.experiment.config import Experiment, resolve_inputs
from dtm.experiment.plan import PlannedJob, group_seed
from dtm.train.memory import Machine, choose, model_shape

DEFAULT_GPU_GIB = 80.0  # an A100/H100 80 GB


def job_units(exp: Experiment, jobs: list[PlannedJob]) -> list[tuple[str, list[PlannedJob]]]:
    """The jobs as they are submitted: ``(name, members)``, a group job first per seed
    (``dtm s<seed>``), then every job that trains on its own (a soup trains none)."""
    units: dict[str, list[PlannedJob]] = {}
    for j in jobs:
        if j.merges:
            continue
        seed = group_seed(exp, j)
        units.setdefault(j.name if seed is None else f"dtm s{seed}", []).append(j)
    return list(units.items())


def memory_lines(exp: Experiment, jobs: list[PlannedJob], gpu_gib: float) -> list[str]:
    """The dry run's lines: per job, the estimate in GiB, fits or not, auto's choice."""
    base = resolve_inputs(exp)["base"]
    where = f"{exp.source}: estimate.shape"
    shape = model_shape(base, exp.estimate.get("shape"), where)
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
    for _, members in job_units(exp, jobs):
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
