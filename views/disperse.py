"""Page 1 - Disperse: the instruction data, embedded, clustered into K subsets, mapped."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dtm import charts
from dtm.cluster import METHODS, composition_sentence
from dtm.curate import kept_mask, read_selection, selections_for
from dtm.disperse import DisperseConfig, other_clustering, run_disperse
from dtm.embed import DEFAULT_MODEL, FIELDS, MODEL_CHOICES
from dtm.errors import DTMError
from dtm.lab import lab_status
from dtm.samples import SAMPLE_PATH
from dtm.store import save_upload
from views.common import registry

SELECTED = "disperse_selected"  # list of row positions selected on the map or by cluster


@st.cache_data(show_spinner=False, max_entries=8)
def map_figure(_table: pd.DataFrame, keys: tuple, query: str, _kept=None, kept_name=""):
    table = _table
    hit = (
        table["instruction"].str.contains(query, case=False, regex=False).to_numpy()
        if query
        else None
    )
    fig = charts.cluster_map(table, hit, kept=_kept, kept_name=kept_name)
    return fig, 0 if hit is None else int(hit.sum())


def curate_overlay(res, table: pd.DataFrame):
    """A saved curate selection of this dataset to mark on the map: ``(key, mask, name)``,
    or ``(None, None, "")`` when none is chosen or saved. Matched by the content digest
    the Disperse step's dataset artifact already holds (no second read of the file)."""
    try:
        arts = selections_for(res.artifacts["dataset"].inputs.get("content"), registry())
    except DTMError as e:
        st.warning(f"The saved curate selections could not be read: {e}")
        return None, None, ""
    if not arts:
        return None, None, ""
    labels = {
        a.key: f"{a.meta.get('score', '?')} · kept {a.meta.get('kept', '?')} of "
        f"{a.meta.get('rows', '?')} · {Path(str(a.meta.get('run', a.key))).name}"
        for a in arts
    }
    key = st.selectbox(
        "Mark a curate selection",
        [None, *labels],
        format_func=lambda k: "none" if k is None else labels[k],
        key="curate_overlay",
        help="The rows a curate run kept (python -m dtm curate, or train --kind curate), "
        "as open diamonds.",
    )
    if key is None:
        return None, None, ""
    art = next(a for a in arts if a.key == key)
    try:
        sel = read_selection(art)
    except (OSError, ValueError, KeyError) as e:
        st.warning(f"The selection {art.path / 'selection.csv'} could not be read: {e}")
        return None, None, ""
    mask = kept_mask(sel, table["id"])
    missing = int((sel["kept"] == 1).sum()) - int(mask.sum())
    if missing:
        st.caption(f"{missing} kept rows of this selection are not on the map.")
    return key, mask, f"curated by {art.meta.get('score', '?')}"


def data_source() -> str | None:
    lab = lab_status()
    kinds = [
        "Alignment-tax lab",
        "Built-in sample",
        "Upload a file",
        "Local path",
        "Hugging Face hub id",
    ]
    kind = st.radio(
        "Dataset", kinds, horizontal=True, key="ds_kind", index=0 if lab["state"] == "ready" else 1
    )
    if kind == "Alignment-tax lab":
        if lab["state"] == "ready":
            st.caption(
                "The lab's instruction data: 4 source families, each with its own "
                "injected biases (see docs/lab.md)."
            )
            return str(Path(lab["path"]) / "data" / "train.jsonl")
        if lab["state"] == "building":
            st.info(
                f"The alignment-tax lab is being built ({lab['fraction']:.0%}, "
                f"{lab['stage']}); it becomes the default dataset when ready."
            )
        else:
            st.info(
                "The alignment-tax lab is not built: see the sidebar, or run "
                "`python -m dtm lab build --out DIR` and choose its data by path."
            )
        return None
    if kind == "Built-in sample":
        st.caption(
            f"A small synthetic instruction set in 5 source families (`{SAMPLE_PATH.name}`)."
        )
        return str(SAMPLE_PATH)
    if kind == "Upload a file":
        up = st.file_uploader(
            "JSONL, JSON, CSV or Parquet", type=["jsonl", "ndjson", "json", "csv", "parquet"]
        )
        if up is None:
            return None
        try:
            return str(save_upload(up.name, up.getvalue()))
        except DTMError as e:  # over the size limit, or no room to keep it
            st.error(str(e))
            return None
    if kind == "Local path":
        return st.text_input("Path to a data file on the server", key="ds_path") or None
    hub = st.text_input(
        "Dataset id (downloads from the hub)",
        key="ds_hub",
        placeholder="allenai/tulu-v2-sft-mixture",
    )
    return hub or None


