"""The Disperse-Then-Merge dashboard: `streamlit run app.py` (or `make run`)."""

import streamlit as st

st.set_page_config(page_title="Disperse-Then-Merge", page_icon=":material/hub:", layout="wide")
st.navigation(
    [
        st.Page(
            "pages/disperse.py", title="Disperse", icon=":material/scatter_plot:", default=True
        ),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/merge.py", title="Merge", icon=":material/merge:"),
        st.Page("pages/compare.py", title="Compare", icon=":material/bar_chart:"),
    ]
).run()
