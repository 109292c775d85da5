"""The one colour cycle every figure draws clusters and models with."""

from plotly.colors import qualitative

PALETTE = qualitative.Plotly + qualitative.D3
