"""The Disperse-Then-Merge dashboard: `streamlit run app.py` (or `make run`)."""

import streamlit as st

st.set_page_config(page_title="Disperse-Then-Merge", page_icon="🧪", layout="wide")
st.navigation(
    [
        st.Page("pages/disperse.py", title="Disperse", icon="🗺️", default=True),
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/merge.py", title="Merge", icon="🔀"),
        st.Page("pages/compare.py", title="Compare", icon="📊"),
    ]
).run()
