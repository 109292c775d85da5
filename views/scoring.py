"""The Compare page's scoring panel: which models (a launch, saved merges, a model
folder; ``dtm.lineup`` makes each list), which tasks, and the run."""

from __future__ import annotations

import streamlit as st

from dtm.controls import frontier_models
from dtm.errors import DTMError
from dtm.evaluate.harness import CODE_TASKS
from dtm.experiment import experiment_dir
from dtm.lineup import (
    folder_label,
    folder_models,
    launch_models,
    lineup_lab,
    saved_models,
    shrinkable,
    task_options,
)
from dtm.merge.saved import saved_merges
from dtm.merge.sources import merge_sources
from dtm.models import lab_of
from dtm.score import ModelRef, groups, score_models
from dtm.tasks import PROBES, TASKS
from dtm.tasks.files import folder_tasks
from views.common import registry

LAUNCH, SAVED, FOLDER = "a launch", "saved merges", "a model folder"


def models_to_score(store) -> tuple[list[ModelRef], str, str | None] | None:
    """The models to score, the group their scores go under, and their lab (when every
    one of them is a lab model)."""
    kind = st.radio("Score", [LAUNCH, SAVED, FOLDER], horizontal=True, key="c_kind")
    if kind == LAUNCH:
        return _launch(store)
    chosen = _saved() if kind == SAVED else _folder()
    if chosen is None:
        return None
    models, group = chosen
    if not group or not models:
        return None
    return models, group, lineup_lab(models)


def _launch(store) -> tuple[list[ModelRef], str, str | None] | None:
    sources = merge_sources(store)
    if not sources:
        st.caption(
            "No launch to score yet: train SFT and the sub-models on the Train page, or "
            "run `python -m dtm run experiments/lab.yaml` (or the Home page's button)."
        )
        return None
    by_id = {s.id: s for s in sources}
    pick = st.selectbox(
        "Group",
        list(by_id),
        key="c_src",
        help="one launch's sub-models of one clustering and one seed, with that seed's SFT "
        "and baselines; its scores go under this name",
    )
    src = by_id[pick]
    if not src.complete:
        st.caption(
            f"{src.state().capitalize()}: `dtm` averages the {len(src.subs)} finished "
            f"sub-models; the control is SFT ×1/{src.planned}."
        )
    # with every merge of these sub-models that was kept or exported, named by its recipe
    models = launch_models(src, registry())
    return models, src.id, src.lab or lab_of(src.base)


def _saved() -> tuple[list[ModelRef], str] | None:
    kept = saved_merges(registry())
    if not kept:
        st.caption(
            "No saved merge yet: export one, or press **Keep for Compare**, on the Merge "
            "page (or `python -m dtm merge ... --out DIR`)."
        )
        return None
    by_key = {m["key"]: m for m in kept}
    picked = st.multiselect(
        "Merges",
        list(by_key),
        default=list(by_key)[:4],
        key="c_saved",
        format_func=lambda k: " · ".join(
            str(x)
            for x in (
                by_key[k]["label"],
                by_key[k]["group"] or by_key[k]["base"],
                by_key[k]["source"],
            )  # fmt: skip
        ),
    )
    group = st.text_input("Scores go under", "merges", key="c_saved_group").strip()
    return saved_models(picked, registry()), group


def _folder() -> tuple[list[ModelRef], str] | None:
    c = st.columns([2, 2, 1])
    base = c[0].text_input("Model folder or hub id", key="c_base").strip()
    adapter = c[1].text_input("Adapter folder (optional)", key="c_adapter").strip()
    label = c[2].text_input(
        "Label", key="c_label", help="default: the adapter's folder name"
    ).strip() or folder_label(adapter)
    group = st.text_input("Scores go under", "my-models", key="c_folder_group").strip()
    if not base:
        return None
    return folder_models(base, adapter, label), group


def frontier_choice(models: list[ModelRef]) -> list[ModelRef]:
    """The scaled copies that trace one model's shrinkage frontier, when asked for."""
    sources = shrinkable(models)
    if not sources:
        return []
    c = st.columns([1, 2])
    if not c[0].checkbox(
        "Trace the shrinkage frontier",
        key="c_frontier",
        help="score the model's LoRA delta scaled by each α in 0.25 … 0.75 (exact, no "
        "training): the curve that DTM and the baselines are compared with",
    ):
        return []
    names = [m.label for m in sources]
    pick = c[1].selectbox(
        "of", names, index=names.index("sft") if "sft" in names else 0, key="c_frontier_of"
    )
    return frontier_models(next(m for m in sources if m.label == pick), models)


def score_panel(store) -> None:
    with st.expander("Score models", expanded=not groups(registry())):
        chosen = models_to_score(store)
        if chosen is None:
            return
        models, group, lab = chosen
        models = models + frontier_choice(models)
        st.caption(f"Scores go under **{group}**: " + " · ".join(m.label for m in models))
        c = st.columns([1, 3, 1])
        engine = c[0].radio("Engine", ["quick", "full"], key="c_engine", horizontal=True)
        tasks_dir = (
            st.text_input("Tasks folder (lm-evaluation-harness YAMLs)", key="c_tasks_dir").strip()
            or None
        )
        user: list[str] = []
        if tasks_dir:
            try:
                user = list(folder_tasks(tasks_dir))
            except DTMError as e:
                st.error(str(e))
        options = task_options(engine, bool(lab), user, tasks_dir)
        tasks = c[1].multiselect(
            "Tasks",
            options,
            default=list(TASKS + PROBES) if lab else user[:4],
            key=f"c_tasks_{engine}",
            help=None
            if lab
            else "not lab models: their tasks come from a tasks folder or "
            "lm-evaluation-harness (the full engine)",
        )
        limit = c[2].number_input("items per task (0: all)", 0, 100000, 0, 50, key="c_limit")
        held = st.text_input(
            "Held-out files (comma-separated; instruction data or .txt)", key="c_heldout"
        ).strip()
        heldout = [h.strip() for h in held.split(",") if h.strip()]
        allow = False
        if any(t in CODE_TASKS for t in tasks):
            allow = st.checkbox(
                "Run the code the model writes (HumanEval, MBPP execute it on this machine)",
                key="c_code",
            )
        if st.button(
            f"Score {len(models)} models",
            type="primary",
            disabled=not (tasks or heldout),
            key="c_go",
        ):
            run(models, tasks, group, lab, engine, int(limit) or None, allow, tasks_dir, heldout)


def run(models, tasks, group, lab, engine, limit, allow, tasks_dir, heldout) -> None:
    """Score the models, with a progress bar; the page then shows their group."""
    with st.status(f"Scoring {len(models)} models…", expanded=True) as box:
        bar = st.progress(0.0)
        try:
            score_models(
                models,
                tasks,
                group=group,
                lab=lab,
                engine=engine,
                limit=limit,
                allow_code=allow,
                controls_dir=experiment_dir(group) / "controls",
                progress=lambda what, f: bar.progress(min(f, 1.0), text=what),
                tasks_dir=tasks_dir,
                heldout=heldout,
            )
        except DTMError as e:
            box.update(label="Scoring stopped", state="error")
            st.error(str(e))
            return
        box.update(label="Scored", state="complete")
    st.session_state["c_group"] = group
    st.session_state["c_group_pick"] = group  # the results shown: the group just scored
