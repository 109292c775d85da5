"""Merge methods, each a small registered function.

Linear methods (``average``, ``linear``, ``task_arithmetic``) map the K weights to K
coefficients c_k; the merged delta is sum_k c_k * delta_k, held exactly as one LoRA of
rank sum(r_k) (``dtm.merge.lora``), so no dense matrix is ever built. Dense methods
(``ties``, ``dare``) take one layer's K dense deltas (each out x in) and return the merged
dense delta. Factor methods (``fisher``, ``official_ab_average``) combine the LoRA factors
A and B themselves and return one rank-r adapter layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dtm.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "linear" | "dense" | "factor"
    fn: Callable
    help: str


METHODS: dict[str, Method] = {}


def register(name: str, kind: str, help: str):
    def deco(fn):
        METHODS[name] = Method(name, kind, fn, help)
        return fn

    return deco


def check_weights(weights: list[float], k: int, *, normalise: bool) -> list[float]:
    """The weights as floats, with a clear error for a wrong count, NaN or all zeros."""
    if len(weights) != k:
        raise ConfigError(f"{len(weights)} weights for {k} adapters: give one weight each.")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) for x in w):
        raise ConfigError(f"merge weights {w}: NaN or infinite values are not weights.")
    if all(x == 0 for x in w):
        raise ConfigError("merge weights are all zero: nothing would be merged.")
    if normalise:
        total = sum(w)
        if total == 0:
            raise ConfigError(f"merge weights {w} sum to zero and cannot be normalised.")
        w = [x / total for x in w]
    return w


@register("average", "linear", "weights normalised to sum 1 (DTM)")
def average(weights, params):
    return check_weights(weights, len(weights), normalise=True)


@register("linear", "linear", "the raw weights")
def linear(weights, params):
    return check_weights(weights, len(weights), normalise=False)


@register("task_arithmetic", "linear", "lambda * sum w_k delta_k")
def task_arithmetic(weights, params):
    lam = float(params.get("lambda", 1.0))
    return [lam * w for w in check_weights(weights, len(weights), normalise=False)]


def _trim(t, density: float):
    """Keep the ``density`` fraction of largest-magnitude entries of ``t``."""
    import torch

    if density >= 1.0:
        return t
    k = max(1, int(round(density * t.numel())))
    threshold = torch.topk(t.abs().flatten(), k, sorted=False).values.min()
    return t * (t.abs() >= threshold)


def _consensus(tensors, weights):
    """TIES: elect each entry's sign by the weighted sum, then average (weighted) only the
    contributions that agree with it (the disjoint mean)."""
    import torch

    stacked = torch.stack([w * t for w, t in zip(weights, tensors, strict=True)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    wsum = sum(w * a.to(stacked.dtype) for w, a in zip(weights, agree.unbind(0), strict=True))
    total = (stacked * agree).sum(0)
    return torch.where(wsum > 0, total / wsum.clamp_min(1e-12), torch.zeros_like(total))


@register("ties", "dense", "trim to a density, elect the sign, disjoint mean")
def ties(deltas, weights, params, layer_seed):
    density = float(params.get("density", 0.2))
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], not {density}.")
    w = check_weights(weights, len(deltas), normalise=False)
    return _consensus([_trim(d, density) for d in deltas], w)


@register("dare", "dense", "drop with rate p, rescale by 1/(1-p); linear or TIES-style")
def dare(deltas, weights, params, layer_seed):
    import torch

    p = float(params.get("drop", 0.5))
    if not 0 <= p < 1:
        raise ConfigError(f"drop rate must be in [0, 1), not {p}.")
    w = check_weights(weights, len(deltas), normalise=False)
    gen = torch.Generator(device="cpu").manual_seed(layer_seed)
    kept = []
    for d in deltas:
        mask = (torch.rand(d.shape, generator=gen) >= p).to(d.device, d.dtype)
        kept.append(d * mask / (1 - p))
    if params.get("consensus") == "ties":
        return _consensus(kept, w)
    return sum(wk * d for wk, d in zip(w, kept, strict=True))


@register("fisher", "factor", "per-parameter weighting by each sub-model's diagonal Fisher")
def fisher(factors, weights, params, fishers):
    """factors: [(A_k, B_k)], fishers: [(F_A_k, F_B_k)]. Each LoRA parameter is the
    Fisher-weighted mean of the sub-models' (the Fisher is of the factors, so this merges
    A and B separately: exact only when the sub-models' factors agree)."""
    w = check_weights(weights, len(factors), normalise=True)
    eps = float(params.get("fisher_floor", 1e-8))
    out = []
    for i in (0, 1):
        num = sum(
            wk * f[i].clamp_min(eps) * fa[i] for wk, f, fa in zip(w, fishers, factors, strict=True)
        )
        den = sum(wk * f[i].clamp_min(eps) for wk, f in zip(w, fishers, strict=True))
        out.append(num / den)
    return out[0], out[1]


@register("official_ab_average", "factor", "the released code: average A and B separately")
def official_ab_average(factors, weights, params, fishers):
    """mean(B) @ mean(A) is not mean(B @ A): kept to show what the inexact way costs."""
    w = check_weights(weights, len(factors), normalise=True)
    a = sum(wk * f[0] for wk, f in zip(w, factors, strict=True))
    b = sum(wk * f[1] for wk, f in zip(w, factors, strict=True))
    return a, b
