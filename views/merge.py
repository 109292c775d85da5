"""Page 3 - Merge: merge sub-models (a launch's, or adapter folders named by path) with
sliders and a live score on any chosen tasks and held-out losses; find weights (CMA-ES
search, LM-Cocktail); explore the merge landscape; compare with the logit ensemble;
export, or keep the merge for Compare.

Length: one page's five panels (the group, the live score, find weights, the landscape,
export) read and set one another's session state (the sliders' keys, the picked and found
weights); kept in one file so those keys are in one place."""

from __future__ import annotations

import dataclasses

import numpy as np
import streamlit as st

from dtm import charts, jobs
from dtm.errors import DTMError
from dtm.merge import landscape as ml
from dtm.merge.engine import Merger
from dtm.merge.export import export_recipe, new_merge_dir
from dtm.merge.labels import SINGLE, recipe_label, vertex_of, weights_label
from dtm.merge.methods import METHODS, widget_spec
from dtm.merge.objective import Objective, heldout_options, lower_is_better, objective_from_choices
from dtm.merge.saved import save_merge
from dtm.merge.search import cocktail, search_merge
from dtm.merge.sources import folder_source, merge_sources
from dtm.score import ModelRef, load_model
from dtm.store import safe_name
from dtm.tasks import QUICK_TASKS, SHORT, TASKS
from dtm.tasks.files import folder_tasks
from views.common import registry
from views.merge_blocks import by_block, landscape_3d, learn_panel, learned_frame

PICKED = "m_picked_weights"  # weights to apply on the next run (landscape, search, cocktail)
STORE, FOLDERS = "a launch of the job store", "adapter folders"


@st.cache_resource(max_entries=2, show_spinner=False)
def merger_for(base: str, adapters: tuple[str, ...]) -> Merger:
    """The chosen group's base and sub-models (only those), loaded once."""
    return Merger(base, list(adapters))


@st.cache_resource(max_entries=4, show_spinner="Reading the evaluation sets…")
def objective_for(spec: tuple) -> Objective:
    """One objective per settings (it keeps its tokenised held-out rows)."""
    return objective_from_choices(*spec[:6])


@st.cache_data(max_entries=32, show_spinner=False)
def reference_score(base: str, adapter: str, spec: tuple) -> dict:
    """The score of the base with one other adapter (SFT, a baseline)."""
    model, tok = load_model(ModelRef(base=base, adapters=[adapter]))
    return objective_for(spec).score(model, tok)


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
            lo, hi, step = p.slider()
            params[p.name] = col.slider(p.name, lo, hi, p.default, step, key=key, help=p.help)
    return params


def sliders(group: str, names: list[str]) -> list[float]:
    """One slider per finished sub-model. The values are kept per group and sub-model
    name: a sub-model that finishes (a new slider) or another group chosen and chosen
    back leaves the values the user set as they were."""
    k = len(names)
    memory = st.session_state.setdefault("m_wmem", {})
    if st.session_state.get("m_wnames") != (group, names):  # another group, or one more
        for i, name in enumerate(names):
            st.session_state[f"w_{i}"] = memory.get((group, name), round(1 / k, 3))
        st.session_state["m_wnames"] = (group, names)
    # Weights picked on the landscape or found: set here, before the sliders exist in
    # this run (a widget's value cannot be changed once it is drawn).
    picked = st.session_state.pop(PICKED, None)
    if picked is not None and len(picked) == k:
        for i, v in enumerate(picked):
            st.session_state[f"w_{i}"] = round(float(v), 2)
    cols = st.columns(min(k, 4))
    for i, name in enumerate(names):
        st.session_state.setdefault(f"w_{i}", round(1 / k, 3))
        cols[i % len(cols)].slider(name, 0.0, 1.0, step=0.01, key=f"w_{i}")
    weights = [float(st.session_state[f"w_{i}"]) for i in range(k)]
    memory.update({(group, n): w for n, w in zip(names, weights, strict=True)})
    return weights


