"""The Disperse-Then-Merge dashboard: `streamlit run app.py` (or `make run`)."""

import os
from pathlib import Path

import streamlit as st

from dtm import jobs
from dtm.errors import DTMError
from dtm.lab import ensure_default_lab, lab_status

# The tab's icon is a file served by this server: a ":material/...:" icon would make the
# browser fetch it from fonts.gstatic.com (no request may leave the machine).
ICON = Path(__file__).parent / "views" / "icon.svg"
st.set_page_config(page_title="Disperse-Then-Merge", page_icon=str(ICON), layout="wide")
PAGES = [
    st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("views/disperse.py", title="Disperse", icon=":material/scatter_plot:"),
    st.Page("views/train.py", title="Train", icon=":material/model_training:"),
    st.Page("views/merge.py", title="Merge", icon=":material/merge:"),
    st.Page("views/compare.py", title="Compare", icon=":material/bar_chart:"),
]
page = st.navigation(PAGES)

# The default lab builds in a background process on first start; pages never wait for it.
if os.environ.get("DTM_LAB_AUTOBUILD", "1") != "0":
    ensure_default_lab()
first = lab_status()


@st.cache_resource(show_spinner=False)
def reconcile_jobs() -> str | None:
    """Once per server start: jobs whose process died while the server was down become
    interrupted, running ones are re-attached, and queued ones start."""
    try:
        jobs.refresh()
    except DTMError as e:
        return str(e)
    return None


jobs_error = reconcile_jobs()


@st.fragment(run_every=3 if first["state"] == "building" else None)
def lab_panel() -> None:
    status = lab_status()
    if status["state"] == "building":
        st.progress(status["fraction"], text=f"Building the alignment-tax lab: {status['stage']}")
    elif status["state"] == "failed":
        st.error(f"The alignment-tax lab build failed: {status['error']}")
        with st.expander("build log"):
            st.code(status["log"] or "(empty)", language=None)
        if st.button("Retry the lab build", key="lab_retry"):
            ensure_default_lab(retry=True)
            st.rerun(scope="app")
    elif status["state"] == "ready":
        st.caption("Alignment-tax lab: ready")
    if status["state"] != first["state"]:
        st.rerun(scope="app")


with st.sidebar:
    lab_panel()
    if jobs_error:
        st.error(f"Background jobs: {jobs_error}")
page.run()
