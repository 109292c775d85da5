"""An experiment's report: which models it scores, and its tables (``jobs.md``,
``results.md``).

``experiment_models(exp, jobs)`` lists, for each seed, as ``ModelRef``s: the base model,
vanilla SFT, the shrinkage control (the SFT delta scaled by 1/K), DTM for each clustering
and each merge method (the K sub-models merged in memory, exactly), every sub-model alone
and every baseline (``dtm.lineup.launch_models`` does the same for one Train-page launch).
``results_markdown`` makes the table: mean ± std over seeds of every headline measure of
the task table, the loss-reduction ratio at the end of SFT, and wall times.

With ``evaluate.hma`` the per-block frontier's models (``dtm.controls.hma_models``: SFT's
delta scaled per block over the grid) are scored too, and with ``merge.blocks`` B each
clustering's per-block DTM merge, ``dtm-<clustering>-blocks``: the K x B weights the
learned finder (``dtm.merge.learn``) found lowest in validation loss, read from
``learned_file`` (written by ``dtm.experiment.run.learn_block_merges``). Every merge is
placed against both fronts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dtm.controls import (
    FRONTIER_GRID,
    HMA_BLOCKS,
    HMA_GRID,
    TRADE_OFFS,
    frontier_models,
    frontier_rows,
    hma_frame,
    hma_models,
    label_alphas,
    label_factor,
)
from dtm.experiment.config import experiment_dir, resolve_inputs
from dtm.lineup import base_ref
from dtm.merge.blocks import base_layer_count
from dtm.score import ModelRef
from dtm.store import read_metrics
from dtm.tasks import columns


def hma_grid(exp) -> list[float]:
    """Each block's scales of the experiment's per-block frontier (none when off)."""
    hma = exp.evaluate.get("hma", False)
    return list(HMA_GRID) if hma is True else list(hma or [])


def learned_file(exp, clustering: str, seed: int) -> Path:
    """Where the learned per-block weights of a clustering's DTM merge are kept."""
    return experiment_dir(exp.name) / "learned" / f"dtm-{clustering}-s{seed}.json"


def experiment_models(exp, jobs) -> list[ModelRef]:
    """What to score, per seed (kinds as ``dtm.score.KINDS``). Sub-models belong to a
    clustering by the clustering their job was submitted with."""
    base = resolve_inputs(exp)["base"]
    grid = exp.evaluate.get("frontier", True)
    grid = list(FRONTIER_GRID) if grid is True else list(grid or [])
    merge = exp.merge or {}
    methods = list(merge.get("methods") or ["average"])
    params = dict(merge.get("params") or {})
    out = [base_ref(base)]
    done = [j for j in jobs if j.state == "done"]
    for seed in exp.seeds:
        mine = [j for j in done if j.config.get("seed") == seed]
        sft = next((j for j in mine if j.kind == "sft"), None)
        if sft:
            adapter = [str(sft.run_dir / "adapter")]
            sft_ref = ModelRef(base=base, adapters=adapter, label="sft", seed=seed, kind="sft")
            out.append(sft_ref)
            out.append(
                ModelRef(
                    base=base, adapters=list(adapter), label=f"sft ×1/{exp.k}", seed=seed,
                    kind="control", factor=1 / exp.k,
                )
            )  # fmt: skip
            # the shrinkage frontier: SFT's delta scaled by each alpha of the grid
            out += frontier_models(sft_ref, out, grid)
            if hma_grid(exp):  # the per-block frontier: SFT's delta scaled per block
                blocks = min(HMA_BLOCKS, base_layer_count(base) or HMA_BLOCKS)
                out += hma_models(sft_ref, hma_grid(exp), blocks)
        for m in exp.methods:
            subs = sorted(
                (j for j in mine if j.kind == "sub" and j.clustering == m),
                key=lambda j: j.config["cluster"],
            )
            if len(subs) < exp.k:
                continue
            adapters = [str(j.run_dir / "adapter") for j in subs]
            for mm in methods:
                out.append(
                    ModelRef(
                        base=base,
                        adapters=adapters,
                        recipe={"method": mm, "weights": [1 / exp.k] * exp.k, "params": params},
                        label=f"dtm-{m}" if mm == "average" else f"dtm-{m}-{mm}",
                        seed=seed,
                        kind="merge",
                        clustering=m,
                    )
                )
            found = learned_file(exp, m, seed)
            if merge.get("blocks") and found.is_file():
                best = json.loads(found.read_text())["best"]
                out.append(
                    ModelRef(
                        base=base,
                        adapters=adapters,
                        recipe={"method": "average", "weights": best["weights"], "params": {}},
                        label=f"dtm-{m}-blocks",
                        seed=seed,
                        kind="merge",
                        clustering=m,
                    )
                )
            for c, a in enumerate(adapters):
                out.append(
                    ModelRef(
                        base=base, adapters=[a], label=f"sub-{m}-{c}", seed=seed, kind="sub",
                        clustering=m,
                    )
                )  # fmt: skip
        for b in exp.baselines:
            j = next((j for j in mine if j.kind == b), None)
            if j:
                out.append(
                    ModelRef(
                        base=base, adapters=[str(j.run_dir / "adapter")], label=b, seed=seed,
                        kind="baseline",
                    )
                )  # fmt: skip
    return out


