"""The models a comparison scores, as ``ModelRef``s from start to end: the Compare page's
three choices (a launch, saved merges, a model folder) and, in ``dtm.experiment.report``,
an experiment's. ``dtm.score.score_models`` scores any of these lists.

- ``launch_models(source, registry)``: one group of a launch (a ``MergeSource``: one
  clustering, one seed): the base, its baselines (SFT among them), the shrinkage control
  (1/K with the group's K), DTM (the group's sub-models averaged), each sub-model, and
  every merge of those sub-models that was kept or exported, named by its recipe.
- ``saved_models(keys, registry)``: saved merges (``dtm.merge.saved``) and their bases.
- ``folder_models(base, adapter, label)``: a model folder, and a model with its adapter.
- ``lineup_lab(models)``: the lab whose tasks score them (when every one is a lab model);
  ``shrinkable(models)``: the models whose shrinkage frontier can be traced.
- ``jobs_behind(group, table, store)``: the training jobs behind a group's scores.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pandas as pd

from dtm.merge.saved import merge_ref, saved_merges
from dtm.models import lab_of
from dtm.score import ModelRef
from dtm.store import Registry
from dtm.tasks import PROBES, TASKS


def base_ref(base: str, label: str = "base") -> ModelRef:
    """The base model alone."""
    return ModelRef(base=base, label=label, kind="base")


def launch_models(source, registry: Registry | None = None, k_factor: bool = True):
    """The models of one group (a ``MergeSource``: one launch, clustering and seed), then
    its kept merges. The control is SFT ×1/K with the group's K; ``dtm`` averages the
    group's sub-models (``dtm (3 of 4 sub-models)`` while it is still training)."""
    base, k, seed = source.base, source.planned, source.seed
    out = [base_ref(base)]
    for name, (kind, path) in source.baselines.items():
        kind = "sft" if kind == "sft" else "baseline"
        out.append(ModelRef(base=base, adapters=[str(path)], label=name, kind=kind, seed=seed))
        if kind == "sft" and k_factor:
            out.append(
                ModelRef(
                    base=base, adapters=[str(path)], label=f"{name} ×1/{k}", kind="control",
                    factor=1 / k, seed=seed,
                )
            )  # fmt: skip
    adapters = [str(p) for _, p in source.subs]
    n = len(adapters)
    recipe = {"method": "average", "weights": [1 / n] * n, "params": {}}
    dtm = "dtm" if source.complete else f"dtm ({n} of {k} sub-models)"
    out.append(
        ModelRef(
            base=base, adapters=adapters, recipe=recipe, label=dtm, kind="merge",
            clustering=source.clustering, seed=seed,
        )
    )  # fmt: skip
    for name, p in source.subs:
        out.append(
            ModelRef(
                base=base, adapters=[str(p)], label=name, kind="sub",
                clustering=source.clustering, seed=seed,
            )
        )  # fmt: skip
    if registry is None:
        return out
    kept = [
        replace(merge_ref(m), clustering=source.clustering, seed=seed)
        for m in saved_merges(registry)
        if m["group"] == source.id or _same_set(m["adapters"], adapters)
    ]
    return out + unique_labels([m for m in kept if _same_path(m.base, base)], out)


def _same_set(a: list[str], b: list[str]) -> bool:
    return sorted(os.path.realpath(x) for x in a) == sorted(os.path.realpath(x) for x in b)


def saved_models(keys: list[str], registry: Registry | None = None) -> list[ModelRef]:
    """The saved merges of ``keys`` (in that order), after their base models (``base``,
    or ``base <path>`` each when they are over several)."""
    by_key = {m["key"]: m for m in saved_merges(registry)}
    merges = unique_labels([merge_ref(by_key[k]) for k in keys if k in by_key], [])
    bases = list(dict.fromkeys(m.base for m in merges))
    return [base_ref(b, "base" if len(bases) == 1 else f"base {b}") for b in bases] + merges


def folder_models(base: str, adapter: str = "", label: str = "") -> list[ModelRef]:
    """A model folder (or hub id) and, with an adapter folder, the model with it (labelled
    ``label``, by default the adapter's folder name)."""
    out = [base_ref(base)]
    if adapter:
        label = label or folder_label(adapter)
        out.append(ModelRef(base=base, adapters=[adapter], label=label, kind="baseline"))
    return out


def folder_label(adapter: str) -> str:
    """An adapter's name: its folder's, or its run's for a run's ``adapter`` folder."""
    if not adapter:
        return "model"
    p = Path(adapter)
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name or "model"


def unique_labels(merges: list[ModelRef], others: list[ModelRef]) -> list[ModelRef]:
    """Merges whose labels repeat one another's (or another model's) get their key's first
    characters: rows of one label are averaged as seeds of one model."""
    taken = [m.label for m in others]
    labels = [m.label for m in merges]
    out = []
    for m in merges:
        if labels.count(m.label) > 1 or m.label in taken:
            m = replace(m, label=f"{m.label} #{m.key[:6]}")
        out.append(m)
    return out


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def lineup_lab(models: list[ModelRef]) -> str | None:
    """The lab of every model's base, when they share one (else None: not lab models)."""
    labs = {lab_of(m.base) for m in models}
    return labs.pop() if len(labs) == 1 else None


def shrinkable(models: list[ModelRef]) -> list[ModelRef]:
    """The models whose delta can be scaled to trace a frontier: SFT and the baselines
    with one adapter."""
    return [m for m in models if m.kind in ("sft", "baseline") and len(m.adapters) == 1]


def jobs_behind(group: str, table: pd.DataFrame, store) -> list:
    """The training jobs behind a group's scores (``scores`` rows): the group's own, and
    any job whose adapter a scored model uses (experiments reuse jobs trained for
    another)."""
    used: set[str] = set()
    for m in table["model"].unique():
        used.update(ModelRef.from_json(m).adapters or [])
    return [
        j
        for j in store.list(states=("done",))
        if j.kind != "group" and (j.group == group or str(j.run_dir / "adapter") in used)
    ]


def task_options(engine: str, lab: bool, user: list[str], tasks_dir: str | None) -> list[str]:
    """The tasks a lineup can be scored on: the lab's (lab models only), then the quick
    engine's ``user`` tasks (a tasks folder's), or every task the full engine knows."""
    from dtm.evaluate import known_tasks  # lazy: torch

    lab_tasks = list(TASKS + PROBES) if lab else []  # a lab task only for a lab model
    if engine == "quick":
        return lab_tasks + user
    return lab_tasks + [
        t for t in known_tasks(tasks_dir if user else None) if t not in TASKS + PROBES
    ]
