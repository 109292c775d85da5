"""Page 4 - Compare (not built yet)."""

import streamlit as st

st.title("Compare")
st.info(
    "Not built yet. This page will compare benchmark scores of the base model, vanilla "
    "SFT, DTM and the baselines, and draw the loss-reduction-ratio and alignment-tax "
    "curves of the paper's pilot study."
)
