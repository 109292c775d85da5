"""Figures of the results (Compare and the Home story): scores by measure, loss-ratio
curves and windows, what a merge keeps, trade-offs against a frontier, the alignment-tax
curve, token-level bias; and a figure as PNG or SVG bytes."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dtm.charts.palette import PALETTE
from dtm.errors import ConfigError
from dtm.tasks import short


def score_bars(summary: pd.DataFrame, measures: list[tuple[str, str]], labels: list[str]):
    """Grouped bars: one group per measure, one bar per model (mean over seeds, error bar
    = std over seeds where there are several)."""
    fig = go.Figure()

    names = [f"{short(t)}.{m}" if m != "acc" else short(t) for t, m in measures]
    for i, label in enumerate(labels):
        means, stds = [], []
        for t, m in measures:
            hit = summary[
                (summary["label"] == label) & (summary["task"] == t) & (summary["metric"] == m)
            ]
            means.append(hit["mean"].iloc[0] if len(hit) else None)
            stds.append(hit["std"].iloc[0] if len(hit) else None)
        fig.add_trace(
            go.Bar(
                name=label,
                x=names,
                y=means,
                error_y={
                    "type": "data",
                    "array": [0 if pd.isna(s) else s for s in stds],
                    "visible": any(s is not None and not pd.isna(s) for s in stds),
                },
                marker_color=PALETTE[i % len(PALETTE)],
            )
        )
    fig.update_layout(
        barmode="group",
        height=420,
        yaxis_title="score",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
        legend_title="model",
    )
    return fig


def reference_bars(ref: pd.DataFrame):
    """The paper's reported numbers (percent), hatched: a reference, not a measurement."""
    fig = go.Figure()
    for i, label in enumerate(dict.fromkeys(ref["label"])):
        part = ref[ref["label"] == label]
        fig.add_trace(
            go.Bar(
                name=f"{label} (reported)",
                x=part["task"],
                y=part["value"],
                marker_color=PALETTE[i % len(PALETTE)],
                marker_pattern_shape="/",
            )
        )
    fig.update_layout(
        barmode="group",
        height=380,
        yaxis_title="reported score (%)",
        title="Reported by Fu et al. (2024), Llama-2-7b: not measured here",
        margin={"t": 50, "l": 10, "r": 10, "b": 10},
    )
    return fig


def ratio_curves(frame: pd.DataFrame, column: str = "loss_ratio"):
    """ΔL_train/ΔL_val against step, one line per run (``analysis.loss_ratio_curves``)."""
    fig = go.Figure()
    for i, (run, part) in enumerate(frame.groupby("run", sort=False)):
        part = part.dropna(subset=[column])
        fig.add_trace(
            go.Scatter(
                x=part["step"],
                y=part[column],
                mode="lines+markers",
                name=run,
                line={
                    "width": 3 if run.startswith("sft") else 1.5,
                    "color": PALETTE[i % len(PALETTE)],
                },
            )
        )
    fig.add_hline(y=1, line_dash="dot", line_color="grey", annotation_text="ratio 1")
    fig.update_layout(
        height=380,
        xaxis_title="step",
        yaxis_title="ΔL_train / ΔL_val",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
    )
    return fig


