"""Figures of merge weights beyond one number per sub-model: the K x B table of weights
by block of layers as a heatmap, and the K = 4 landscape as a rotatable tetrahedron.

``weight_heatmap(table, names)``: rows the sub-models, columns the blocks from the bottom
layer up, each cell its weight. ``tetrahedron(frame, value, ...)``: the 3-simplex of four
weights drawn in 3-D (the vertices of a regular tetrahedron, a point at the weights'
barycentric position), its scored points coloured by ``value``, with the current point
and the found ones marked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# A regular tetrahedron: vertex i is sub-model i alone.
VERTICES = np.array(
    [
        [1.0, 1.0, 1.0],
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
    ]
) / np.sqrt(3)


def block_names(blocks: int) -> list[str]:
    """The blocks' column names, bottom first (3: bottom, middle, top)."""
    if blocks == 3:
        return ["bottom", "middle", "top"]
    if blocks == 2:
        return ["bottom", "top"]
    return [f"block {b + 1}" for b in range(blocks)]


def weight_heatmap(table: list[list[float]], names: list[str], blocks=None):
    """The K x B weights as a heatmap (sub-models down, blocks across, bottom first),
    each cell written with its weight."""
    z = np.array(table, dtype=float)
    cols = list(blocks or block_names(z.shape[1]))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=list(names),
            zmin=0.0,
            zmax=max(1.0, float(z.max())),
            colorscale="Blues",
            text=[[f"{v:.2f}" for v in row] for row in z],
            texttemplate="%{text}",
            hovertemplate="%{y}, %{x} layers: %{z:.3f}<extra></extra>",
            colorbar={"title": "weight"},
        )
    )
    fig.update_layout(
        height=80 + 40 * len(names),
        margin={"t": 10, "l": 10, "r": 10, "b": 10},
        xaxis_title="block of layers (bottom → top)",
        yaxis={"autorange": "reversed"},
    )
    return fig


def to_3d(weights) -> np.ndarray:
    """Points of the 3-simplex (rows of four weights, normalised) in 3-D."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    w = w / np.where(w.sum(1, keepdims=True) > 0, w.sum(1, keepdims=True), 1.0)
    return w @ VERTICES


def tetrahedron(
    frame: pd.DataFrame,
    value: str,
    names: list[str],
    current: list[float] | None = None,
    found: pd.DataFrame | None = None,
):
    """The K = 4 landscape: ``frame``'s points (columns ``w0..w3`` and ``value``) inside
    the tetrahedron whose vertices are the four sub-models alone, coloured by ``value``;
    ``current`` (four weights) marked as a cross, ``found`` (rows with ``w0..w3``: a
    search's or a learned path's points) as diamonds."""
    cols = [f"w{i}" for i in range(4)]
    xyz = to_3d(frame[cols].to_numpy())
    fig = _frame(names)
    hover = [
        "<br>".join(f"{n}: {w:.2f}" for n, w in zip(names, row, strict=True)) + f"<br>{v:.4f}"
        for row, v in zip(frame[cols].to_numpy(), frame[value], strict=True)
    ]
    fig.add_trace(
        go.Scatter3d(
            x=xyz[:, 0],
            y=xyz[:, 1],
            z=xyz[:, 2],
            mode="markers",
            marker={
                "size": 5,
                "color": frame[value],
                "colorscale": "Viridis",
                "colorbar": {"title": value},
            },
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            name="scored",
        )
    )
    if found is not None and len(found):
        _marks(fig, to_3d(found[cols].to_numpy()), "found", "diamond", "orange", 6)
    if current is not None:
        _marks(fig, to_3d([current]), "current", "x", "red", 9)
    axis = {"visible": False}
    fig.update_layout(
        height=520,
        margin={"t": 10, "l": 0, "r": 0, "b": 0},
        scene={"xaxis": axis, "yaxis": axis, "zaxis": axis, "aspectmode": "data"},
    )
    return fig


def _marks(fig, p: np.ndarray, name: str, symbol: str, colour: str, size: int) -> None:
    fig.add_trace(
        go.Scatter3d(
            x=p[:, 0],
            y=p[:, 1],
            z=p[:, 2],
            mode="markers",
            marker={"size": size, "symbol": symbol, "color": colour},
            name=name,
        )
    )


def _frame(names: list[str]):
    """The tetrahedron's edges and its vertices' names."""
    fig = go.Figure()
    for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]:
        e = VERTICES[[i, j]]
        fig.add_trace(
            go.Scatter3d(
                x=e[:, 0],
                y=e[:, 1],
                z=e[:, 2],
                mode="lines",
                line={"color": "grey", "width": 2},
                hoverinfo="skip",
                showlegend=False,
            )
        )
    fig.add_trace(
        go.Scatter3d(
            x=VERTICES[:, 0] * 1.08,
            y=VERTICES[:, 1] * 1.08,
            z=VERTICES[:, 2] * 1.08,
            mode="text",
            text=list(names),
            hoverinfo="skip",
            showlegend=False,
        )
    )
    return fig
