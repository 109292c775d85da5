"""Controls that tell a DTM effect from mere shrinkage.

Averaging K sub-models moves the weights less than one SFT run does. ``shrink_adapter``
scales a LoRA adapter's weight delta (delta W = s * B @ A) by ``factor`` exactly, by
scaling every ``lora_B`` matrix, so "the SFT delta scaled by 1/K" can be scored beside DTM.

The per-block frontier (Heterogeneous Model Averaging, Lin et al. 2024): SFT's delta scaled
per block of layers, (alpha_bottom, alpha_middle, alpha_top) over a grid (``HMA_GRID``),
each point a one-adapter merge whose weights are a 1 x B table (``dtm.merge.blocks``;
exact, as per-layer LoRA scales), labelled ``sft ×[a/b/c]``. Its Pareto front on a
trade-off (the non-dominated points of every per-block point, the shrinkage frontier's
among them, read by linear interpolation between neighbours in gained value) is the
second control a DTM merge is placed against (``frontier_rows(..., front="hma")``).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from dtm.errors import ConfigError


def shrink_adapter(adapter_dir: str | Path, factor: float, out_dir: str | Path) -> Path:
    """Write a copy of a LoRA adapter whose delta is ``factor`` times the original: a peft
    LoRA folder, or a LoRAMoE one (``dtm.moe``: every expert's B scaled, the router kept,
    so each token's mixture of experts is the same and its delta is scaled)."""
    from safetensors.torch import load_file, save_file

    from dtm import moe  # lazy: torch

    src, out = Path(adapter_dir), Path(out_dir)
    config, weights, b_key = "adapter_config.json", "adapter_model.safetensors", ".lora_B."
    if moe.is_adapter_folder(src):
        config, weights, b_key = moe.CONFIG, moe.WEIGHTS, ".lora_B"
    if not (src / weights).exists() or not (src / config).exists():
        raise ConfigError(
            f"{src}: not a peft adapter folder (adapter_config.json and "
            "adapter_model.safetensors expected) nor a LoRAMoE one."
        )
    tensors = load_file(src / weights)
    if not any(b_key in k for k in tensors):
        raise ConfigError(f"{src}: no LoRA B matrices found; only LoRA adapters can be scaled.")
    scaled = {k: (v * factor if b_key in k else v) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / config, out / config)
    save_file(scaled, out / weights, metadata={"format": "pt"})
    return out


def is_scaled(folder: str | Path) -> bool:
    """Whether ``shrink_adapter`` has written ``folder`` (either kind of adapter)."""
    from dtm import moe  # lazy: torch

    return any((Path(folder) / w).exists() for w in ("adapter_model.safetensors", moe.WEIGHTS))


# The grid the shrinkage frontier is traced on: alpha = 0 is the base model, 1 is SFT.
FRONTIER_GRID = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0)
# The trade-offs a frontier is read on: (kept measure, gained measure).
TRADE_OFFS = (
    (("lab_knowledge", "acc"), ("lab_bias", "format")),
    (("lab_reasoning", "acc"), ("lab_bias", "format")),
    (("lab_knowledge", "acc"), ("lab_instruct", "acc")),
    (("lab_reasoning", "acc"), ("lab_instruct", "acc")),
)


# The grid each block's scale takes on the per-block frontier (3 blocks: 27 points, of
# which the 3 with one scale everywhere are the base, SFT x0.5 and SFT).
HMA_GRID = (0.0, 0.5, 1.0)
HMA_BLOCKS = 3


def hma_label(alphas, source: str = "sft") -> str:
    """``sft ×[0/0.5/1]``: ``source``'s delta scaled by ``alphas``, bottom block first."""
    return f"{source} ×[{'/'.join(f'{a:g}' for a in alphas)}]"


def label_alphas(label: str, source: str = "sft") -> tuple[float, ...] | None:
    """The per-block scales of a per-block control's label (``hma_label``'s inverse);
    None for any other label."""
    prefix = f"{source} ×["
    if not (label.startswith(prefix) and label.endswith("]")):
        return None
    try:
        return tuple(float(x) for x in label[len(prefix) : -1].split("/"))
    except ValueError:
        return None


def hma_models(source, grid=HMA_GRID, blocks: int = HMA_BLOCKS) -> list:
    """The models that trace ``source``'s per-block frontier (``ModelRef``s; ``source``
    has one adapter): every ``blocks``-tuple of ``grid`` scales but those with one scale
    in every block (the shrinkage frontier's), each a one-adapter ``linear`` merge whose
    weights are the 1 x B table of the scales, labelled ``hma_label``."""
    import itertools

    out = []
    for alphas in itertools.product(sorted(set(grid)), repeat=blocks):
        if len(set(alphas)) == 1:
            continue
        out.append(
            replace(
                source,
                label=hma_label(alphas, source.label),
                kind="control",
                adapters=list(source.adapters),
                recipe={"method": "linear", "weights": [list(map(float, alphas))], "params": {}},
                clustering=None,
                factor=None,
            )
        )
    return out