def ratio_windows_chart(frame: pd.DataFrame):
    """The windowed loss-reduction ratio (``analysis.ratio_windows`` rows with a ``run``
    column): a point per window where the validation loss moves, at the window's middle
    step, with its interval; where it does not move, a triangle at the bound the ratio's
    size is above (``abs_low``), or a cross on the axis when there is none."""
    fig = go.Figure()
    for i, (run, part) in enumerate(frame.groupby("run", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        mid = (part["start"] + part["end"]) / 2
        ok = part["val_moving"].astype(bool)
        fig.add_trace(
            go.Scatter(
                x=mid[ok],
                y=part["ratio"][ok],
                mode="lines+markers",
                name=run,
                line={"color": colour},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (part["high"] - part["ratio"])[ok],
                    "arrayminus": (part["ratio"] - part["low"])[ok],
                },
                customdata=part[["start", "end"]][ok].to_numpy(),
                hovertemplate="steps %{customdata[0]}–%{customdata[1]}: %{y:.2f}<extra>"
                + run
                + "</extra>",
            )
        )
        bound = ~ok & part["abs_low"].notna()
        if bound.any():
            fig.add_trace(
                go.Scatter(
                    x=mid[bound],
                    y=part["abs_low"][bound],
                    mode="markers",
                    marker={"symbol": "triangle-up", "size": 12, "color": colour},
                    name=f"{run}: validation flat, |ratio| above",
                    hovertemplate="|ratio| ≥ %{y:.1f} (95%)<extra>" + run + "</extra>",
                )
            )
        none = ~ok & part["abs_low"].isna()
        if none.any():
            fig.add_trace(
                go.Scatter(
                    x=mid[none],
                    y=[0] * int(none.sum()),
                    mode="markers",
                    marker={"symbol": "x-thin-open", "size": 10, "color": colour},
                    name=f"{run}: both losses within their noise",
                )
            )
    fig.add_hline(y=1, line_dash="dot", line_color="grey", annotation_text="ratio 1")
    fig.update_layout(
        height=380,
        xaxis_title="step (middle of the window)",
        yaxis_title="ΔL_train probe / ΔL_val",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
    )
    return fig


def keeps_chart(frame: pd.DataFrame, k: int):
    """What the merge keeps and forgets (``story.keeps_frame``): per family, its
    favourite's uptake above the base for SFT, its own sub-model, DTM and SFT ×1/K, and the
    shared format's gain; a tick marks 1/K of the own sub-model's (the sub-models' mean
    for the format): what an average keeps of something one member alone learnt."""
    fig = go.Figure()
    roles = ["SFT", "own sub-model", "sub-model", "DTM", "SFT ×1/K"]
    for i, role in enumerate(roles):
        part = frame[frame["role"] == role]
        if role == "sub-model":
            part = part.groupby("what", as_index=False)["value"].mean()
            name = "sub-models (mean)"
        else:
            name = role
        if part.empty:
            continue
        fig.add_trace(go.Bar(name=name, x=part["what"], y=part["value"], marker_color=PALETTE[i]))
    ref = frame[frame["role"].isin(["own sub-model", "sub-model"])]
    ref = ref.groupby("what", as_index=False)["value"].mean()
    fig.add_trace(
        go.Scatter(
            x=ref["what"],
            y=ref["value"] / k,
            mode="markers",
            marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3}, "color": "black"},
            name=f"1/K of the sub-model's (K={k})",
        )
    )
    fig.update_layout(
        barmode="group",
        height=400,
        yaxis_title="above the base model",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
    )
    return fig


def alpha_labels(alphas, gap: float = 0.1) -> list[str]:
    """``α=0.25``: each alpha rounded to two places; one closer than ``gap`` to an alpha
    already labelled gets none (its value shows on hover), so no two labels overlap."""
    out, shown = [], []
    for a in map(float, alphas):
        if any(abs(a - b) < gap for b in shown):
            out.append("")
            continue
        shown.append(a)
        out.append(f"α={round(a, 2):g}")
    return out


