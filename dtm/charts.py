"""Plotly figures drawn from the library's tables: pure functions, no Streamlit.

``cluster_map(table)`` expects the Disperse table (``x``, ``y``, ``cluster``,
``instruction``, ``source``); each point's ``customdata`` is its row position, so a
selection maps back to rows whatever the trace order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

PALETTE = qualitative.Plotly + qualitative.D3


def _truncate(s: pd.Series, n: int) -> pd.Series:
    s = s.str.replace(r"\s+", " ", regex=True)
    return s.where(s.str.len() <= n, s.str.slice(0, n - 1) + "…")


def cluster_map(
    table: pd.DataFrame, highlight: np.ndarray | None = None, height: int = 600
) -> go.Figure:
    """WebGL scatter of the 2-D map, one trace per cluster; ``highlight`` (bool per row)
    rings the matching points in a top trace."""
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
    for c in sorted(table["cluster"].unique()):
        idx = np.flatnonzero(table["cluster"].to_numpy() == c)
        fig.add_trace(
            go.Scattergl(
                x=table["x"].to_numpy()[idx],
                y=table["y"].to_numpy()[idx],
                mode="markers",
                name=f"cluster {c} ({len(idx)})",
                customdata=idx,
                hovertext=hover.to_numpy()[idx],
                hoverinfo="text",
                marker={"size": 5, "opacity": 0.75, "color": PALETTE[int(c) % len(PALETTE)]},
            )
        )
    if highlight is not None and highlight.any():
        idx = np.flatnonzero(highlight)
        fig.add_trace(
            go.Scattergl(
                x=table["x"].to_numpy()[idx],
                y=table["y"].to_numpy()[idx],
                mode="markers",
                name=f"search matches ({len(idx)})",
                customdata=idx,
                hovertext=hover.to_numpy()[idx],
                hoverinfo="text",
                marker={
                    "size": 11,
                    "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "black"},
                },
            )
        )
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