def choose_source():
    """A launch's finished sub-models, or adapter folders named by path."""
    sources = merge_sources(jobs.JobStore(registry()))
    kind = st.radio("Sub-models from", [STORE, FOLDERS], horizontal=True, key="m_from")
    if kind == STORE:
        if not sources:
            st.info(
                "Nothing to merge yet: on the Train page, launch the DTM set and wait until at "
                "least two sub-models are done, or name adapter folders."
            )
            return None
        by_id = {s.id: s for s in sources}
        pick = st.selectbox(
            "Sub-models of",
            list(by_id),
            key="m_group",
            help="one launch's sub-models of one clustering and one seed (a group still "
            "training is said below it)",
        )
        src = by_id[pick]
        if not src.complete:
            st.caption(f"{src.state().capitalize()}: the sliders merge the finished ones.")
        return src
    c1, c2 = st.columns([1, 2])
    base = c1.text_input("Base model folder or hub id", key="m_base")
    paths = c2.text_area(
        "Adapter folders, one per line", key="m_paths", help="peft LoRA adapters of that base"
    )
    if not base.strip() or not paths.strip():
        st.caption("Name the base model and at least two adapter folders trained on it.")
        return None
    try:
        return folder_source(base, paths.splitlines())
    except DTMError as e:
        st.error(str(e))
        return None


def choose_objective(src, limit: int) -> tuple | None:
    """The live score's tasks and held-out losses, as ``objective_for``'s settings."""
    lab_tasks: tuple = ()
    c = st.columns([1, 1])
    if src.lab:
        choices = {SHORT[t]: t for t in TASKS}
        picked = c[0].multiselect(
            "Lab tasks",
            list(choices),
            default=list(QUICK_TASKS),
            key="m_tasks",
            help="the first N items of each chosen lab task",
        )
        lab_tasks = tuple(choices[k] for k in picked)
    else:
        c[0].caption("Not a lab model: lab tasks are not offered.")
    tasks_dir = (
        c[1].text_input("Tasks folder (lm-evaluation-harness YAMLs)", key="m_tasks_dir").strip()
        or None
    )
    user: tuple = ()
    if tasks_dir:
        try:
            found = list(folder_tasks(tasks_dir))
        except DTMError as e:
            st.error(str(e))
            found = []
        user = tuple(c[1].multiselect("Its tasks", found, default=found[:2], key="m_user_tasks"))
    options = heldout_options(src)
    c = st.columns([1, 1])
    held = c[0].multiselect(
        "Held-out losses",
        list(options),
        key="m_heldout",
        help="the mean response-token loss (lower is better), no benchmark needed",
    )
    extra = c[1].text_input("Held-out file (instruction data or .txt)", key="m_held_file").strip()
    heldout = tuple(options[h] for h in held) + ((extra,) if extra else ())
    if not (lab_tasks or user or heldout):
        st.info("Choose what the merge is scored on: tasks or held-out losses.")
        return None
    return (src.lab, lab_tasks, tasks_dir, user, heldout, limit, src.identity)


