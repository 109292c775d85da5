"""What the views share: the registry of this server's cache, opened once."""

from __future__ import annotations

import streamlit as st

from dtm.store import Registry, cache_dir


@st.cache_resource
def _registry(root: str) -> Registry:
    return Registry(root)


def registry() -> Registry:
    """The registry under ``$DTM_CACHE`` (one object per cache folder and server)."""
    return _registry(str(cache_dir()))
