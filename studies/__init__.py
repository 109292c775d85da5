"""Studies: scripts that measure what the lab and the methods do (``python -m studies.NAME``)."""