def page() -> None:
    st.title("Merge")
    src = choose_source()
    if src is None:
        return
    names = [n for n, _ in src.subs]
    c1, c2, c3 = st.columns([1.4, 1, 1])
    method = c1.selectbox(
        "Method", list(METHODS), key="m_method", format_func=lambda m: f"{m}: {METHODS[m].help}"
    )
    normalise = c2.checkbox("normalise weights to sum 1", True, key="m_norm")
    limit = int(c3.number_input("items per task", 10, 500, 40, 10, key="m_limit"))
    spec = choose_objective(src, limit)
    if spec is None:
        return
    params = params_panel(method)
    weights = sliders(src.id, names)
    if normalise and sum(weights) > 0:
        weights = [w / sum(weights) for w in weights]
    weights = by_block(names, weights, src.base, normalise)  # K numbers, or a K x B table
    st.subheader("Live score")
    box = st.empty()
    last = st.session_state.get("m_last")
    if last is not None and last[0] == (spec, src.id):  # shown greyed while it re-scores
        st.html("<style>.st-key-m_prev{opacity:.4}</style>")
        with box.container(key="m_prev"):
            metric_row(last[1], None, last[2], "previous weights; scoring the new ones")
    bar = st.progress(0.0, text="Loading the sub-models…")
    try:
        objective = objective_for(spec)
        bar.progress(0.05, text=f"Loading the base model and {len(src.subs)} sub-models…")
        merger = merger_for(src.base, src.adapters)
        refs = reference_rows(merger, src, spec, objective, names, bar)
        bar.empty()
        with st.spinner("Merging and scoring…"):
            score, ms = ml.live_score(merger, method, weights, objective, **params)
    except DTMError as e:
        bar.empty()
        st.error(str(e))
        return
    st.session_state["m_last"] = ((spec, src.id), score, ms)
    moes = [n for n, (kind, _) in src.baselines.items() if kind == "loramoe"]
    if moes:
        st.caption(
            f"{', '.join(moes)}: a LoRAMoE, scored below as a reference but not offered to "
            "merge: its router mixes the experts per token, so no single weight delta "
            "equals it."
        )
    sft = next((refs[n] for n, (kind, _) in src.baselines.items() if kind == "sft"), None)
    with box.container():
        metric_row(score, sft, ms)
    table = {"merged": score, **refs}
    if st.toggle("Logit ensemble of the sub-models (the reference)", key="m_ensemble"):
        ens = ml.ensemble_score(merger, objective, weights)
        if ens is not None:
            table["ensemble"] = ens
        if objective.tasks:
            st.caption("The ensemble is scored on lab tasks and held-out losses only.")
    st.dataframe(
        [{"model": k, **{t: round(v, 3) for t, v in s.items()}} for k, s in table.items()],
        hide_index=True,
    )
    find_panel(merger, method, params, names, objective, spec)
    landscape_panel(merger, method, params, names, objective, spec)
    export_panel(merger, src, method, weights, params)


def metric_row(score: dict, sft: dict | None, ms: float, note: str = "") -> None:
    """The live score: one metric per score (against SFT when there is one), the time."""
    if note:
        st.caption(note)
    cols = st.columns(len(score) + 1)
    for col, (label, value) in zip(cols, score.items(), strict=False):
        delta = None if sft is None else f"{value - sft[label]:+.3f} vs SFT"
        color = "inverse" if lower_is_better(label) else "normal"
        col.metric(label, f"{value:.3f}", delta, delta_color=color)
    cols[-1].metric("merge + score", f"{ms:.0f} ms")


def reference_rows(merger, src, spec, objective, names, bar) -> dict:
    """Base and each sub-model from the loaded merger (no load), SFT and the other
    baselines loaded once each and cached; ``bar`` shows how far it is."""
    key = ("m_refs", spec)  # spec holds the group's base and adapters
    if st.session_state.get("m_refs_key") != key:
        show = lambda what, f: bar.progress(0.1 + 0.6 * f, text=what)
        rows = ml.reference_scores(merger, objective, names, progress=show)
        st.session_state["m_refs"], st.session_state["m_refs_key"] = rows, key
    refs = dict(st.session_state["m_refs"])
    for i, (name, (_, path)) in enumerate(src.baselines.items()):
        bar.progress(0.7 + 0.3 * i / len(src.baselines), text=f"Scoring {name}…")
        refs[name] = reference_score(src.base, str(path), spec)
    return {n: refs[n] for n in ["base", *src.baselines, *names]}