def settings(source: str | None) -> DisperseConfig | None:
    c1, c2, c3, c4, c5 = st.columns([1.2, 1.6, 1.2, 0.7, 0.7])
    field = c1.selectbox(
        "Embed",
        FIELDS,
        key="field",
        help="The instruction, the response, or both (the paper tried each).",
    )
    label = c2.selectbox(
        "Embedding model", [*MODEL_CHOICES, "Other (folder or hub id)"], key="model_choice"
    )
    model = MODEL_CHOICES.get(label) or st.text_input(
        "Model folder or hub id", value=DEFAULT_MODEL, key="model_other"
    )
    method = c3.selectbox(
        "Clusterer",
        METHODS,
        key="method",
        help="k-means (the paper), a seeded random split, or Ward agglomerative clustering.",
    )
    k = c4.number_input(
        "K",
        min_value=1,
        max_value=64,
        value=4,
        step=1,
        key="k",
        help="Number of clusters = sub-models. The paper found K=4 best.",
    )
    seed = c5.number_input("Seed", min_value=0, value=0, step=1, key="seed")
    if source is None:
        return None
    return DisperseConfig(
        data=source, k=int(k), method=method, field=field, model=model, seed=int(seed)
    )


def run(cfg: DisperseConfig):
    bar = st.progress(0.0, text="starting")
    try:
        return run_disperse(cfg, registry(), progress=lambda s, f: bar.progress(f, text=s))
    except DTMError as e:
        st.error(str(e))
        return None
    finally:
        bar.empty()


def show_selection(table: pd.DataFrame) -> None:
    rows = [r for r in st.session_state.get(SELECTED, []) if r < len(table)]
    st.subheader(f"Selected rows ({len(rows)})")
    if not rows:
        st.caption("Draw a box or lasso on the map, click points, or pick whole clusters.")
        return
    cols = ["id", "cluster", "source", *(["task"] if "task" in table else [])]
    cols += ["instruction", "response", "n_tokens"]
    st.dataframe(
        table.iloc[rows][cols], hide_index=True, height=300, key="selected_table", width="stretch"
    )


def show_clusters(res) -> None:
    info = res.clusters
    left, right = st.columns([1, 1.4])
    left.plotly_chart(charts.cluster_sizes(info["sizes"]), key="sizes_chart")
    right.dataframe(
        pd.DataFrame(
            {
                "cluster": range(info["k"]),
                "size": info["sizes"],
                "distinctive words (c-TF-IDF)": [", ".join(w) for w in info["keywords"]],
                "top sources": [
                    ", ".join(f"{s} {n}" for s, n in list(d.items())[:3]) for d in info["sources"]
                ],
            }
        ),
        hide_index=True,
        key="keywords_table",
        width="stretch",
    )


def plain(text: str) -> str:
    """``text`` shown as it is in Markdown (a task like one_word is no emphasis)."""
    return re.sub(r"([\\`*_\[\]<>$~#|])", r"\\\1", text)


def beside_default(res) -> int:
    """The comparison shown first: k-means beside random (or random beside the rest)
    when the registry already holds it; else none (computing it waits for a choice)."""
    method = res.clusters["method"]
    other = "kmeans" if method == "random" else "random"
    options = [m for m in METHODS if m != method]
    try:
        held = other_clustering(res, other, registry(), compute=False) is not None
    except DTMError:
        held = False
    return 1 + options.index(other) if held else 0


def show_composition(res) -> None:
    """What each cluster holds, by task (a lab's rows) or source, as stacked bars with a
    sentence; beside it, the same rows clustered another way: why random and k-means
    sub-models learn different things."""
    info = res.clusters
    st.subheader("What each cluster holds")
    left, right = st.columns([1, 1.4])
    nouns = (["task"] if "tasks" in info else []) + ["source"]
    noun = left.radio("Count rows by", nouns, horizontal=True, key="composition_by")
    options = [None, *(m for m in METHODS if m != info["method"])]
    beside = right.selectbox(
        "Beside it, the same rows and K clustered by",
        options,
        index=beside_default(res),
        format_func=lambda m: "nothing" if m is None else m,
        key="composition_beside",
        help="The same embeddings, K and seed; a clustering not yet in the registry is "
        "computed now (the embeddings are reused).",
    )
    panels = [(info, info["method"])]
    if beside is not None:
        try:
            with st.spinner(f"clustering by {beside}"):
                panels.append((other_clustering(res, beside, registry()), beside))
        except DTMError as e:
            st.error(str(e))
    field = f"{noun}s"
    order = charts.composition_order(*(p[field] for p, _ in panels))
    top = max(max(p["sizes"]) for p, _ in panels)
    for i, (col, (p, method)) in enumerate(zip(st.columns(len(panels)), panels, strict=True)):
        title = f"{method}, K={p['k']}: each cluster's rows by {noun}"
        fig = charts.composition_bars(p[field], title, order, y_max=top)
        col.plotly_chart(fig, key=f"composition_chart_{i}")
        col.markdown(plain(composition_sentence(p[field], noun)))


