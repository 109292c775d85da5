"""The merge landscape and its references: points of the weight simplex, their quick
scores, the Pareto front, and the logit ensemble of the sub-models.

``quick_score(model, tok, bench)`` -> ``{"knowledge": acc, "reasoning": acc,
"instruct": acc}`` on the first ``limit`` items of each lab task (the Merge page's live
score). ``landscape(merger, method, points, ...)`` scores each weight vector.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dtm import threads
from dtm.evaluate import evaluate_lab
from dtm.merge.blocks import is_table
from dtm.merge.objective import lower_is_better
from dtm.tasks import QUICK_TASKS  # noqa: E402  (the task table's quick set)


def quick_score(model, tokenizer, bench: str | Path, limit: int = 40, tasks=None) -> dict:
    tasks = tasks or QUICK_TASKS
    res = evaluate_lab(model, tokenizer, bench, tuple(tasks.values()), limit=limit)
    return {short: res[task]["acc"] for short, task in tasks.items()}


def simplex_grid(k: int, step: float = 0.1) -> np.ndarray:
    """Every weight vector of ``k`` non-negative multiples of ``step`` summing to 1."""
    n = round(1 / step)
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], dtype=float) / n


def simplex_sample(k: int, n: int, seed: int = 0) -> np.ndarray:
    """The K vertices, the centre, and ``n`` seeded uniform (Dirichlet(1)) points."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.eye(k), np.full((1, k), 1 / k), rng.dirichlet(np.ones(k), size=n)])


def slice_points(current: list[float], i: int, j: int, n: int = 6) -> np.ndarray:
    """A 2-D slice of weight space: w_i and w_j each over n values in [0, 1], the other
    weights held at ``current``."""
    pts = []
    for a in np.linspace(0, 1, n):
        for b in np.linspace(0, 1, n):
            w = np.array(current, dtype=float)
            w[i], w[j] = a, b
            if w.sum() > 0:
                pts.append(w)
    return np.array(pts)


def landscape(
    merger,
    method: str,
    points: np.ndarray,
    objective,
    *,
    progress=None,
    **params,
) -> pd.DataFrame:
    """One row per weight vector: ``w0..w{K-1}``, the objective's scores (``dtm.merge.
    objective``) and their scalar ``objective``."""
    rows = []
    for i, w in enumerate(points):
        model = merger.apply(method, list(map(float, w)), **params)
        scores = objective.score(model, merger.tokenizer)
        rows.append(
            {
                **{f"w{k}": float(v) for k, v in enumerate(w)},
                **scores,
                "objective": objective.value(scores),
            }
        )
        if progress:
            progress("merge landscape", (i + 1) / len(points))
    return pd.DataFrame(rows)


def landscape_points(
    view: str, k: int, n: int, current: list[float] | None = None, pair=(0, 1)
) -> np.ndarray:
    """The Merge page's points: a ``"2-D slice"`` through ``current`` over the weights
    ``pair``; otherwise the simplex's 0.1 grid (K = 3) or ``n`` sampled points."""
    if view == "2-D slice":
        return slice_points(current, *pair)
    return simplex_grid(3, 0.1) if k == 3 else simplex_sample(k, n, seed=0)


def search_frame(found: dict, objective) -> pd.DataFrame:
    """A weight search's points as landscape rows (``w0..``, the scores, ``objective``),
    ``from`` = ``search``; a search by block is placed at each sub-model's mean weight
    over the blocks."""
    rows = [
        {
            **{f"w{i}": v for i, v in enumerate(_per_model(p["weights"]))},
            **p["scores"],
            "objective": objective.value(p["scores"]),
            "from": "search",
        }
        for p in found["points"]
    ]
    return pd.DataFrame(rows)


def _per_model(weights) -> list[float]:
    """K numbers of K numbers or of a K x B table (each row's mean over the blocks)."""
    if is_table(weights):
        return [sum(row) / len(row) for row in weights]
    return list(weights)