def find_panel(merger, method, params, names, objective, spec) -> None:
    st.subheader("Find weights")
    labels = list(objective.labels())
    c = st.columns([1.3, 1, 1])
    mode = c[0].radio(
        "Maximise",
        ["the mean of the scores", "a weighted sum", "a Pareto front of two"],
        key="m_find_mode",
        help="a loss counts as its negative (lower is better)",
    )
    least = len(names) + 1  # the uniform point and each vertex come first
    budget = int(c[1].number_input("evaluations", 1, 500, 30, key="m_budget"))
    refused = budget < least
    if refused:  # said beside the field; the search does not run with another number
        c[1].error(
            f"{budget} evaluations: the search needs at least {least} (the uniform point and "
            f"each of the {len(names)} sub-models come first)."
        )
    seed = int(c[2].number_input("seed", 0, 10**6, 0, key="m_find_seed"))
    obj, pareto = search_goal(mode, labels, objective)
    if obj is None:
        return
    b1, b2, b3 = st.columns([1, 1, 2])
    if b1.button("Find weights", key="m_find", type="primary", disabled=refused):
        bar = st.progress(0.0, text="weight search")
        show = lambda s, f: bar.progress(min(f, 1.0), text=f"{s}: {f:.0%}")
        try:
            found = search_merge(merger, method, obj, budget, params=params, seed=seed,
                                 pareto=pareto, progress=show)  # fmt: skip
        except DTMError as e:
            st.error(str(e))
            return
        bar.empty()
        st.session_state["m_search"] = (spec, method, tuple(sorted(params.items())), found)
        st.session_state[PICKED] = found["best"]["weights"]
        st.rerun()
    held = [x for x in labels if x.startswith("heldout:")]
    temp = float(b3.number_input("LM-Cocktail temperature T", 0.1, 100.0, 5.0, key="m_temp"))
    if b2.button(
        "LM-Cocktail weights",
        key="m_cocktail",
        disabled=not held,
        help="softmax(-loss/T) of each sub-model's held-out loss (choose one above)",
    ):
        found = cocktail(merger, objective, temp)
        w = found["best"]["weights"]
        st.session_state["m_cocktail_result"] = (spec, found["losses"], w)
        st.session_state[PICKED] = w
        st.rerun()
    found_captions(names, spec, method, params)
    learn_panel(merger, method, params, names, objective, spec)


def search_goal(mode: str, labels: list[str], objective):
    """``(objective, pareto labels or None)`` for the chosen mode; ``(None, None)`` when a
    Pareto front lacks a second score."""
    if mode == "a weighted sum":
        wc, w = st.columns(min(len(labels), 4)), {}
        for i, lab in enumerate(labels):
            ask = wc[i % len(wc)].number_input
            w[lab] = float(ask(f"weight of {lab}", -10.0, 10.0, 1.0, 0.5, key=f"m_ow_{lab}"))
        return dataclasses.replace(objective, weights=w), None
    if mode == "a Pareto front of two":
        if len(labels) < 2:
            st.caption("A Pareto front needs two scores: choose more tasks or losses.")
            return None, None
        pc = st.columns(2)
        a = pc[0].selectbox("first", labels, key="m_par_a")
        b = pc[1].selectbox("second", [x for x in labels if x != a], key="m_par_b")
        return objective, (a, b)
    return objective, None


def found_captions(names, spec, method, params) -> None:
    """What LM-Cocktail and the last search found, for these settings."""
    kept = st.session_state.get("m_cocktail_result")
    if kept and kept[0] == spec:
        _, losses, w = kept
        st.caption(
            "LM-Cocktail: held-out losses "
            + ", ".join(f"{n} {x:.3f}" for n, x in zip(names, losses, strict=False))
            + " → weights "
            + ", ".join(f"{v:.3f}" for v in w)
        )
    saved = st.session_state.get("m_search")
    if saved and saved[:3] == (spec, method, tuple(sorted(params.items()))):
        found = saved[3]
        best, uniform = found["best"], found["points"][0]
        vertex = vertex_of(best["weights"])
        at = weights_label(best["weights"], names)
        if vertex is not None:
            at = f"{names[vertex]} alone: {SINGLE}"
        st.caption(
            f"{len(found['points'])} points evaluated; best {_fmt(best['score'])} at {at} "
            f"(uniform {_fmt(uniform['score'])}). The sliders are set to it; every point is "
            "on the landscape."
        )


