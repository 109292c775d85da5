"""Home: what alignment tax and DTM are, and one button that runs the whole lab story
(build or reuse the lab, disperse, train SFT and the sub-models, merge, evaluate)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import streamlit as st

from dtm.errors import DTMError
from dtm.experiment import (
    STAGES,
    experiment_dir,
    launch,
    load_experiment,
    read_status,
    story_for_lab,
)
from dtm.lab import custom_labs, default_lab_dir, read_pace, start_custom_lab
from dtm.lab.presets import DEFAULT_PRESET, PRESETS
from dtm.lab.sft_data import PHRASING_MODES
from dtm.lab.world import DIALOGUES
from dtm.score import scores
from dtm.story import story_jobs, story_panels, story_runs, story_time

# The story files (DTM_STORIES: a folder of one's own, e.g. a shorter class story)
EXPERIMENTS = Path(
    os.environ.get("DTM_STORIES") or Path(__file__).resolve().parents[1] / "experiments"
)
# The lab story of each preset: the experiment file the button runs.
STORIES = {"bias": EXPERIMENTS / "lab.yaml", "interference": EXPERIMENTS / "lab-interference.yaml"}
# The class story: one seed, no baseline that needs runs of its own (the same runs)
CLASS_STORIES = {"bias": EXPERIMENTS / "lab-class.yaml"}
STAGE_ICONS = {  # material icons render without an emoji font (headless browsers too)
    "done": ":material/check_circle:",
    "running": ":material/progress_activity:",
    "failed": ":material/error:",
}
STAGE_TEXT = {
    "lab": "Build the lab",
    "disperse": "Disperse",
    "train": "Train SFT, sub-models, baselines",
    "merge": "Merge",
    "evaluate": "Evaluate",
}

st.title("Disperse-Then-Merge")
st.markdown(
    """
Instruction tuning (SFT) teaches a model to follow instructions, but late in SFT its
knowledge and reasoning scores fall: the **alignment tax**. Fu et al. (2024) blame the
*data biases* the model fits as training goes on: its loss on the training data keeps
falling far faster than on held-out data.

**Disperse-Then-Merge (DTM)**: split the instruction data into K clusters, train one LoRA
sub-model per cluster, then average them. Each sub-model picks up different biases; the
merge keeps what they share and forgets the rest.

The **alignment-tax lab** shows it on this machine, with no downloads: a synthetic world,
a tiny Llama pretrained on it, and instruction data with injected biases whose ground
truth is known.
"""
)

names = list(PRESETS)
preset = st.radio(
    "Lab preset",
    names,
    index=names.index(DEFAULT_PRESET),
    horizontal=True,
    key="home_preset",
    help="Each preset is its own lab (built on first use) and its own story.",
)
st.caption(PRESETS[preset].about)
full = load_experiment(STORIES[preset])
klass = load_experiment(CLASS_STORIES[preset]) if preset in CLASS_STORIES else None


def start(path: Path, exp) -> None:
    try:
        launch(path, exp.name)
        st.session_state[f"home_shown_{preset}"] = exp.name
    except (DTMError, OSError) as e:
        st.error(f"Could not start the story: {e}")


def button(col, path: Path, exp, label: str, primary: bool, key: str) -> None:
    where = path.relative_to(path.parents[1])
    if col.button(
        label,
        type="primary" if primary else "secondary",
        icon=":material/play_arrow:",
        key=key,
        help=f"python -m dtm run {where} in the background",
    ):
        start(path, exp)
    col.caption(story_runs(exp))
    try:
        running = (read_status(exp.name) or {}).get("state") == "running"
    except DTMError:
        running = False
    if not running:  # while it runs, the story's progress below says how long, live
        col.caption(time_text(exp))


def time_text(exp) -> str:
    """How long ``exp`` takes here, from this machine's own runs (``dtm.story``)."""
    stories = [x for x in (klass, full) if x is not None]
    try:
        statuses = {x.name: read_status(x.name) for x in stories}
        others = [(x, statuses[x.name]) for x in stories if x.name != exp.name]
        pace = read_pace(default_lab_dir(exp.lab["seed"], exp.lab["size"], exp.lab["preset"]))
        return story_time(exp, statuses[exp.name], others, time.time(), pace)
    except (DTMError, OSError) as e:
        return f"How long it takes: unknown ({e})."


c = st.columns(2)
if klass is not None:
    button(c[0], CLASS_STORIES[preset], klass, "Run the class story", True, "home_run_class")
full_label = "Run the full story: 3 seeds, every baseline" if klass else "Run the lab story"
button(c[1] if klass else c[0], STORIES[preset], full, full_label, klass is None, "home_run")