def reference_scores(merger, objective, names: list[str], progress=None) -> dict[str, dict]:
    """``{"base": scores, name: scores, ...}``: the base model and each sub-model alone,
    from the loaded merger (nothing more is loaded); ``progress(what, fraction)`` before
    each."""
    k = len(names)
    if progress:
        progress("scoring the base model", 0.0)
    with merger.base_only() as base:
        rows = {"base": objective.score(base, merger.tokenizer)}
    for i, name in enumerate(names):
        if progress:
            progress(f"scoring {name} alone ({i + 1} of {k})", (i + 1) / (k + 1))
        one = [1.0 if j == i else 0.0 for j in range(k)]
        rows[name] = objective.score(merger.apply("linear", one), merger.tokenizer)
    return rows


def live_score(merger, method: str, weights: list[float], objective, **params):
    """``(scores, milliseconds)``: the merge at ``weights`` scored by ``objective``, and
    how long merging and scoring took. The server claims its share of the cores while it
    scores (``dtm.threads``): jobs training beside it take theirs."""
    t0 = time.perf_counter()
    with threads.computing("the Merge page's live score"):
        scores = objective.score(merger.apply(method, weights, **params), merger.tokenizer)
    return scores, (time.perf_counter() - t0) * 1000


def ensemble_score(merger, objective, weights: list[float]) -> dict | None:
    """The logit ensemble's scores on the objective's lab tasks and held-out losses (a
    folder task is not scored on it; weights by block: each sub-model's mean over the
    blocks); None when it has neither."""
    if not (objective.lab_tasks or objective.heldout):
        return None
    weights = _per_model(weights)  # the ensemble has no layers: a table's row means
    ens = dataclasses.replace(objective, tasks=()) if objective.tasks else objective
    return ens.score(LogitEnsemble(merger, weights), merger.tokenizer)


def landscape_table(frames: list[pd.DataFrame]) -> tuple[pd.DataFrame, list[str], tuple]:
    """The landscape's and the search's points as one table, its score columns, and the
    two a Pareto chart shows (knowledge and instruct when scored)."""
    frame = pd.concat(frames, ignore_index=True)
    scored = [
        c for c in frame.columns if not (c.startswith("w") and c[1:].isdigit()) and c != "from"
    ]
    x = "knowledge" if "knowledge" in scored else scored[0]
    y = "instruct" if "instruct" in scored else scored[-1]
    return frame, scored, (x, y)


def merge_score_fn(merger, method: str, objective, pareto: tuple[str, str] | None = None, **params):
    """``weights -> (value, scores)`` for ``dtm.merge.search.search_weights``: the merge at
    those weights, scored by ``objective`` (with ``pareto``: the two labels' signed
    values)."""

    def fn(weights):
        scores = objective.score(merger.apply(method, weights, **params), merger.tokenizer)
        if pareto:
            signed = tuple(-scores[x] if lower_is_better(x) else scores[x] for x in pareto)
            return signed, scores
        return objective.value(scores), scores

    return fn


class _Out:
    def __init__(self, logits):
        self.logits = logits


class LogitEnsemble(torch.nn.Module):
    """The weighted mean of the K sub-models' logits (K forward passes per step): the
    reference a merge is compared with at 1/K of its cost."""

    def __init__(self, merger, weights: list[float]) -> None:
        super().__init__()
        self.merger = merger
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.inner = merger.model  # for parameters(), device and train/eval

    def forward(self, input_ids, attention_mask=None, **kw):
        k = len(self.weights)
        out = 0
        for i, w in enumerate(self.weights):
            if w == 0:
                continue
            one_hot = [1.0 if j == i else 0.0 for j in range(k)]
            model = self.merger.apply("linear", one_hot)
            out = (
                out
                + w * model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits.float()
            )
        return _Out(out)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
        """Greedy decoding (left-padded rows), no cache: fine for the lab's model."""
        ids, mask = input_ids, attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            nxt = self(ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            done |= nxt == eos_token_id
            if done.all():
                break
        return ids
