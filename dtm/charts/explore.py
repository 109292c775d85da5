"""Figures of the steps before the results: the Disperse map, cluster sizes and what
each cluster holds, the training curves, and the merge landscapes (simplex, Pareto
front, a 2-D slice).

``cluster_map(table)`` expects the Disperse table (``x``, ``y``, ``cluster``,
``instruction``, ``source``); each point's ``customdata`` is its row position, so a
selection maps back to rows whatever the trace order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from dtm.charts.palette import PALETTE

# What a cluster holds is coloured apart from the clusters themselves (PALETTE), so a
# source or task is never read as a cluster; what the counts do not name is grey.
VALUE_COLOURS = qualitative.Set2 + qualitative.Pastel1
GREYS = {"(other)": "#9e9e9e", "(none)": "#d0d0d0"}


def _truncate(s: pd.Series, n: int) -> pd.Series:
    s = s.str.replace(r"\s+", " ", regex=True)
    return s.where(s.str.len() <= n, s.str.slice(0, n - 1) + "…")


def cluster_map(
    table: pd.DataFrame,
    highlight: np.ndarray | None = None,
    height: int = 600,
    kept: np.ndarray | None = None,
    kept_name: str = "curated",
) -> go.Figure:
    """WebGL scatter of the 2-D map, one trace per cluster; ``highlight`` (bool per row)
    rings the matching points in a top trace; ``kept`` (bool per row) marks a curate
    selection's kept rows with open diamonds in a trace named ``kept_name``."""
    hover = (
        "<b>"
        + table["id"].astype(str)
        + "</b> · cluster "
        + table["cluster"].astype(str)
        + "<br>"
        + _truncate(table["instruction"], 120).str.replace("<", "&lt;")
        + "<br><i>"
        + table["source"].replace("", "(no source)")
        + "</i>"
    )
    fig = go.Figure()

    def points(idx, name, marker):  # one trace of the rows at positions idx
        fig.add_trace(
            go.Scattergl(
                x=table["x"].to_numpy()[idx],
                y=table["y"].to_numpy()[idx],
                mode="markers",
                name=name,
                customdata=idx,
                hovertext=hover.to_numpy()[idx],
                hoverinfo="text",
                marker=marker,
            )
        )

    for c in sorted(table["cluster"].unique()):
        idx = np.flatnonzero(table["cluster"].to_numpy() == c)
        color = PALETTE[int(c) % len(PALETTE)]
        points(idx, f"cluster {c} ({len(idx)})", {"size": 5, "opacity": 0.75, "color": color})
    if kept is not None:
        idx = np.flatnonzero(kept)
        diamond = {"size": 9, "symbol": "diamond-open", "color": "#8b0000", "line": {"width": 1.5}}
        points(idx, f"{kept_name} ({len(idx)} kept)", diamond)
    if highlight is not None and highlight.any():
        idx = np.flatnonzero(highlight)
        ring = {"size": 11, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "black"}}
        points(idx, f"search matches ({len(idx)})", ring)
    fig.update_layout(
        height=height,
        dragmode="lasso",
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"itemsizing": "constant"},
        xaxis={"visible": False},
        yaxis={"visible": False},
        title="UMAP of the embeddings, coloured by cluster",
    )
    return fig


def cluster_sizes(sizes: list[int]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=[f"cluster {c}" for c in range(len(sizes))],
            y=sizes,
            marker_color=[PALETTE[c % len(PALETTE)] for c in range(len(sizes))],
            text=sizes,
            textposition="outside",
        )
    )
    fig.update_layout(
        height=280,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        title="Cluster sizes",
        yaxis_title="rows",
    )
    return fig


def composition_order(*counts: list[dict[str, int]]) -> list[str]:
    """Every value named in one or more clusters' counts (``clusters.json`` ``sources`` or
    ``tasks``), largest total first, the unnamed ones last: one colour per value across
    charts drawn side by side."""
    total: dict[str, int] = {}
    for per_cluster in counts:
        for d in per_cluster:
            for v, n in d.items():
                total[v] = total.get(v, 0) + n
    return sorted(total, key=lambda v: (v in GREYS, -total[v], v))


