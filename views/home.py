"""Home: what alignment tax and DTM are, and one button that runs the whole lab story
(build or reuse the lab, disperse, train SFT and the sub-models, merge, evaluate)."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from dtm import jobs
from dtm.errors import DTMError
from dtm.experiment import STAGES, experiment_dir, launch, load_experiment, read_status

LAB_STORY = Path(__file__).resolve().parents[1] / "experiments" / "lab.yaml"
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

exp = load_experiment(LAB_STORY)
c = st.columns([2, 3])
started = c[0].button(
    "Run the lab story",
    type="primary",
    icon=":material/play_arrow:",
    key="home_run",
    help=f"python -m dtm run {LAB_STORY.relative_to(LAB_STORY.parents[1])} in the background",
)
n_jobs = len(exp.seeds) * (1 + exp.k * len(exp.methods) + len(exp.baselines))
c[1].caption(
    f"K={exp.k} sub-models ({', '.join(exp.methods)} clusters), vanilla SFT, baselines "
    f"{', '.join(exp.baselines)}, seeds {exp.seeds}: {n_jobs} training runs (SFT and the "
    "sub-models of each seed together in one process), then merging and scoring every "
    "model. About 13 minutes on a 2-core CPU once the lab is built (bench/train.py "
    "--part story); what is already trained or scored is reused."
)
if started:
    try:
        launch(LAB_STORY, exp.name)
    except (DTMError, OSError) as e:
        st.error(f"Could not start the lab story: {e}")


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
        icon = {"done": "✅", "running": "⏳", "failed": "❌"}.get(s["state"], "·")
        col.markdown(f"{icon} {STAGE_TEXT[name]}")
        col.progress(min(float(s.get("fraction", 0.0)), 1.0))
    if st_.get("detail"):
        st.caption(st_["detail"])
    if st_.get("error"):
        st.error(st_["error"])
    try:
        group = [j for j in jobs.JobStore().list(group=exp.name) if j.kind != "group"]
    except DTMError as e:  # a locked or unreadable registry: said, and the page goes on
        st.error(str(e))
        group = []
    if group:
        done = sum(j.state == "done" for j in group)
        st.caption(f"Training runs: {done} of {len(group)} done. Watch them on the Train page.")
    results = experiment_dir(exp.name) / "results.md"
    if results.exists():
        st.markdown(results.read_text(encoding="utf-8", errors="replace"))
    log = experiment_dir(exp.name) / "run.log"
    if state in ("failed", "interrupted") and log.exists():
        with st.expander("run log"):
            st.code(log.read_text(errors="replace")[-4000:], language=None)


story()
st.divider()
c = st.columns(4)
c[0].page_link("views/disperse.py", label="Disperse: the clusters on a map", icon="🗺️")
c[1].page_link("views/train.py", label="Train: jobs and loss curves", icon="📉")
c[2].page_link("views/merge.py", label="Merge: weights and the landscape", icon="🔀")
c[3].page_link("views/compare.py", label="Compare: SFT against DTM", icon="📊")
