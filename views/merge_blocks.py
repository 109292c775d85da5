"""The Merge page's weights by block of layers: "same for every block" keeps the page's
sliders (one weight per sub-model); off, the layers split into B blocks (bottom first,
``dtm.merge.blocks``) and each block gets its own row of sliders, with the K x B table
drawn as a heatmap. The live score, the export and "add to Compare" take the table as
they take the sliders' weights. And the K = 4 landscape as a rotatable tetrahedron."""

from __future__ import annotations

import streamlit as st

from dtm import charts
from dtm.charts.blocks import block_names
from dtm.merge.blocks import DEFAULT_BLOCKS, base_layer_count


def _key(i: int, b: int) -> str:
    return f"wb_{i}_{b}"


def by_block(names: list[str], weights: list[float], base: str, normalise: bool):
    """``weights`` as they are ("same for every block"), or the K x B table edited here
    (each block normalised to sum 1 with ``normalise``)."""
    k = len(names)
    same = st.toggle(
        "same for every block",
        True,
        key="m_same_blocks",
        help="Off: a weight per sub-model for each block of layers (bottom, middle, top by "
        "default), as Heterogeneous Model Averaging and AdaMerging weigh layers apart.",
    )
    if same:
        return weights
    n_layers = base_layer_count(base) or DEFAULT_BLOCKS
    c1, c2 = st.columns([1, 3])
    blocks = int(
        c1.number_input(
            "blocks of layers",
            1,
            n_layers,
            min(DEFAULT_BLOCKS, n_layers),
            key="m_blocks",
            help=f"the model's {n_layers} layers split into contiguous blocks, bottom first",
        )
    )
    labels = block_names(blocks)
    b = labels.index(c2.radio("block", labels, horizontal=True, key=f"m_block_sel_{blocks}"))
    for i in range(k):  # a new cell starts at the page's weight for that sub-model
        for bb in range(blocks):
            st.session_state.setdefault(_key(i, bb), round(float(weights[i]), 2))
    cols = st.columns(min(k, 4))
    for i, name in enumerate(names):
        cols[i % len(cols)].slider(f"{name} ({labels[b]})", 0.0, 1.0, step=0.01, key=_key(i, b))
    table = [[float(st.session_state[_key(i, bb)]) for bb in range(blocks)] for i in range(k)]
    if normalise:
        sums = [sum(row[bb] for row in table) for bb in range(blocks)]
        table = [[v / s if s > 0 else v for v, s in zip(row, sums, strict=True)] for row in table]
    st.plotly_chart(charts.weight_heatmap(table, names, labels), key="m_block_heatmap")
    return table


def landscape_3d(frame, metric: str, names: list[str]):
    """The K = 4 landscape as a rotatable tetrahedron: the scored points coloured by
    ``metric``, the sliders' weights and the search's points marked."""
    current = [float(st.session_state.get(f"w_{i}", 0.25)) for i in range(4)]
    found = frame[frame["from"] == "search"] if "from" in frame else None
    return charts.tetrahedron(frame, metric, names, current=current, found=found)