def save_for_training(res, cfg: DisperseConfig) -> None:
    asg = res.artifacts["assignment"]
    csv = res.table[["id", "cluster", "x", "y"]].to_csv(index=False, float_format="%.5f")
    c1, c2, c3 = st.columns([1, 1.4, 0.8])
    c1.download_button(
        "Download assignment CSV",
        csv,
        file_name="assignments.csv",
        mime="text/csv",
        key="download_csv",
    )
    default = f"{cfg.method}-k{cfg.k}-{cfg.field}-seed{cfg.seed}"
    name = c2.text_input(
        "Name for the Train page",
        value=asg.name or default,
        key="assignment_name",
        label_visibility="collapsed",
    )
    if c3.button("Save for training", key="save_assignment"):
        registry().set_name("assignment", asg.key, name.strip() or default)
        st.toast(f"Saved assignment '{name}' for the Train page.")
    st.caption(
        f"Assignment `{asg.key}` · embeddings `{res.artifacts['embedding'].key}` · "
        f"dataset `{res.artifacts['dataset'].key}` (all under the cache registry)."
    )


def page() -> None:
    st.title("Disperse")
    st.markdown(
        "Split the instruction data into **K** clusters: one LoRA sub-model will be "
        "trained on each, then merged. Each sub-model picks up its own cluster's "
        "dataset-specific biases; the merge keeps what they share."
    )
    cfg = settings(data_source())
    if cfg is None:
        st.info("Choose a dataset to disperse.")
        return
    if st.button("Disperse", type="primary", key="go") or "disperse_cfg" not in st.session_state:
        if st.session_state.get("disperse_cfg") != cfg:
            st.session_state[SELECTED] = []
        st.session_state["disperse_cfg"] = cfg
    res = run(st.session_state["disperse_cfg"])
    if res is None:
        return
    cfg, table, info = st.session_state["disperse_cfg"], res.table, res.clusters
    m = st.columns(5)
    m[0].metric("Rows kept", f"{res.report.n_kept:,}")
    m[1].metric("Rows dropped", f"{len(res.report.dropped):,}")
    m[2].metric("K", info["k"])
    m[3].metric(
        "Silhouette (cosine)", "n/a" if info["silhouette"] is None else f"{info['silhouette']:.3f}"
    )
    m[4].metric("Method", info["method"])
    if res.report.dropped or res.report.renamed_ids:
        with st.expander(f"Load report: {len(res.report.dropped)} rows dropped"):
            st.code(res.report.summary(max_examples=50), language=None)

    query = st.text_input(
        "Search instructions",
        key="search",
        placeholder="a word or phrase; matches are ringed on the map",
    )
    sel_key, kept, kept_name = curate_overlay(res, table)
    keys = (res.artifacts["assignment"].key, res.artifacts["projection"].key, sel_key)
    fig, n_hits = map_figure(table, keys, query.strip(), kept, kept_name)
    if query.strip():
        st.caption(f"{n_hits} matching rows")

    def on_map_select():
        st.session_state[SELECTED] = charts.selected_rows(
            st.session_state["disperse_map"].get("selection")
        )

    st.plotly_chart(
        fig,
        key="disperse_map",
        on_select=on_map_select,
        selection_mode=("box", "lasso", "points"),
        config={"scrollZoom": True},
    )

    def on_pick_clusters():
        picked = st.session_state["pick_clusters"]
        st.session_state[SELECTED] = np.flatnonzero(
            table["cluster"].isin(picked).to_numpy()
        ).tolist()

    st.multiselect(
        "Or select whole clusters",
        list(range(info["k"])),
        key="pick_clusters",
        on_change=on_pick_clusters,
    )
    show_selection(table)
    show_clusters(res)
    show_composition(res)
    save_for_training(res, cfg)


page()