def _fmt(score) -> str:
    if isinstance(score, (list, tuple)):
        return "(" + ", ".join(f"{x:.3f}" for x in score) + ")"
    return f"{score:.4f}"


def landscape_panel(merger, method, params, names, objective, spec) -> None:
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
    settings = (method, tuple(sorted(params.items())), spec)
    if c3.button("Compute the landscape", key="m_land"):
        current = [st.session_state[f"w_{i}"] for i in range(k)]
        pts = ml.landscape_points(view, k, n, current, pair)
        bar = st.progress(0.0)
        frame = ml.landscape(
            merger, method, pts, objective, progress=lambda s, f: bar.progress(f), **params
        )
        frame["from"] = "grid"
        st.session_state["m_landscape"] = ((*settings, view, pair), frame)
        bar.empty()
    saved = st.session_state.get("m_landscape")
    search = st.session_state.get("m_search")
    frames, key = [], None
    if saved is not None and saved[0][2] == spec:  # this source and objective
        key, frame = saved
        if key[:3] != settings:
            st.caption("Computed for other settings; compute it again to refresh.")
        frames.append(frame)
    if search and search[:3] == (spec, method, tuple(sorted(params.items()))):
        frames.append(ml.search_frame(search[3], objective))
    learned = learned_frame(spec, method, params, objective)
    if learned is not None:
        frames.append(learned)
    if not frames:
        st.caption("Scores a grid over the weight simplex; click a point to set the sliders.")
        return
    frame, scored, (x, y) = ml.landscape_table(frames)
    metric = st.selectbox("Colour by", scored, key="m_colour")
    if key is not None and key[3] == "2-D slice" and len(frames) == 1:
        fig = charts.weight_slice(frame, *key[4], names, metric)
    elif k == 3:
        fig = charts.ternary(frame, names, metric)
    elif k == 4:
        fig = landscape_3d(frame, metric, names)
    else:  # K > 4: the score against the distance from the uniform merge
        fig = charts.by_distance(frame, names, metric)
    event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points",), key="m_land_chart")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points:
        idx = points[0].get("customdata")
        idx = idx[0] if isinstance(idx, list) else idx
        if idx is not None:
            w = frame.iloc[int(idx)][[f"w{i}" for i in range(k)]].to_numpy(dtype=float)
            if not np.allclose(w, [st.session_state[f"w_{i}"] for i in range(k)], atol=0.006):
                st.session_state[PICKED] = w.tolist()
                st.rerun()


def export_panel(merger, src, method, weights, params) -> None:
    st.subheader("Export")
    recipe = {"method": method, "weights": weights, "params": params}
    adapters = list(src.adapters)
    c1, c2, c3, c4 = st.columns([1.2, 1, 1, 1])
    default = f"{safe_name(src.group)}-{method}"
    name = safe_name(c1.text_input("Name", default, key="m_export_name"))
    full = c2.checkbox("full merged weights", key="m_full")
    names = src.cluster_names
    label = recipe_label(recipe, names)
    vertex = vertex_of(weights)
    if vertex is not None:
        st.caption(f"These weights are all {src.subs[vertex][0]}: {SINGLE}.")
    where = f"under {src.id}"
    if c3.button("Export", key="m_export"):
        try:
            out, _ = export_recipe(merger, new_merge_dir(name), recipe, adapters=adapters,
                                   group=src.id, full=full, registry=registry(),
                                   label=label)  # fmt: skip
        except DTMError as e:
            st.error(str(e))
            return
        st.success(f"Wrote {out} with recipe.json; Compare lists it {where} as {label!r}")
    if c4.button("Keep for Compare", key="m_keep", help="score this merge as a row on Compare"):
        saved = save_merge(
            src.base, adapters, recipe, source="tuned", group=src.id, names=names,
            registry=registry(),
        )  # fmt: skip
        st.success(f"Compare lists it {where} as {saved['label']!r}")


page()