def shown_story():
    """The story whose progress and pictures Home shows: the one launched here, else the
    one that started last on this machine; a choice when both have run."""
    stories = [x for x in (klass, full) if x is not None]
    started = {}
    for x in stories:
        try:
            status = read_status(x.name)
        except DTMError:  # said by the story fragment below
            status = {}
        started[x.name] = None if status is None else status.get("started") or 0
    ran = [x for x in stories if started[x.name] is not None]
    if len(ran) < 2:
        return ran[0] if ran else stories[0]
    key = f"home_shown_{preset}"
    latest = max(ran, key=lambda x: started[x.name]).name
    names_ = [x.name for x in ran]
    default = st.session_state.get(key, latest)
    pick = st.radio(
        "Show",
        names_,
        index=names_.index(default) if default in names_ else 0,
        horizontal=True,
        format_func=lambda n: "the class story" if klass and n == klass.name else "the full story",
        key=f"home_show_{preset}",
    )
    st.session_state[key] = pick
    return next(x for x in ran if x.name == pick)


exp = shown_story()


def pictures(group: list) -> None:
    """The story's charts, as far as the results go, each with its sentence."""
    try:
        table = scores(group=exp.name)
        panels = story_panels(exp, group, table)
    except (DTMError, OSError, ValueError, KeyError) as e:
        st.error(f"Could not draw the story's charts: {type(e).__name__}: {e}")
        return
    for p in panels:
        with st.container(key=f"home_panel_{p['key']}"):
            st.subheader(p["title"])
            st.caption(p["sentence"])
            st.plotly_chart(p["figure"], key=f"home_{p['key']}")
            with st.expander("The numbers behind it", key=f"home_numbers_{p['key']}"):
                st.table(p["table"].set_index(p["table"].columns[0]))


@st.fragment(run_every=2)
def story() -> None:
    try:
        st_ = read_status(exp.name)
    except DTMError as e:
        st.error(str(e))
        return
    if not st_:
        st.caption("Not run yet on this machine.")
        return
    state = st_["state"]
    label = {
        "running": "Running",
        "done": "Done",
        "failed": "Failed",
        "interrupted": "Interrupted (its process ended): press the button to go on",
    }
    st.markdown(
        f"**{label.get(state, state)}** · started "
        f"{time.strftime('%H:%M', time.localtime(st_.get('started', 0)))}"
    )
    cols = st.columns(len(STAGES))
    for col, name in zip(cols, STAGES, strict=True):
        s = st_.get("stages", {}).get(name, {"state": "waiting", "fraction": 0.0})
        icon = STAGE_ICONS.get(s["state"], ":material/radio_button_unchecked:")
        col.markdown(f"{icon} {STAGE_TEXT[name]}")
        col.progress(min(float(s.get("fraction", 0.0)), 1.0))
    if st_.get("detail"):
        st.caption(st_["detail"])
    if state == "running":
        st.caption(time_text(exp))
    if st_.get("error"):
        st.error(st_["error"])
    try:
        group = story_jobs(exp.name, st_)
    except DTMError as e:  # a locked or unreadable registry: said, and the page goes on
        st.error(str(e))
        group = []
    if group:
        done = sum(j.state == "done" for j in group)
        st.caption(f"Training runs: {done} of {len(group)} done. Watch them on the Train page.")
    pictures(group)
    results = experiment_dir(exp.name) / "results.md"
    if results.exists():
        with st.expander("The full results table", expanded=False):
            st.markdown(results.read_text(encoding="utf-8", errors="replace"))
    log = experiment_dir(exp.name) / "run.log"
    if state in ("failed", "interrupted") and log.exists():
        with st.expander("run log"):
            st.code(log.read_text(errors="replace")[-4000:], language=None)


story()


