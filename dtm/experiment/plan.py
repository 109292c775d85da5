"""An experiment's plan: its training jobs in order, the one sub-model budget function,
and the compute estimate.

For each seed: vanilla SFT, then the K sub-models of each clustering, then the
baselines. Sub-model budget (``sub_budget``): ``epochs`` (the paper's setup) gives each
sub-model the same number of passes over its cluster as SFT makes over all the data, so
with a fixed SFT step count a sub-model gets ``ceil(steps * cluster_rows / all_rows)``
steps (``sub_model_steps``, which the Train page calls too); ``steps`` gives each
sub-model the full SFT step count. The curate baseline's selected subset gets the same
budget as a sub-model of its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dtm.data import load_instructions
from dtm.errors import ConfigError
from dtm.experiment.config import Experiment, resolve_inputs
from dtm.lab.presets import preset
from dtm.train.config import (
    KINDS,
    SOUP_MEMBER,
    TrainConfig,
    check_config,
    curate_budget,
    run_id,
    soup_member,
)

# What a sub-model of a dispersal not yet run is planned with (a dry run).
UNDISPERSED = "(assignments.csv of the dispersal)"


def sub_model_steps(sft_steps: int | None, sizes: list[int], budget: str) -> list[int | None]:
    """Each cluster's step count: ``epochs`` -> ``max(1, ceil(sft_steps * size / total))``
    (the same passes over its rows as SFT over all); ``steps`` (or SFT by epochs) ->
    SFT's own (None: the run counts its steps from its epochs)."""
    if budget not in ("epochs", "steps"):
        raise ConfigError(f"sub-model budget {budget!r}: choose epochs or steps.")
    total = sum(sizes)
    if budget == "steps" or sft_steps is None or total == 0:
        return [sft_steps] * len(sizes)
    return [max(1, math.ceil(sft_steps * size / total)) for size in sizes]


def dtm_set(
    common: dict[str, Any],
    assignments: str,
    sizes: list[int],
    budget: str,
    *,
    clustering: str,
    names=None,
) -> list[tuple[str, TrainConfig, str | None]]:
    """Vanilla SFT and one sub-model per cluster, as ``(name, config, clustering)``: what
    the Train page's DTM launch and ``dtm run`` submit, so the same clustering gives the
    same run ids whichever launched it. ``names(c)`` names cluster c's job."""
    sft = TrainConfig(**{**common, "kind": "sft"})
    out = [("sft", sft, None)]
    steps = sub_model_steps(sft.steps, sizes, budget)
    for c, n in enumerate(steps):
        values = {**common, "kind": "sub", "cluster": c, "assignments": str(assignments)}
        if n is not None:
            values["steps"] = n
        out.append((names(c) if names else f"sub {c}", TrainConfig(**values), clustering))
    return out


def together_members(configs, *, by_clustering: bool = False) -> list[tuple]:
    """``dtm_set`` tuples (or planned jobs) as the members of one group job
    (``dtm.jobs.submit_group``): ``(name, config, clustering, folder)``, the folder
    ``sft`` or ``cluster-<k>`` (``<clustering>/cluster-<k>`` with ``by_clustering``)."""
    out = []
    for name, cfg, clustering in configs:
        if cfg.kind == "sft":
            folder = "sft"
        else:
            folder = f"cluster-{cfg.cluster}"
            if by_clustering:
                folder = f"{clustering}/{folder}"
        out.append((name, cfg, clustering, folder))
    return out


@dataclass
class PlannedJob:
    name: str
    seed: int
    config: TrainConfig
    clustering: str | None = None  # the clustering of a sub-model
    est_rows: int = 0
    scored_rows: int = 0  # rows a forward-only pass scores first (curate's IFD)
    soup_member: bool = False  # an SFT of a seed beyond the experiment's, for a soup
    merges: list[str] | None = None  # a soup: the planned runs it averages (it trains none)


def common_values(exp: Experiment) -> dict[str, Any]:
    """The values every job of ``exp`` shares."""
    inputs = resolve_inputs(exp)
    common = {**exp.train, "base": inputs["base"], "data": inputs["data"], "out": "-"}
    if inputs["val_data"]:
        common.setdefault("val_data", inputs["val_data"])
    if inputs["lab"] and "eval_lab" not in common:
        common["eval_lab"] = inputs["lab"]
    if "target_modules" in common:
        common["target_modules"] = tuple(common["target_modules"])
    return common


