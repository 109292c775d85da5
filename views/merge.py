"""Page 3 - Merge: merge the sub-models with sliders and a live score, explore the merge
landscape, compare with the logit ensemble, export."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import streamlit as st

from dtm import charts, jobs
from dtm.errors import DTMError
from dtm.merge.engine import Merger
from dtm.merge.landscape import (
    LogitEnsemble,
    landscape,
    pareto_front,
    quick_score,
    simplex_grid,
    simplex_sample,
    slice_points,
)
from dtm.merge.methods import METHODS, widget_spec
from dtm.merge.sources import merge_sources
from dtm.score import ModelRef, load_model
from dtm.store import cache_dir, safe_name
from dtm.tasks import QUICK_TASKS, SHORT, TASKS
from views.common import registry

PICKED = "m_picked_weights"  # a landscape point's weights, applied on the next run


@st.cache_resource(max_entries=2, show_spinner="Loading the base model and the sub-models…")
def merger_for(base: str, adapters: tuple[str, ...]) -> Merger:
    return Merger(base, list(adapters))


@st.cache_data(max_entries=32, show_spinner=False)
def reference_score(
    base: str, adapter: str | None, bench: str, limit: int, tasks: tuple[tuple[str, str], ...]
) -> dict:
    """The quick score of the base model, or of the base with one adapter."""
    model, tok = load_model(ModelRef(base=base, adapters=[adapter] if adapter else []))
    return quick_score(model, tok, bench, limit, dict(tasks))


def params_panel(method: str) -> dict:
    """One widget per parameter the method declares (``dtm.merge.methods``)."""
    params: dict = {}
    c = st.columns(4)
    for i, p in enumerate(widget_spec(method)):
        col, key = c[i % 4], f"m_{p.name}"
        if p.choices:  # an on/off choice (dare's TIES-style consensus)
            if col.checkbox(p.help, key=key):
                params[p.name] = next(x for x in p.choices if x is not None)
        elif p.type is int:
            params[p.name] = int(col.number_input(p.name, int(p.low), 10**6, p.default, key=key))
        else:
            # an open bound is kept out of the slider's range by one step
            step = 0.05 if p.high <= 1 else 0.1
            lo = p.low + step if p.low_open else p.low
            hi = min(p.high, 10.0) - (step if p.high_open else 0.0)
            params[p.name] = col.slider(p.name, lo, hi, p.default, step, key=key, help=p.help)
    return params


def sliders(names: list[str]) -> list[float]:
    k = len(names)
    # Weights picked on the landscape: set here, before the sliders exist in this run
    # (a widget's value cannot be changed once it is drawn).
    picked = st.session_state.pop(PICKED, None)
    if picked is not None and len(picked) == k:
        for i, v in enumerate(picked):
            st.session_state[f"w_{i}"] = round(float(v), 2)
    cols = st.columns(min(k, 4))
    for i, name in enumerate(names):
        st.session_state.setdefault(f"w_{i}", round(1 / k, 3))
        cols[i % len(cols)].slider(name, 0.0, 1.0, step=0.01, key=f"w_{i}")
    return [float(st.session_state[f"w_{i}"]) for i in range(k)]


def page() -> None:
    st.title("Merge")
    store = jobs.JobStore(registry())
    sources = merge_sources(store)
    if not sources:
        st.info(
            "Nothing to merge yet: on the Train page, launch the DTM set and wait until at "
            "least two sub-models are done."
        )
        return
    labels = {s.group: f"{s.group} · {len(s.subs)} sub-models" for s in sources}
    group = st.selectbox("Sub-models of", list(labels), format_func=labels.get, key="m_group")
    src = next(s for s in sources if s.group == group)
    names = [n for n, _ in src.subs]
    try:
        merger = merger_for(src.base, tuple(str(p) for _, p in src.subs))
    except DTMError as e:
        st.error(str(e))
        return
    c1, c2, c3 = st.columns([1.4, 1, 1])
    method = c1.selectbox(
        "Method", list(METHODS), key="m_method", format_func=lambda m: f"{m}: {METHODS[m].help}"
    )
    normalise = c2.checkbox("normalise weights to sum 1", True, key="m_norm")
    limit = int(c3.number_input("items per task", 10, 500, 40, 10, key="m_limit"))
    choices = {SHORT[t]: t for t in TASKS}
    picked = st.multiselect(
        "Quick evaluation set",
        list(choices),
        default=list(QUICK_TASKS),
        key="m_tasks",
        help="the first N items of each chosen lab task",
    )
    tasks = tuple((k, choices[k]) for k in picked) or tuple(QUICK_TASKS.items())
    params = params_panel(method)
    weights = sliders(names)
    if normalise and sum(weights) > 0:
        weights = [w / sum(weights) for w in weights]
    if src.lab is None:
        st.warning("These sub-models were not trained on the lab: no quick evaluation set.")
        return
    bench = str(Path(src.lab) / "benchmarks")
    try:
        t0 = time.perf_counter()
        model = merger.apply(method, weights, **params)
        score = quick_score(model, merger.tokenizer, bench, limit, dict(tasks))
        ms = (time.perf_counter() - t0) * 1000
    except DTMError as e:
        st.error(str(e))
        return
    st.subheader("Live score")
    cols = st.columns(len(score) + 1)
    refs = {"base": reference_score(src.base, None, bench, limit, tasks)}
    sft = None
    for name, (kind, path) in src.baselines.items():
        refs[name] = reference_score(src.base, str(path), bench, limit, tasks)
        sft = refs[name] if kind == "sft" and sft is None else sft
    for col, (task, value) in zip(cols, score.items(), strict=False):
        delta = None if sft is None else f"{value - sft[task]:+.3f} vs SFT"
        col.metric(task, f"{value:.3f}", delta)
    cols[-1].metric("merge + score", f"{ms:.0f} ms")
    table = {"merged": score, **refs}
    for name, path in src.subs:
        table[name] = reference_score(src.base, str(path), bench, limit, tasks)
    if st.toggle("Logit ensemble of the sub-models (the reference)", key="m_ensemble"):
        table["ensemble"] = quick_score(
            LogitEnsemble(merger, weights), merger.tokenizer, bench, limit, dict(tasks)
        )
    st.dataframe(
        [{"model": k, **{t: round(v, 3) for t, v in s.items()}} for k, s in table.items()],
        hide_index=True,
    )
    landscape_panel(merger, method, params, names, bench, limit, tasks)
    export_panel(merger, method, weights, params, group)


def landscape_panel(merger, method, params, names, bench, limit, tasks) -> None:
    st.subheader("Merge landscape")
    k = len(names)
    views = ["simplex"] + (["2-D slice"] if k >= 4 else [])
    c1, c2, c3 = st.columns([1, 1, 1])
    view = c1.radio("View", views, horizontal=True, key="m_view")
    n = int(c2.number_input("points (K ≥ 4)", 8, 400, 40, key="m_points", disabled=k == 3))
    pair = (0, 1)
    if view == "2-D slice":
        a = c2.selectbox("x: weight of", range(k), format_func=names.__getitem__, key="m_si")
        b = c2.selectbox("y: weight of", range(k), 1, format_func=names.__getitem__, key="m_sj")
        pair = (a, b)
    if c3.button("Compute the landscape", key="m_land"):
        if view == "2-D slice":
            current = [st.session_state[f"w_{i}"] for i in range(k)]
            pts = slice_points(current, *pair)
        else:
            pts = simplex_grid(3, 0.1) if k == 3 else simplex_sample(k, n, seed=0)
        bar = st.progress(0.0)
        st.session_state["m_landscape"] = (
            (method, tuple(sorted(params.items())), limit, view, pair),
            landscape(
                merger,
                method,
                pts,
                bench,
                limit=limit,
                tasks=dict(tasks),
                progress=lambda s, f: bar.progress(f),
                **params,
            ),
        )
        bar.empty()
    saved = st.session_state.get("m_landscape")
    if saved is None:
        st.caption("Scores a grid over the weight simplex; click a point to set the sliders.")
        return
    key, frame = saved
    if key[:3] != (method, tuple(sorted(params.items())), limit):
        st.caption("Computed for other settings; compute it again to refresh.")
    scored = [c for c in frame.columns if not (c.startswith("w") and c[1:].isdigit())]
    metric = st.selectbox("Colour by", scored, key="m_colour")
    if key[3] == "2-D slice":
        fig = charts.weight_slice(frame, *key[4], names, metric)
    elif k == 3:
        fig = charts.ternary(frame, names, metric)
    else:
        x = "knowledge" if "knowledge" in scored else scored[0]
        y = "instruct" if "instruct" in scored else scored[-1]
        front = pareto_front(frame[x].to_numpy(), frame[y].to_numpy())
        fig = charts.pareto(frame, front, metric, x, y)
    event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points",), key="m_land_chart")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points:
        idx = points[0].get("customdata")
        idx = idx[0] if isinstance(idx, list) else idx
        if idx is not None:
            w = frame.iloc[int(idx)][[f"w{i}" for i in range(k)]].to_numpy()
            if not np.allclose(w, [st.session_state[f"w_{i}"] for i in range(k)], atol=0.006):
                st.session_state[PICKED] = w.tolist()
                st.rerun()


def export_panel(merger, method, weights, params, group) -> None:
    st.subheader("Export")
    c1, c2, c3 = st.columns([1.2, 1, 1])
    default = f"{safe_name(group)}-{method}"
    name = safe_name(c1.text_input("Name", default, key="m_export_name"))
    full = c2.checkbox("full merged weights", key="m_full")
    if c3.button("Export", key="m_export"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = cache_dir() / "merged" / f"{name}-{stamp}"
        try:
            merger.export(out, method, weights, full=full, **params)
        except DTMError as e:
            st.error(str(e))
            return
        st.success(f"Wrote {out} with recipe.json")


page()
