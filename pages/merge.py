"""Page 3 - Merge (not built yet)."""

import streamlit as st

st.title("Merge")
st.info(
    "Not built yet. This page will merge the K sub-models exactly (weighted average, "
    "Fisher, task arithmetic, TIES, DARE), with a slider per sub-model, a live score of "
    "the merged model, a map of the merge landscape, and export."
)