def pareto_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (gained, kept) points no other point beats on both (higher is better), in
    order of gained value."""
    front = [
        (g, k)
        for g, k in set(points)
        if not any(g2 >= g and k2 >= k and (g2, k2) != (g, k) for g2, k2 in points)
    ]
    return sorted(front)


def hma_points(table, seed, kept, gained, source: str = "sft") -> list[tuple[float, float]]:
    """``[(gained, kept)]`` of one seed's per-block points: the per-block controls, the
    shrinkage frontier's points (the base and ``source`` among them)."""
    same = table["seed"].isna() if seed is None else table["seed"] == seed
    rows = table[same | (table["label"] == "base")]
    mine = rows[[label_alphas(x, source) is not None for x in rows["label"]]]
    out = [(g, k) for _, g, k in frontier_points(table, seed, kept, gained, source)]
    for label in set(mine["label"]):
        sub = mine[mine["label"] == label]
        g = sub[(sub["task"] == gained[0]) & (sub["metric"] == gained[1])]["value"]
        k = sub[(sub["task"] == kept[0]) & (sub["metric"] == kept[1])]["value"]
        if len(g) and len(k):
            out.append((float(g.mean()), float(k.mean())))
    return out


def frontier_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The frontier's kept value at a gained value ``x``: ``points`` are the (gained,
    kept) pairs of the scaled SFT models, in order of alpha. The curve is their upper
    envelope in kept value, read by linear interpolation between neighbouring alphas;
    None where no alpha's segment reaches ``x`` (the frontier does not go that far)."""
    best = None
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        lo, hi = min(x0, x1), max(x0, x1)
        if not lo <= x <= hi:
            continue
        y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if x1 == x0:
            y = max(y0, y1)
        best = y if best is None else max(best, y)
    return best


def frontier_position(distances: list[float], beyond: int = 0) -> dict:
    """Where a model lies against the frontier, from its per-seed distances (the model's
    kept value minus the frontier's at the model's gained value). ``above`` or ``below``
    when the mean distance is more than two standard errors from 0 (with one seed: more
    than 0.01, the lab scores' resolution), else ``on``; ``beyond`` when in ``beyond`` of
    the seeds the model's gained value is past every alpha's reach."""
    import statistics

    out = {"seeds": len(distances), "beyond": beyond, "mean": None, "std": None, "where": "beyond"}
    if not distances:
        return out
    mean = statistics.fmean(distances)
    std = statistics.stdev(distances) if len(distances) > 1 else None
    margin = 2 * std / len(distances) ** 0.5 if std is not None else 0.01
    where = "above" if mean > margin else "below" if mean < -margin else "on"
    out.update(mean=mean, std=std, where=where)
    return out


def control_label(factor: float, k: int | None = None, source: str = "sft") -> str:
    """``sft ×1/K`` for the 1/K control, ``sft ×0.4`` for a point of the frontier (of the
    model labelled ``source``)."""
    if k and abs(factor - 1 / k) < 1e-9:
        return f"{source} ×1/{k}"
    return f"{source} ×{factor:g}"


def label_factor(label: str, source: str = "sft") -> float | None:
    """The scale of a control's label (``control_label``'s inverse); None for others."""
    if not label.startswith(f"{source} ×"):
        return None
    text = label.removeprefix(f"{source} ×")
    try:
        if text.startswith("1/"):
            return 1 / float(text[2:])
        return float(text)
    except ValueError:
        return None


def frontier_points(
    table, seed, kept: tuple[str, str], gained: tuple[str, str], source: str = "sft"
):
    """``[(alpha, gained, kept)]`` of one seed's scores (``score.scores`` rows; ``seed``
    None: rows without a seed): the base (alpha 0), the scaled models and the model
    ``source`` itself (alpha 1), in order of alpha."""
    same = table["seed"].isna() if seed is None else table["seed"] == seed
    rows = table[same | (table["label"] == "base")]
    value: dict[tuple[str, str, str], float] = {
        (r.label, r.task, r.metric): r.value for r in rows.itertuples()
    }
    alphas = {"base": 0.0, source: 1.0}
    alphas |= {lab: f for lab in set(rows["label"]) if (f := label_factor(lab, source)) is not None}
    out = []
    for lab, a in alphas.items():
        g, k = value.get((lab, *gained)), value.get((lab, *kept))
        if g is not None and k is not None:
            out.append((a, g, k))
    return sorted(set(out))


