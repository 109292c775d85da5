"""Finding merge weights: a search over the weight simplex, and LM-Cocktail's one-shot
weighting.

``search_weights(score_fn, k, budget)`` maximises ``score_fn(weights)`` over the simplex
with Optuna's CMA-ES sampler. Why CMA-ES through Optuna: the objective is a noisy,
non-differentiable function of a few continuous weights, which is what CMA-ES is for;
Optuna keeps it well maintained (its ``cmaes`` backend), seeds it, takes the starting
points we must try first (``enqueue_trial``), repairs bounds, and gives a multi-objective
sampler (NSGA-II) for a Pareto front of two scores with the same interface.

- Weights are ``x / sum(x)`` for ``x`` in ``[0, 1]^K``, so the vertices are reachable.
- The first evaluations are the uniform point and the K vertices, then CMA-ES from the
  uniform point; ``budget`` counts every evaluation, the starts included.
- By block (``blocks`` = B > 1, ``dtm.merge.blocks``): the search runs over K x B
  numbers, each block's K normalised apart, and its points' weights are K x B tables;
  the starts are the uniform point and the K vertices (the same in every block), and the
  default budget grows with the dimensions (``default_budget``: 10 evaluations per
  dimension, at least today's 40).
- Every evaluated point is returned: ``{"points": [{"weights", "score", "scores"}...],
  "best": {...}}`` (with ``"front"``, the non-dominated points, for two objectives).

``cocktail_weights(losses, temperature=5.0)`` is LM-Cocktail's ``softmax(-loss / T)``
(Xiao et al. 2023; 5.0 is their code's default temperature); ``cocktail(merger,
objective)`` measures each adapter's mean held-out loss and weighs them so.
``search_merge(merger, method, objective, budget)`` is the search over a merger's
weights (``dtm merge --search``, the Merge page's "Find weights").
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dtm.errors import ConfigError
from dtm.merge.blocks import format_weights


def cocktail_weights(losses: list[float], temperature: float = 5.0) -> list[float]:
    if temperature <= 0:
        raise ConfigError(f"temperature {temperature}: must be above 0.")
    if not losses or any(not math.isfinite(x) for x in losses):
        raise ConfigError(f"held-out losses {losses}: need a finite loss for every model.")
    z = [-x / temperature for x in losses]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def cocktail_losses(merger, objective) -> list[float]:
    """Each adapter's mean held-out loss: the objective's ``heldout:`` scores of the
    merge that is that adapter alone."""
    k = len(merger.sets)
    losses = []
    for i in range(k):
        one = [1.0 if j == i else 0.0 for j in range(k)]
        scores = objective.score(merger.apply("linear", one), merger.tokenizer)
        held = [v for label, v in scores.items() if label.startswith("heldout:")]
        if not held:
            raise ConfigError("LM-Cocktail weighs by held-out losses: choose one.")
        losses.append(sum(held) / len(held))
    return losses


def cocktail(merger, objective, temperature: float = 5.0) -> dict:
    """LM-Cocktail's weights of ``merger``'s adapters: ``{"method", "temperature",
    "losses", "best": {"weights"}}`` (``dtm merge --cocktail`` writes it as cocktail.json)."""
    losses = cocktail_losses(merger, objective)
    return {
        "method": "lm-cocktail",
        "temperature": temperature,
        "losses": losses,
        "best": {"weights": cocktail_weights(losses, temperature)},
    }


def default_budget(k: int, blocks: int = 1) -> int:
    """The search's evaluations when none are given: 10 per dimension (K x B), at least
    40 (what K <= 4 has always had)."""
    return max(40, 10 * k * blocks)


def search_merge(
    merger,
    method: str,
    objective,
    budget: int | None = 40,
    *,
    params: dict | None = None,
    seed: int = 0,
    blocks: int = 1,
    pareto: tuple[str, str] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """``search_weights`` (seeded by ``seed``) over the K x ``blocks`` weights of
    ``merger``'s ``method`` merge with ``params``, each point scored by ``objective`` (or
    the two labels of ``pareto``, for a Pareto front); ``budget`` None: ``default_budget``."""
    from dtm.merge.landscape import merge_score_fn  # lazy: torch

    fn = merge_score_fn(merger, method, objective, pareto, **(params or {}))
    k = len(merger.sets)
    if blocks > 1:
        merger.blocks_of_layers(blocks)  # more blocks than layers: refused before a score
    budget = default_budget(k, blocks) if budget is None else budget
    return search_weights(
        fn, k, budget, seed=seed, blocks=blocks, pareto=pareto is not None, progress=progress
    )


def _weights(x: list[float]) -> list[float]:
    total = sum(x)
    if total <= 0:
        return [1.0 / len(x)] * len(x)
    return [v / total for v in x]


def _table(x: list[float], k: int, blocks: int):
    """K x B weights from the search's K * B numbers (block-major), each block normalised;
    one block: K numbers."""
    if blocks == 1:
        return _weights(x)
    cols = [_weights(x[b * k : (b + 1) * k]) for b in range(blocks)]
    return [[cols[b][i] for b in range(blocks)] for i in range(k)]


def starts(k: int) -> list[list[float]]:
    """The uniform point, then the K vertices."""
    return [[1.0] * k] + [[1.0 if j == i else 0.0 for j in range(k)] for i in range(k)]


def search_weights(
    score_fn: Callable[[list[float]], tuple[float, dict] | tuple[tuple[float, float], dict]],
    k: int,
    budget: int = 40,
    *,
    seed: int = 0,
    blocks: int = 1,
    pareto: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """``score_fn(weights) -> (score, scores)``, or ``((a, b), scores)`` with ``pareto``;
    ``weights`` are K numbers, or a K x ``blocks`` table."""
    import logging

    import optuna

    if k < 2:
        raise ConfigError(f"{k} model(s): the weight search needs at least two.")
    if budget < k + 1:
        raise ConfigError(
            f"--budget {budget}: needs at least {k + 1} evaluations (the uniform point and "
            f"the {k} vertices come first)."
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    if isinstance(blocks, bool) or int(blocks) != blocks or blocks < 1:
        raise ConfigError(f"--blocks {blocks}: give a whole number of at least 1.")
    names = (
        [f"x{i}" for i in range(k)]
        if blocks == 1
        else [f"x{i}_b{b}" for b in range(blocks) for i in range(k)]
    )
    if pareto:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, 2 * k))
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    else:
        sampler = optuna.samplers.CmaEsSampler(
            x0=dict.fromkeys(names, 1.0 / k), sigma0=0.3, seed=seed, n_startup_trials=0
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)
    for x in starts(k):
        study.enqueue_trial(dict(zip(names, x * blocks, strict=True)))
    points: list[dict] = []

    def objective(trial):
        x = [trial.suggest_float(n, 0.0, 1.0) for n in names]
        w = _table(x, k, blocks)
        value, scores = score_fn(w)
        values = value if pareto else (value,)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(
                f"the objective is not a finite number at weights "
                f"{format_weights(w)} ({scores}): a loss overflowed or a task scored "
                "nothing; the search stopped."
            )
        points.append({"weights": w, "score": value, "scores": scores})
        if progress:
            progress("weight search", len(points) / budget)
        return tuple(value) if pareto else value

    study.optimize(objective, n_trials=budget)
    if pareto:
        front = _front([p["score"] for p in points])
        best = max((points[i] for i in front), key=lambda p: sum(p["score"]))
        return {"points": points, "best": best, "front": [points[i] for i in front]}
    best = max(points, key=lambda p: p["score"])
    return {"points": points, "best": best}


def _front(values: list[tuple[float, float]]) -> list[int]:
    out = []
    for i, (a, b) in enumerate(values):
        dominated = any(
            (c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(values) if j != i
        )
        if not dominated:
            out.append(i)
    return out
