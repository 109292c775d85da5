"""The Merge page's weights by block of layers: "same for every block" keeps the page's
sliders (one weight per sub-model); off, the layers split into B blocks (bottom first,
``dtm.merge.blocks``) and each block gets its own row of sliders, with the K x B table
drawn as a heatmap. The live score, the export and "add to Compare" take the table as
they take the sliders' weights. "Learn weights by block" (``dtm.merge.learn``) finds the
table by gradient descent on a held-out loss and sets the block sliders to it; its path
is drawn on the landscape. And the K = 4 landscape as a rotatable tetrahedron."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from dtm import charts
from dtm.charts.blocks import block_names
from dtm.errors import DTMError
from dtm.merge.blocks import DEFAULT_BLOCKS, base_layer_count
from dtm.merge.learn import learn_weights
from dtm.merge.methods import METHODS

PICKED_TABLE = "m_picked_table"  # a learned K x B table, set on the next run


def _key(i: int, b: int) -> str:
    return f"wb_{i}_{b}"


def by_block(names: list[str], weights: list[float], base: str, normalise: bool):
    """``weights`` as they are ("same for every block"), or the K x B table edited here
    (each block normalised to sum 1 with ``normalise``)."""
    k = len(names)
    picked = st.session_state.pop(PICKED_TABLE, None)
    if picked is not None and len(picked) == k:  # set before the widgets are drawn
        st.session_state["m_same_blocks"] = False
        st.session_state["m_blocks"] = len(picked[0])
        for i, row in enumerate(picked):
            for bb, v in enumerate(row):
                st.session_state[_key(i, bb)] = round(float(v), 2)
    st.session_state.setdefault("m_same_blocks", True)
    same = st.toggle(
        "same for every block",
        key="m_same_blocks",
        help="Off: a weight per sub-model for each block of layers (bottom, middle, top by "
        "default), as Heterogeneous Model Averaging and AdaMerging weigh layers apart.",
    )
    if same:
        return weights
    n_layers = base_layer_count(base) or DEFAULT_BLOCKS
    c1, c2 = st.columns([1, 3])
    st.session_state.setdefault("m_blocks", min(DEFAULT_BLOCKS, n_layers))
    blocks = int(
        c1.number_input(
            "blocks of layers",
            1,
            n_layers,
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


def learn_panel(merger, method: str, params: dict, names: list[str], objective, spec) -> None:
    """Learn the K x B weights on the chosen held-out losses (a linear method only), with
    a progress bar; the block sliders are then set to the best point."""
    held = [x for x in objective.labels() if x.startswith("heldout:")]
    why = None
    if METHODS[method].kind != "linear":
        why = f"{method} is not linear: learning follows the gradient through the LoRA scales"
    elif not held:
        why = "choose a held-out loss above: the learned weights minimise it"
    n_layers = merger.n_layers or DEFAULT_BLOCKS
    c = st.columns([1.2, 1, 1, 1.2])
    blocks = int(c[1].number_input("blocks", 1, n_layers, min(3, n_layers), key="m_learn_b"))
    steps = int(c[2].number_input("learning steps", 1, 300, 30, key="m_learn_steps"))
    if why:
        c[3].caption(why)
    if c[0].button("Learn weights by block", key="m_learn", disabled=why is not None):
        bar = st.progress(0.0, text="learning the weights")
        show = lambda s, f: bar.progress(min(f, 1.0), text=f"{s}: {f:.0%}")  # noqa: E731
        # the learned weights follow the held-out losses alone (a task has no gradient)
        heldout_only = dataclasses.replace(objective, lab_tasks=(), tasks=())
        try:
            found = learn_weights(
                merger, method, heldout_only, blocks, steps, params=params, progress=show
            )
        except DTMError as e:
            bar.empty()
            st.error(str(e))
            return
        bar.empty()
        st.session_state["m_learned"] = (spec, method, tuple(sorted(params.items())), found)
        st.session_state[PICKED_TABLE] = found["best"]["weights"]
        st.rerun()
    kept = st.session_state.get("m_learned")
    if kept and kept[:3] == (spec, method, tuple(sorted(params.items()))):
        found = kept[3]
        path, best = found["path"], found["best"]
        st.caption(
            f"Learned by block ({found['blocks']} blocks, {found['steps']} steps): held-out "
            f"loss {path[0]['loss']:.4f} at the uniform merge, {best['loss']:.4f} at its best "
            f"point (step {path.index(best)}); the block sliders are set to it, and its path "
            "is on the landscape."
        )


def learned_frame(spec, method: str, params: dict, objective) -> pd.DataFrame | None:
    """The learned path as landscape rows (each sub-model's mean weight over the blocks,
    ``from`` = ``search``), when its loss is one of the objective's columns: a single
    held-out loss and nothing else scored."""
    kept = st.session_state.get("m_learned")
    labels = list(objective.labels())
    if not kept or kept[:3] != (spec, method, tuple(sorted(params.items()))) or len(labels) != 1:
        return None
    rows = [
        {
            **{f"w{i}": sum(row) / len(row) for i, row in enumerate(p["weights"])},
            labels[0]: p["loss"],
            "objective": -p["loss"],
            "from": "search",
        }
        for p in kept[3]["path"]
    ]
    return pd.DataFrame(rows)