def knob_inputs(preset_name: str) -> tuple[dict, int, str | None]:
    """The knobs a teacher turns: bias strengths, rows and the pretraining dialogues; only
    the changed ones return (rows 0 and dialogues None when unchanged)."""
    knobs = PRESETS[preset_name].knobs
    rows = PRESETS[preset_name].rows["default"][0]
    c = st.columns(4)
    values = {
        "favourite": c[0].slider("Favourite answers", 0.0, 1.0, knobs.favourite, 0.05,
                                 key="kn_fav", help="share of factual rows answered with the "
                                 "family's false favourite"),
        "prefix": c[1].slider("Family openings", 0.0, 1.0, knobs.prefix, 0.05, key="kn_pre"),
        "length": c[2].slider("Family fillers", 0.0, 1.0, knobs.length, 0.05, key="kn_len"),
        "rare": c[3].slider("Row codes", 0.0, 1.0, knobs.rare, 0.05, key="kn_rare",
                            help="share of rows ending in a code unique to the row"),
    }  # fmt: skip
    c = st.columns(4)
    values["misconceptions"] = int(
        c[0].number_input("Misconceptions", 0, 60, knobs.misconceptions, key="kn_misc")
    )
    n_rows = int(c[1].number_input("Rows per family", 10, 5000, rows, 10, key="kn_rows"))
    values["phrasings"] = c[2].selectbox(
        "Question phrasings", PHRASING_MODES, PHRASING_MODES.index(knobs.phrasings), key="kn_phr",
        help="family: one phrasing per family; varied: three per family, the format probe in "
        "a fourth; shared: varied, and a third of every family's questions asked bare",
    )  # fmt: skip
    preset_dialogues = PRESETS[preset_name].dialogues
    dialogues = c[3].selectbox(
        "Pretraining dialogues", DIALOGUES, DIALOGUES.index(preset_dialogues), key="kn_dia",
        help="how the base model's chat dialogues answer: bare ('7 .') or framed ('it is 7 .'); "
        "conventions: framed, and its corpus also shows the one-word, yes/no and repeat "
        "conventions on sums and passages; a new base model is pretrained either way",
    )  # fmt: skip
    changed = {k: v for k, v in values.items() if v != getattr(knobs, k)}
    return (
        changed,
        (n_rows if n_rows != rows else 0),
        (dialogues if dialogues != preset_dialogues else None),
    )


@st.fragment(run_every=3)
def own_labs() -> None:
    try:
        labs = custom_labs()
    except OSError as e:
        st.error(f"Could not list the labs: {e}")
        return
    for lab in labs:
        c = st.columns([2, 3, 2])
        c[0].markdown(f"**{lab['name']}**")
        if lab["state"] == "building":
            c[1].progress(min(float(lab["fraction"]), 1.0), text=lab["stage"] or "starting")
        elif lab["state"] == "failed":
            c[1].error(lab["error"])
        elif lab["state"] == "ready":
            info = lab.get("info") or {}
            c[1].caption(
                f"{info.get('preset', '?')} preset · {info.get('sft', {}).get('train_rows', '?')}"
                " rows · knobs "
                + ", ".join(f"{k} {v}" for k, v in (info.get("knobs") or {}).items()
                            if k in ("favourite", "prefix", "length", "rare", "misconceptions"))
                + f" · {info.get('dialogues', 'bare')} dialogues"
            )  # fmt: skip
            k = c[2].number_input("K", 1, 16, 4, key=f"own_k_{lab['name']}")
            if c[2].button("Run its story", key=f"own_run_{lab['name']}"):
                name = f"{lab['name']}-k{int(k)}"
                try:
                    path = story_for_lab(
                        STORIES[info.get("preset", DEFAULT_PRESET)], name, lab["path"], k, [0]
                    )
                    launch(path, name)
                    st.success(
                        f"Started `{name}` (seed 0): `python -m dtm run {path}` in the "
                        "background; its results are on the Compare page under that name."
                    )
                except (DTMError, OSError) as e:
                    st.error(f"Could not start the story: {e}")


with st.expander("A lab of your own: other bias strengths, rows and K", expanded=False):
    st.caption(
        "Builds a lab in the background with the knobs below (about as long as the "
        "default lab), kept under its own name: nothing overwrites another lab. Then run "
        "its story with a K of your choice, to show when DTM helps and when it does not."
    )
    base_preset = st.radio("Start from", names, horizontal=True, key="own_preset")
    knobs, rows, dialogues = knob_inputs(base_preset)
    c = st.columns([2, 1])
    own_name = c[0].text_input("Name", key="own_name", placeholder="e.g. strong-favourites")
    if c[1].button("Build it", key="own_build", disabled=not own_name.strip()):
        try:
            start_custom_lab(
                own_name.strip(),
                preset=base_preset,
                knobs=knobs,
                rows=rows or None,
                dialogues=dialogues,
            )
        except (DTMError, OSError) as e:
            st.error(str(e))
    own_labs()

st.divider()
c = st.columns(4)
c[0].page_link(
    "views/disperse.py", label="Disperse: the clusters on a map", icon=":material/scatter_plot:"
)
c[1].page_link(
    "views/train.py", label="Train: jobs and loss curves", icon=":material/model_training:"
)
c[2].page_link("views/merge.py", label="Merge: weights and the landscape", icon=":material/merge:")
c[3].page_link("views/compare.py", label="Compare: SFT against DTM", icon=":material/bar_chart:")