def frontier_rows(
    table, labels: list[str], source: str = "sft", trade_offs=TRADE_OFFS, front: str = "shrinkage"
) -> list[dict]:
    """Each model of ``labels`` against the shrinkage frontier (``front="hma"``: the
    per-block frontier's Pareto front) of its own seed's ``source`` model, per trade-off:
    ``label, kept, gained, front, where, mean, std, seeds, beyond`` (``mean``/``std``: the
    distance in kept value over seeds, ``frontier_position``). Models without a seed are
    read against the frontier of the rows without one."""
    out = []
    for label in labels:
        mine = table[table["label"] == label]
        seeds = sorted(set(mine["seed"].dropna())) or ([None] if len(mine) else [])
        for kept, gained in trade_offs:
            distances, beyond = [], 0
            for seed in seeds:
                if front == "hma":
                    curve = pareto_points(hma_points(table, seed, kept, gained, source))
                else:
                    pts = frontier_points(table, seed, kept, gained, source)
                    curve = [(g, k) for _, g, k in pts]
                me = mine[mine["seed"].isna() if seed is None else mine["seed"] == seed]
                me = me.groupby(["task", "metric"])["value"].mean()
                # a Pareto front may be one point (it dominates every other): read at it
                least = 1 if front == "hma" else 2
                if len(curve) < least or kept not in me.index or gained not in me.index:
                    continue
                y = frontier_at(curve, float(me[gained]))
                if y is None:
                    beyond += 1
                else:
                    distances.append(float(me[kept]) - y)
            if distances or beyond:
                pos = frontier_position(distances, beyond)
                out.append({"label": label, "kept": kept, "gained": gained, "front": front, **pos})
    return out


def frontier_models(source, have: list, grid=FRONTIER_GRID) -> list:
    """The models that trace ``source``'s shrinkage frontier (``dtm.score.ModelRef``s:
    ``source`` has one adapter): its delta scaled by each alpha of ``grid`` inside (0, 1),
    labelled ``<source> ×alpha``, except the scales a control in ``have`` already has."""
    taken = {
        round(m.factor, 9)
        for m in have
        if m.kind == "control" and m.factor is not None and m.adapters == source.adapters
        and m.seed == source.seed
    }  # fmt: skip
    return [
        replace(
            source,
            label=control_label(a, source=source.label),
            kind="control",
            adapters=list(source.adapters),
            recipe=None,
            clustering=None,
            factor=a,
        )
        for a in grid
        if 0 < a < 1 and round(a, 9) not in taken
    ]


def frontier_sources(labels) -> list[str]:
    """The labels whose frontier a table holds (some ``<label> ×alpha`` among ``labels``)."""
    import re

    found = (re.match(r"^(.*) ×(?:1/\d+|[\d.]+)$", str(x)) for x in labels)
    return list(dict.fromkeys(m.group(1) for m in found if m and m.group(1) in set(labels)))


def tradeoff_frames(table, kept: tuple[str, str], gained: tuple[str, str], source: str = "sft"):
    """``(frontier, points)`` for ``charts.tradeoff``: the frontier of ``source`` (alpha,
    gained, kept: means over seeds) and every other model (label, gained, kept and their
    std over seeds)."""
    import pandas as pd

    def pick(measure):
        t, m = measure
        return table[(table["task"] == t) & (table["metric"] == m)].groupby("label")["value"]

    g, k = pick(gained), pick(kept)
    both = pd.DataFrame(
        {"gained": g.mean(), "kept": k.mean(), "gained_std": g.std(), "kept_std": k.std()}
    ).dropna(subset=["gained", "kept"])
    alpha = {"base": 0.0, source: 1.0}
    alpha |= {x: f for x in both.index if (f := label_factor(x, source)) is not None}
    front = both.loc[[x for x in alpha if x in both.index], ["gained", "kept"]]
    front = front.assign(alpha=[alpha[x] for x in front.index]).sort_values("alpha")
    blocks = [x for x in both.index if label_alphas(x, source) is not None]
    points = both.drop(index=[x for x in alpha if x in both.index and x != source] + blocks)
    points = points.rename_axis("label").reset_index()
    return front.rename_axis("label").reset_index(), points


def hma_frame(table, kept: tuple[str, str], gained: tuple[str, str], source: str = "sft"):
    """The per-block frontier's Pareto front for ``charts.tradeoff`` (label, gained, kept:
    means over seeds, in order of gained value), or None when the table has no per-block
    control of ``source``."""
    import pandas as pd

    labels = [x for x in table["label"].unique() if label_alphas(x, source) is not None]
    if not labels:
        return None
    shrink = {"base", source} | {
        x for x in table["label"].unique() if label_factor(x, source) is not None
    }
    rows = []
    for label in [*labels, *sorted(shrink)]:
        sub = table[table["label"] == label]
        g = sub[(sub["task"] == gained[0]) & (sub["metric"] == gained[1])]["value"]
        k = sub[(sub["task"] == kept[0]) & (sub["metric"] == kept[1])]["value"]
        if len(g) and len(k):
            rows.append({"label": label, "gained": float(g.mean()), "kept": float(k.mean())})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    front = set(pareto_points(list(zip(frame["gained"], frame["kept"], strict=True))))
    keep = [(g, k) in front for g, k in zip(frame["gained"], frame["kept"], strict=True)]
    return frame[keep].drop_duplicates(["gained", "kept"]).sort_values("gained")