def _mean_std(values: list[float], digits: int = 3) -> str:
    s = pd.Series(values, dtype=float).dropna()
    if s.empty:
        return ""
    if len(s) == 1:
        return f"{s.iloc[0]:.{digits}f}"
    return f"{s.mean():.{digits}f} ± {s.std(ddof=1):.{digits}f}"


def table_columns(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(task, metric, heading)`` of a results table: the lab's columns that are there,
    then every other task's headline (``acc``; else a held-out ``loss`` or a rolling
    task's ``bits_per_byte``, headed with the metric)."""
    have = set(zip(table["task"], table["metric"], strict=True))
    cols = [c for c in columns() if (c[0], c[1]) in have]
    lab = {c[0] for c in columns()}
    for task in dict.fromkeys(table["task"]):
        if task in lab:
            continue
        for metric in ("acc", "loss", "bits_per_byte"):
            if (task, metric) in have:
                cols.append((task, metric, task if metric == "acc" else f"{task} {metric}"))
                break
    return cols


def results_markdown(
    exp, table: pd.DataFrame, jobs, command: str, seconds: float, timings: dict | None = None
) -> str:
    """The experiment's results: mean ± std over seeds (n seeds as given)."""
    from dtm.analysis import model_order  # lazy: torch

    lines = [
        f"# {exp.name}: results",
        "",
        f"`{command}`: K={exp.k}, clusterings {', '.join(exp.methods)}, seeds {exp.seeds}, "
        f"{len(jobs)} training jobs, {seconds:.0f} s in all. Cells: mean ± std over seeds "
        "(sample std; one seed: the value). `sft ×1/K` is the shrinkage control: the SFT "
        "delta scaled by 1/K."
        + (
            f" `dtm-<clustering>-blocks`: the K x {exp.merge['blocks']} per-block weights "
            "learned on the validation rows (lowest validation loss on the path), never on "
            "the benchmarks below."
            if exp.merge.get("blocks")
            else ""
        ),
        "",
    ]
    cols = table_columns(table)
    lines.append("| model | " + " | ".join(c[2] for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    control = f"sft ×1/{exp.k}"
    grid = [x for x in model_order(table) if label_factor(x) is not None and x != control]
    for label in model_order(table):
        if label in grid or label_alphas(label) is not None:
            continue  # the frontiers' points: their own tables below
        sub = table[table["label"] == label]
        cells = [
            _mean_std(sub[(sub["task"] == t) & (sub["metric"] == k)]["value"].tolist())
            for t, k, _ in cols
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += frontier_markdown(table, grid, exp.k)
    lines += hma_markdown(table, list(dict.fromkeys(table[table["kind"] == "merge"]["label"])))
    ratios, walls, windows = [], {}, []
    for j in jobs:
        kind = j.kind
        if kind == "sft" and j.config.get("seed") not in exp.seeds:
            kind = "sft (a soup's member)"  # of a seed beyond the experiment's
        elif kind == "sft":
            recs = read_metrics(j.run_dir / "metrics.jsonl")
            if recs and recs[-1].get("loss_ratio") is not None:
                ratios.append(recs[-1]["loss_ratio"])
            windows.append((j.config.get("seed"), recs))
        if j.started and j.ended:
            walls.setdefault(kind, []).append(j.ended - j.started)
    lines += [
        "",
        f"Loss-reduction ratio ΔL_train/ΔL_val at the end of SFT, since step 0: "
        f"{_mean_std(ratios)} (seeds {len(ratios)}).",
        *ratio_lines(windows),
        "",
        "| training job | runs | wall s (mean ± std) |",
        "|---|---|---|",
    ]
    for kind, ws in sorted(walls.items()):
        lines.append(f"| {kind} | {len(ws)} | {_mean_std(ws, 1)} |")
    for what, secs in (timings or {}).items():
        lines.append(f"| ({what.replace('_', ' ')}, all models) | | {secs:.1f} |")
    return "\n".join(lines) + "\n"


def ratio_lines(runs: list[tuple[int | None, list[dict]]]) -> list[str]:
    """SFT's loss-reduction ratio by window (``analysis.ratio_windows``), one line per seed."""
    from dtm.analysis import ratio_windows  # lazy: torch

    out = []
    for seed, recs in sorted(runs, key=lambda x: (x[0] is None, x[0])):
        w = ratio_windows(recs)
        if w.empty:
            continue
        parts = []
        for r in w.to_dict("records"):
            span = f"{int(r['start'])}–{int(r['end'])}"
            if r["val_moving"]:
                parts.append(f"{span}: {r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]")
            elif r["abs_low"] is not None and r["abs_low"] == r["abs_low"]:
                parts.append(f"{span}: ≥ {r['abs_low']:.1f} (validation flat)")
            else:
                parts.append(f"{span}: -")
        out.append(
            f"- SFT seed {seed}, by window (train probe / validation, 95%): " + " · ".join(parts)
        )
    if out:
        out.insert(0, "")
    return out


def frontier_markdown(table: pd.DataFrame, grid: list[str], k: int) -> list[str]:
    """The shrinkage frontier's points and each DTM merge's place against it."""
    if not grid:
        return []
    measures = list(dict.fromkeys(m for pair in TRADE_OFFS for m in pair))
    points = sorted(
        ["base", "sft", f"sft ×1/{k}", *grid],
        key=lambda x: {"base": 0.0, "sft": 1.0}.get(x, label_factor(x)),
    )
    lines = [
        "",
        "## DTM against the shrinkage frontier",
        "",
        "The frontier: SFT's delta scaled by alpha (the base at 0, SFT at 1), per seed.",
        "",
        "| alpha | " + " | ".join(f"{t}.{m}" for t, m in measures) + " |",
        "|---|" + "---|" * len(measures),
    ]
    for label in points:
        sub = table[table["label"] == label]
        if sub.empty:
            continue
        cells = [
            _mean_std(sub[(sub["task"] == t) & (sub["metric"] == m)]["value"].tolist())
            for t, m in measures
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    merges = [x for x in dict.fromkeys(table[table["kind"] == "merge"]["label"])]
    rows = frontier_rows(table, merges)
    if rows:
        lines += [
            "",
            "Each merge against its seed's frontier: the merge's kept score minus the "
            "frontier's at the merge's gained score (mean ± std over seeds); above or below "
            "when more than two standard errors from 0, beyond when no alpha reaches the "
            "merge's gained score.",
            "",
        ]
        lines += placement_table(rows)
    return lines


def placement_table(rows: list[dict]) -> list[str]:
    """``frontier_rows`` as a Markdown table: each merge's place against a frontier."""
    lines = ["| model | kept | gained | where | distance | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        dist = "" if r["mean"] is None else f"{r['mean']:+.3f}"
        if r["std"] is not None:
            dist += f" ± {r['std']:.3f}"
        seeds = f"{r['seeds']}" + (f" (+{r['beyond']} beyond)" if r["beyond"] else "")
        lines.append(
            f"| {r['label']} | {'.'.join(r['kept'])} | {'.'.join(r['gained'])} | "
            f"{r['where']} | {dist} | {seeds} |"
        )
    return lines


def hma_markdown(table: pd.DataFrame, merges: list[str]) -> list[str]:
    """The per-block frontier's Pareto front per trade-off and each merge against it."""
    if not any(label_alphas(x) is not None for x in table["label"].unique()):
        return []
    lines = [
        "",
        "## DTM against the per-block frontier",
        "",
        "The per-block frontier (Heterogeneous Model Averaging): SFT's delta scaled per block "
        "of layers, `sft ×[bottom/middle/top]`, over a grid; its Pareto front on each "
        "trade-off (means over seeds), the shrinkage frontier's points among the candidates.",
        "",
    ]
    for kept, gained in TRADE_OFFS:
        front = hma_frame(table, kept, gained)
        if front is None or front.empty:
            continue
        pts = ", ".join(f"{r.label} ({r.gained:.3f}, {r.kept:.3f})" for r in front.itertuples())
        lines.append(f"- {'.'.join(gained)} against {'.'.join(kept)}: {pts}")
    rows = frontier_rows(table, merges, front="hma")
    if rows:
        lines += [
            "",
            "Each merge against its seed's per-block front (read as the shrinkage frontier "
            "is: the merge's kept score minus the front's at its gained score).",
            "",
        ]
        lines += placement_table(rows)
    return lines


def summary_table(jobs: list) -> str:
    """A markdown table of the jobs: state, final losses, loss ratio, wall time."""
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


def jobs_frame(jobs: list, now: float) -> pd.DataFrame:
    """The Train page's table of jobs: id, name, the group job it runs in, group, state,
    progress (a fraction), step, ETA at ``now`` and backend."""
    return pd.DataFrame(
        [
            {
                "id": j.id[:12],
                "job": j.name,
                "in job": (j.parent or "")[:12],
                "group": j.group,
                "state": j.state,
                "progress": j.fraction,
                "step": f"{j.step}/{j.total_steps or '?'}",
                "ETA": "" if (eta := j.eta_seconds(now)) is None else f"{eta:.0f} s",
                "backend": j.backend,
            }
            for j in jobs
        ]
    )
