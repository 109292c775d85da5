"""Scoring a model: the quick engine (in process) and lm-evaluation-harness (full).

- ``scoring``: shared-context log-likelihoods (``continuation_scores``), multiple-choice
  predictions and greedy decoding: the model calls both engines make.
- ``lab``: the lab's tasks, each scored by the scorer the task table names
  (``evaluate_lab``, ``SCORERS``); ``checks`` the rules its generation tasks apply.
- ``user``: a folder of lm-evaluation-harness task YAMLs (``folder_tasks``,
  ``build_task``, ``quick_evaluate``).
- ``harness``: lm-evaluation-harness on a model object (``run_harness``, ``PAPER_TASKS``).
- ``heldout``: the mean token loss on held-out rows or text (``heldout_loss``).
- ``engines``: the one interface over all of them (``evaluate``, ``known_tasks``,
  ``check_heldout``).

The names below are importable from ``dtm.evaluate`` itself; each is loaded from its
module on first use, so that importing one light module of the package (``user``,
``harness``, ``checks``) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ENGINES": "engines",
    "check_heldout": "engines",
    "evaluate": "engines",
    "known_tasks": "engines",
    "SCORERS": "lab",
    "evaluate_lab": "lab",
    "favourite_uptake": "lab",
    "read_items": "lab",
    "score_bias": "lab",
    "score_instruct": "lab",
    "score_mc": "lab",
    "continuation_scores": "scoring",
    "generate": "scoring",
    "greedy": "scoring",
    "mc_predictions": "scoring",
    "build_task": "user",
    "folder_tasks": "user",
    "quick_evaluate": "user",
    "CODE_TASKS": "harness",
    "PAPER_TASKS": "harness",
    "check_code_opt_in": "harness",
    "run_harness": "harness",
    "heldout_loss": "heldout",
    "result_key": "heldout",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dtm.evaluate' has no attribute {name!r}")
    mod = importlib.import_module(f"dtm.evaluate.{module}")  # lazy: torch (see above)
    value = getattr(mod, name)
    globals()[name] = value
    return value
