"""Plotly figures drawn from the library's tables: pure functions, no Streamlit.
``explore``: the Disperse map, training curves, merge landscapes; ``results``: what
Compare and the Home story draw; ``blocks``: merge weights by block of layers and the
K = 4 landscape in 3-D."""

from dtm.charts.blocks import tetrahedron, weight_heatmap
from dtm.charts.explore import (
    by_distance,
    cluster_map,
    cluster_sizes,
    composition_bars,
    composition_order,
    distance_from_uniform,
    loss_curves,
    selected_rows,
    ternary,
    weight_slice,
)
from dtm.charts.palette import PALETTE
from dtm.charts.results import (
    figure_bytes,
    keeps_chart,
    ratio_curves,
    ratio_windows_chart,
    reference_bars,
    score_bars,
    tax_curve,
    token_bias_bars,
    tradeoff,
)

__all__ = [
    "PALETTE",
    "cluster_map",
    "cluster_sizes",
    "composition_bars",
    "composition_order",
    "figure_bytes",
    "keeps_chart",
    "loss_curves",
    "by_distance",
    "distance_from_uniform",
    "ratio_curves",
    "ratio_windows_chart",
    "reference_bars",
    "score_bars",
    "selected_rows",
    "tax_curve",
    "tetrahedron",
    "ternary",
    "token_bias_bars",
    "tradeoff",
    "weight_heatmap",
    "weight_slice",
]