def plan(
    exp: Experiment, dispersed: dict[tuple[str, int], tuple[str, list[int]]] | None = None
) -> list[PlannedJob]:
    """The training jobs, in order. ``dispersed[(method, seed)]`` is ``(assignments.csv,
    cluster sizes)`` once dispersed; otherwise (a dry run) each cluster is taken to hold
    1/K of the rows."""
    n_rows = count_rows(exp)
    jobs: list[PlannedJob] = []
    common = common_values(exp)
    own = [TrainConfig(**{**common, "seed": seed, "kind": "sft"}) for seed in exp.seeds]
    sfts = {run_id(c): PlannedJob(f"sft s{c.seed}", c.seed, c, est_rows=n_rows) for c in own}
    for seed, sft in zip(exp.seeds, own, strict=True):
        mine = {**common, "seed": seed}
        jobs.append(sfts[run_id(sft)])
        for method in exp.methods:
            path, sizes = (dispersed or {}).get(
                (method, seed), (UNDISPERSED, [n_rows // exp.k] * exp.k)
            )
            subs = dtm_set(
                mine,
                path,
                sizes,
                exp.sub_budget,
                clustering=method,
                names=lambda c, m=method, s=seed: f"{m} sub {c} s{s}",
            )[1:]
            for (name, cfg, clustering), size in zip(subs, sizes, strict=True):
                jobs.append(PlannedJob(name, seed, cfg, clustering, size))
        for b in exp.baselines:
            cfg = TrainConfig(**{**mine, "kind": b, **exp.kind_values.get(b, {})})
            rows, scored = n_rows, 0
            if b == "curate":  # a budget larger than the data: said before any work
                try:
                    rows = curate_budget(cfg, n_rows)
                except ConfigError as e:
                    raise ConfigError(f"{exp.source}: curate.budget: {e}") from None
                scored = n_rows if cfg.curate_score == "ifd" else 0
                # its subset gets a sub-model's budget: with ``epochs``, the same passes
                # over its rows as SFT over all (Deita trains its subset for SFT's epochs)
                steps = sub_model_steps(cfg.steps, [rows, n_rows - rows], exp.sub_budget)[0]
                cfg = replace(cfg, steps=steps)
            pj = PlannedJob(f"{b} s{seed}", seed, cfg, est_rows=rows, scored_rows=scored)
            if b == "soup":  # its members are SFT runs (of seeds beyond the experiment's
                pj.merges = []  # too, planned here): the soup only averages them
                for i in range(cfg.members):
                    member = soup_member(cfg, i, Path("-"))
                    if run_id(member) not in sfts:
                        name = f"sft s{member.seed} {SOUP_MEMBER}"
                        sfts[run_id(member)] = PlannedJob(
                            name, member.seed, member, est_rows=n_rows, soup_member=True
                        )
                        jobs.append(sfts[run_id(member)])
                    pj.merges.append(sfts[run_id(member)].name)
            jobs.append(pj)
    for j in jobs:
        if exp.lab is None or Path(j.config.base).exists():
            check_config(j.config)
    return jobs


def group_seed(exp: Experiment, pj: PlannedJob) -> int | None:
    """The seed whose group job trains ``pj`` (None: it runs on its own): SFT and the
    sub-models of a seed when the experiment trains them together. A soup's member of a
    seed beyond the experiment's runs on its own, so a group's id does not change with
    the baselines or the other seeds."""
    trained = exp.together and pj.config.kind in ("sft", "sub")
    return pj.seed if trained and not pj.soup_member else None


def count_rows(exp: Experiment) -> int:
    """Usable training rows, read as the data layer reads them (JSON arrays, CSV,
    Parquet; bad rows dropped): of the data file, of the lab's (its build plan when it is
    not built yet), or ``estimate.rows`` for hub data (nothing is downloaded)."""
    if "rows" in exp.estimate:
        return int(exp.estimate["rows"])
    inputs = resolve_inputs(exp)
    if exp.lab is not None and not Path(inputs["data"]).is_file():
        return 4 * preset(exp.lab["preset"]).rows[exp.lab["size"]][0]
    p = Path(inputs["data"]).expanduser()
    if p.is_file():
        return len(load_instructions(str(p), count_tokens=False).table)
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
    rows, tokens, scored = [], 0.0, 0.0
    for j in jobs:
        scored += 2 * j.scored_rows * mean_tokens  # IFD: with and without the prompt
        c = j.config
        passes = (c.steps * c.batch_size / max(j.est_rows, 1)) if c.steps else c.epochs
        t = j.est_rows * passes * mean_tokens
        t *= 0 if j.merges else KINDS[c.kind].tokens(c)  # replay's 1:1 corpus rows
        tokens += t
        rows.append({"job": j.name, "rows": j.est_rows, "tokens": t})
    flops = 6 * params * tokens + 2 * params * scored  # forward only: 2N per token
    return {
        "tokens": tokens,
        "params": params,
        "flops": flops,
        "gpu_hours": flops / (peak * mfu) / 3600 if peak and mfu else None,
        "assumptions": f"mean {mean_tokens:g} tokens/row, N={params:.3g}, peak "
        f"{peak:.3g} FLOP/s, MFU {mfu:g} assumed (python -m bench.gpu measures it on a GPU)",
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
        f"  {len(jobs)} training runs, in order:",
    ]
    if exp.together:
        lines.insert(
            -1,
            "  SFT and the sub-models of each seed train together: one group job, one process"
            " over one base (train.together: false runs one process each)",
        )
    for i, (j, e) in enumerate(zip(jobs, est["per_job"], strict=True), 1):
        c = j.config
        budget = f"{c.steps} steps" if c.steps else f"{c.epochs:g} epochs"
        if j.merges:
            avg = f"averages {', '.join(j.merges)}, after the other runs"
            lines.append(f"  {i:>3}. {j.name:<22} {c.kind:<7} {avg}")
            continue
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
