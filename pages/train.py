"""Page 2 - Train (not built yet)."""

import streamlit as st

st.title("Train")
st.info(
    "Not built yet. This page will launch one LoRA sub-model per cluster of a saved "
    "assignment, together with the vanilla SFT baseline and the paper's other baselines "
    "(Uniform Soup, L2, EWC, replay), as background jobs on this machine or a Ray "
    "cluster, with live train and validation loss curves."
)