def tradeoff(
    frontier: pd.DataFrame,
    points: pd.DataFrame,
    kept: str,
    gained: str,
    hma: pd.DataFrame | None = None,
):
    """The shrinkage frontier on a trade-off chart: ``frontier`` rows (``alpha, gained,
    kept``, means over seeds) drawn as a line labelled by alpha; ``points`` rows (``label,
    gained, kept, gained_std, kept_std``) as markers with their std over seeds; ``hma``
    (``label, gained, kept``: the per-block frontier's Pareto front, ``controls.hma_frame``)
    as a second, dotted line."""
    fig = go.Figure()
    if hma is not None and len(hma):
        fig.add_trace(
            go.Scatter(
                x=hma["gained"],
                y=hma["kept"],
                mode="lines+markers",
                text=list(hma["label"]),
                hovertemplate="%{text}<br>%{x:.3f}, %{y:.3f}<extra></extra>",
                line={"color": "black", "dash": "dot"},
                marker={"symbol": "diamond", "size": 7},
                name="per-block frontier (SFT × α per block, Pareto front)",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=frontier["gained"],
            y=frontier["kept"],
            mode="lines+markers+text",
            text=alpha_labels(frontier["alpha"]),
            customdata=frontier["alpha"],
            hovertemplate="α=%{customdata:.3g}<extra></extra>",
            textposition="bottom left",
            line={"color": "grey", "dash": "dash"},
            name="shrinkage frontier (SFT × α)",
        )
    )
    for i, r in enumerate(points.itertuples()):
        fig.add_trace(
            go.Scatter(
                x=[r.gained],
                y=[r.kept],
                mode="markers",
                marker={"size": 11, "color": PALETTE[i % len(PALETTE)]},
                error_x={
                    "type": "data",
                    "array": [r.gained_std or 0],
                    "visible": bool(r.gained_std),
                },
                error_y={"type": "data", "array": [r.kept_std or 0], "visible": bool(r.kept_std)},
                name=r.label,
            )
        )
    fig.update_layout(
        height=420,
        xaxis_title=f"{gained} (gained by tuning)",
        yaxis_title=f"{kept} (kept from the base)",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
    )
    return fig


def tax_curve(
    frame: pd.DataFrame,
    base_levels: dict[str, float] | None = None,
    x: str = "step",
    x_max: float | None = None,
):
    """Each benchmark against training step (``analysis.alignment_tax_curve``), the base
    model's level as a dashed line of the same colour; ``x_max``: the x-axis runs from 0
    to it (the whole run, before its last points exist)."""
    fig = go.Figure()
    for i, (task, part) in enumerate(frame.groupby("task", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=part[x], y=part["value"], mode="lines+markers", name=task, line={"color": colour}
            )
        )
        level = (base_levels or {}).get(task)
        if level is not None:
            fig.add_hline(y=level, line_dash="dash", line_color=colour, opacity=0.6)
    fig.update_layout(
        height=400,
        xaxis_title=x.replace("fraction", "fraction of SFT"),
        yaxis_title="score (dashed: base model)",
        margin={"t": 30, "l": 10, "r": 10, "b": 10},
    )
    if x_max:
        fig.update_xaxes(range=[0, x_max * 1.02])
    return fig


def token_bias_bars(frame: pd.DataFrame, top: int = 20, title: str = ""):
    """The ``top`` tokens by train-minus-validation loss drop: both drops side by side."""
    part = frame.head(top)
    fig = go.Figure(
        [
            go.Bar(name="loss drop on training text", x=part["token"], y=part["train_drop"]),
            go.Bar(name="loss drop on validation text", x=part["token"], y=part["val_drop"]),
        ]
    )
    fig.update_layout(
        barmode="group",
        height=380,
        title=title,
        yaxis_title="early − late loss",
        margin={"t": 50, "l": 10, "r": 10, "b": 10},
    )
    return fig


def figure_bytes(fig, fmt: str) -> bytes:
    """The figure as PNG or SVG (rendered by kaleido with a local Chrome or Chromium)."""

    try:
        return fig.to_image(format=fmt, width=1000, height=fig.layout.height or 450, scale=1)
    except Exception as e:  # kaleido raises its own types when no browser is found
        raise ConfigError(
            f"cannot render {fmt.upper()}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
            "(kaleido needs Chrome or Chromium: `apt install chromium` or "
            "`plotly_get_chrome`). The camera icon in the chart's toolbar saves a PNG."
        ) from e