def composition_bars(
    counts: list[dict[str, int]],
    title: str,
    order: list[str] | None = None,
    y_max: int | None = None,
) -> go.Figure:
    """One stacked bar per cluster: its rows by value (``counts[c]``: value -> rows), one
    trace per value in ``order`` (default ``composition_order(counts)``); ``y_max`` gives
    charts drawn side by side one scale."""
    order = order or composition_order(counts)
    x = [f"cluster {c}" for c in range(len(counts))]
    sizes = [sum(d.values()) for d in counts]
    fig = go.Figure()
    for i, v in enumerate(order):
        y = [d.get(v, 0) for d in counts]
        label = v.replace("<", "&lt;")  # a value is data: never markup
        share = [n / s if s else 0.0 for n, s in zip(y, sizes, strict=True)]
        fig.add_trace(
            go.Bar(
                x=x,
                y=y,
                name=label,
                marker_color=GREYS.get(v, VALUE_COLOURS[i % len(VALUE_COLOURS)]),
                customdata=share,
                text=[n or "" for n in y],
                textposition="inside",
                textangle=0,
                hovertemplate="%{x}: %{y} rows of " + label + " (%{customdata:.0%})<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        height=340,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        title=title,
        yaxis={"title": "rows", "range": [0, y_max * 1.02] if y_max else None},
        legend={"traceorder": "normal"},
    )
    return fig


def selected_rows(selection: dict | None) -> list[int]:
    """Row positions from a Plotly selection event (``points[*].customdata``)."""
    if not selection:
        return []
    rows = set()
    for p in selection.get("points", []):
        cd = p.get("customdata")
        if isinstance(cd, list):
            cd = cd[0] if cd else None
        if cd is not None:
            rows.add(int(cd))
    return sorted(rows)


def loss_curves(curves: dict[str, list[dict]], metric: str = "val_loss"):
    """One line per run of ``metric`` against step. ``curves``: run name -> metrics records
    (``step`` and ``metric``; soup members are drawn as separate lines)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, recs in curves.items():
        members = sorted({r.get("member") for r in recs}, key=lambda m: -1 if m is None else m)
        for m in members:
            pts = [r for r in recs if r.get("member") == m and r.get(metric) is not None]
            if not pts:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r["step"] for r in pts],
                    y=[r[metric] for r in pts],
                    mode="lines+markers",
                    name=name if m is None else f"{name} member {m}",
                    marker={"size": 4},
                )
            )
    fig.update_layout(
        height=320,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis_title="step",
        yaxis_title=metric.replace("_", " "),
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def ternary(frame, names: list[str], metric: str):
    """The K=3 merge landscape: each weight vector on the simplex, coloured by ``metric``;
    ``customdata`` is the row index (a click selects it)."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatterternary(
            a=frame["w0"],
            b=frame["w1"],
            c=frame["w2"],
            mode="markers",
            marker={
                "size": 11,
                "color": frame[metric],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": metric},
            },
            customdata=list(range(len(frame))),
            hovertemplate="w=(%{a:.2f}, %{b:.2f}, %{c:.2f})<br>"
            + f"{metric} %{{marker.color:.3f}}<extra></extra>",
        )
    )
    fig.update_layout(
        ternary={
            "aaxis": {"title": names[0]},
            "baxis": {"title": names[1]},
            "caxis": {"title": names[2]},
        },
        height=480,
        margin={"l": 40, "r": 40, "t": 40, "b": 40},
    )
    return fig


def distance_from_uniform(frame) -> list[float]:
    """Each row's weights' distance from the uniform merge (Euclidean, over the ``w<i>``
    columns, each row normalised to sum 1), as a share of a single sub-model's: 0 is the
    uniform merge, 1 a vertex."""
    import numpy as np

    cols = [c for c in frame.columns if c.startswith("w") and c[1:].isdigit()]
    w = frame[cols].to_numpy(dtype=float)
    w = w / np.clip(w.sum(axis=1, keepdims=True), 1e-12, None)
    k = len(cols)
    vertex = np.sqrt((1 - 1 / k) ** 2 + (k - 1) / k**2)
    return list(np.linalg.norm(w - 1 / k, axis=1) / vertex)


def by_distance(frame, names: list[str], metric: str):
    """K > 4: ``metric`` against the weights' distance from the uniform merge
    (``distance_from_uniform``), coloured by ``metric`` (its scale on the right, the
    legend above the plot), the search's points marked apart from the landscape's;
    ``customdata`` is the row index."""
    import plotly.graph_objects as go

    cols = [c for c in frame.columns if c.startswith("w") and c[1:].isdigit()]
    dist = distance_from_uniform(frame)
    text = [
        " · ".join(f"{n} {r[c]:.2f}" for n, c in zip(names, cols, strict=True))
        for _, r in frame.iterrows()
    ]
    fig = go.Figure()
    origin = frame["from"] if "from" in frame else ["grid"] * len(frame)
    for kind, symbol in (("grid", "circle"), ("search", "diamond")):
        rows = [i for i, o in enumerate(origin) if (o == "search") == (kind == "search")]
        if not rows:
            continue
        fig.add_trace(
            go.Scatter(
                x=[dist[i] for i in rows],
                y=frame[metric].iloc[rows],
                mode="markers",
                marker={
                    "size": 9,
                    "symbol": symbol,
                    "color": frame[metric].iloc[rows],
                    "colorscale": "Viridis",
                    "cmin": float(frame[metric].min()),
                    "cmax": float(frame[metric].max()),
                    "showscale": kind == "grid",
                    "colorbar": {"title": metric, "x": 1.02},
                },
                customdata=rows,
                text=[text[i] for i in rows],
                hovertemplate="%{text}<br>distance %{x:.2f}<br>"
                + f"{metric} %{{y:.3f}}<extra></extra>",
                name="landscape" if kind == "grid" else "search",
            )
        )
    fig.update_layout(
        height=460,
        xaxis={"title": "distance from the uniform merge (1: a single sub-model)",
               "range": [-0.02, 1.02]},
        yaxis_title=metric,
        legend={"orientation": "h", "y": 1.08, "x": 0},
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )  # fmt: skip
    return fig


def weight_slice(frame, i: int, j: int, names: list[str], metric: str):
    """A 2-D slice of the merge landscape: ``metric`` over (w_i, w_j), the other weights
    fixed; ``customdata`` is the row index."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(
            x=frame[f"w{i}"],
            y=frame[f"w{j}"],
            mode="markers",
            marker={
                "symbol": "square",
                "size": 26,
                "color": frame[metric],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": metric},
            },
            customdata=list(range(len(frame))),
            hovertemplate=f"{names[i]} %{{x:.2f}}<br>{names[j]} %{{y:.2f}}<br>{metric} "
            "%{marker.color:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=420,
        xaxis_title=f"weight of {names[i]}",
        yaxis_title=f"weight of {names[j]}",
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
    )
    return fig


# ------------------------------------------------------------------ Compare page
