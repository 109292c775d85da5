"""Shared by the pages: they run only inside app.py's navigation.

Until a server process has run app.py once, Streamlit serves a page URL (a bookmark, or a
browser tab reconnecting after the server restarted) in its legacy ``pages/`` mode: the
page file alone, without app.py's sidebar, job reconciliation and page list. A page
opened that way goes through app.py to the same page instead.
"""

from __future__ import annotations

import streamlit as st

GOTO = "dtm_goto_page"


def through_app(url_path: str) -> None:
    """Call at the top of a page, with its URL path (``"train"`` for pages/train.py)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the legacy mode
        return
    if PagesManager.uses_pages_directory:
        st.session_state[GOTO] = url_path
        st.switch_page("app.py")


def resume(pages: list) -> None:
    """In app.py, after ``st.navigation``: go on to the page a legacy-mode run wanted."""
    want = st.session_state.pop(GOTO, None)
    for p in pages:
        if want and p.url_path == want:
            st.switch_page(p)
