"""The paper's analyses and the Compare page's tables, as tables (every table Compare
draws is made here; the page only draws them):

- ``ratio``: the loss-reduction ratio (``loss_ratio_curves``, ``ratio_windows``) and the
  alignment-tax curve (``alignment_tax_curve``), from a run's metrics records;
- ``tokens``: token-level bias (``token_level_bias``, ``token_bias``), the paper's figure 5;
- ``tables``: the benchmark tables (``summarise``, ``with_deltas``, ``wide``,
  ``model_order``, ``headline_measures``, ``delta_table``) and the paper's reported
  numbers (``paper_reference``).
"""

from dtm.analysis.ratio import (
    alignment_tax_curve,
    dtm_groups,
    fold_subs,
    loss_ratio_curves,
    ratio_runs,
    ratio_windows,
    scored_runs,
    windows_table,
)
from dtm.analysis.tables import (
    BIAS,
    REFERENCE,
    bias_measures,
    delta_table,
    headline_measures,
    model_order,
    paper_reference,
    summarise,
    wide,
    with_deltas,
)
from dtm.analysis.tokens import (
    code_token_drops,
    encode_split,
    token_bias,
    token_bias_sfts,
    token_bias_targets,
    token_level_bias,
    token_losses,
)

__all__ = [
    "BIAS",
    "REFERENCE",
    "alignment_tax_curve",
    "bias_measures",
    "code_token_drops",
    "delta_table",
    "encode_split",
    "headline_measures",
    "loss_ratio_curves",
    "model_order",
    "paper_reference",
    "dtm_groups",
    "fold_subs",
    "ratio_runs",
    "ratio_windows",
    "scored_runs",
    "summarise",
    "token_bias",
    "token_bias_sfts",
    "token_bias_targets",
    "token_level_bias",
    "token_losses",
    "wide",
    "with_deltas",
    "windows_table",
]
