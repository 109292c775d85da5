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
from typing import Any

from dtm.errors import ConfigError
from dtm.merge.blocks import check_shape, column, is_table, n_blocks


@dataclass(frozen=True)
class Param:
    """A method parameter: the CLI flag, the page widget and the YAML check are made from
    it. ``low``/``high`` bound numbers (``low_open``/``high_open``: the bound itself is
    not allowed); ``choices`` list the values of a text parameter."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    flag: str | None = None  # the CLI flag, when not --NAME

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"in {lo}{self.low:g}, {self.high:g}{hi}"

    def slider(self) -> tuple[float, float, float]:
        """``(low, high, step)`` of a page's slider: an open bound is kept out of the
        range by one step, and the range ends at 10 at most."""
        step = 0.05 if self.high <= 1 else 0.1
        lo = self.low + step if self.low_open else self.low
        return lo, min(self.high, 10.0) - (step if self.high_open else 0.0), step

    def check(self, value: Any) -> Any:
        """The value as this parameter's type, or a ConfigError naming it and its range."""
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{self.name} {value!r}: {self.range_text()}.")
            return value
        try:
            if isinstance(value, bool):
                raise ValueError
            v = self.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.name} {value!r}: not a number.") from None
        bad = (
            not math.isfinite(v)
            or (self.low is not None and (v < self.low or (self.low_open and v == self.low)))
            or (self.high is not None and (v > self.high or (self.high_open and v == self.high)))
        )
        if bad:
            raise ConfigError(f"{self.name} must be {self.range_text()}, not {v}.")
        return v


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "linear" | "dense" | "factor"
    fn: Callable
    help: str
    params: tuple[Param, ...] = ()


METHODS: dict[str, Method] = {}


def register(name: str, kind: str, help: str, params: tuple[Param, ...] = ()):
    def deco(fn):
        METHODS[name] = Method(name, kind, fn, help, params)
        return fn

    return deco


def all_params() -> dict[str, Param]:
    """Every method's parameters by name (a name means the same in every method)."""
    out: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            out.setdefault(p.name, p)
    return out


def check_params(method: str, params: dict, *, allow_other: bool = False) -> dict:
    """``params`` checked against ``method``'s declared parameters, defaults filled in.
    ``allow_other`` lets parameters of other methods pass (one experiment's params serve
    all its methods)."""
    if method not in METHODS:
        raise ConfigError(f"merge method {method!r}: choose one of {', '.join(METHODS)}.")
    own = {p.name: p for p in METHODS[method].params}
    known = all_params() if allow_other else own
    unknown = sorted(set(params) - set(known))
    if unknown:
        names = ", ".join(own) or "none"
        raise ConfigError(f"{method}: unknown parameters {', '.join(unknown)} (it takes {names}).")
    out = {n: p.default for n, p in own.items()}
    for name, value in params.items():
        out[name] = known[name].check(value) if value is not None else None
    return out


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


def check_merge_weights(weights, k: int):
    """A merge's weights checked: K numbers (``check_weights``), or a K x B table whose
    every block (column) has K finite numbers (the error names the block). One block may
    be all zero (its layers keep the base's weights: the per-block frontier's points);
    a whole table of zeros is refused, and ``average`` refuses a zero block when it
    normalises it."""
    weights = list(weights)
    check_shape(weights, k)
    if not is_table(weights):
        return check_weights(weights, k, normalise=False)
    for b in range(n_blocks(weights)):
        col = column(weights, b)
        if all(x == 0 for x in col) and all(math.isfinite(x) for x in col):
            continue
        try:
            check_weights(col, k, normalise=False)
        except ConfigError as e:
            raise ConfigError(f"block {b + 1} (from the bottom): {e}") from None
    if all(x == 0 for row in weights for x in row):
        raise ConfigError("merge weights are all zero: nothing would be merged.")
    return [[float(x) for x in row] for row in weights]


def add_merge_arguments(parser) -> None:
    """One ``dtm merge`` flag per declared parameter (its help names its method)."""
    for p in all_params().values():
        kw: dict[str, Any] = {"dest": f"param_{p.name}", "help": p.help}
        if p.choices:
            kw["choices"] = [c for c in p.choices if c is not None]
        else:
            kw["type"] = p.type
        kw["default"] = 0 if p.name == "seed" else None
        parser.add_argument(p.flag or f"--{p.name}", **kw)


def merge_params_from_args(method: str, args) -> dict:
    """The parameters given on the command line, each checked against its range (the
    seed is always recorded, as every merge's recipe has had it)."""
    params = {}
    for p in all_params().values():
        value = getattr(args, f"param_{p.name}", None)
        if value is not None:
            params[p.name] = p.check(value)
    return params


def widget_spec(method: str) -> list[Param]:
    """The parameters a page shows for ``method``, in declaration order."""
    return list(METHODS[method].params)


def _block_weights(weights) -> list[float]:
    """One block's raw weights: finite numbers, all zero allowed (that block's layers keep
    the base's weights; a merge of zeros everywhere is refused by ``check_merge_weights``)."""
    if all(x == 0 for x in weights):
        return [0.0] * len(weights)
    return check_weights(weights, len(weights), normalise=False)


@register("average", "linear", "weights normalised to sum 1 (DTM)")
def average(weights, params):
    try:
        return check_weights(weights, len(weights), normalise=True)
    except ConfigError as e:  # a block of zeros in a K x B table
        raise ConfigError(f"average normalises each block's weights to sum 1: {e}") from None


@register("linear", "linear", "the raw weights")
def linear(weights, params):
    return _block_weights(weights)


LAMBDA = Param(
    "lambda",
    float,
    1.0,
    "task_arithmetic: the scale of the summed deltas",
    0.0,
    100.0,
    flag="--lambda",
)
DENSITY = Param("density", float, 0.2, "ties: fraction of each delta kept", 0.0, 1.0, low_open=True)
DROP = Param("drop", float, 0.5, "dare: drop rate p", 0.0, 1.0, high_open=True)
SEED = Param("seed", int, 0, "dare: mask seed", 0, 2**31 - 1)
CONSENSUS = Param("consensus", str, None, "dare: TIES-style sign consensus", choices=(None, "ties"))


@register("task_arithmetic", "linear", "lambda * sum w_k delta_k", (LAMBDA,))
def task_arithmetic(weights, params):
    lam = LAMBDA.check(params.get("lambda", LAMBDA.default))
    return [lam * w for w in _block_weights(weights)]


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


@register("ties", "dense", "trim to a density, elect the sign, disjoint mean", (DENSITY,))
def ties(deltas, weights, params, layer_seed):
    density = DENSITY.check(params.get("density", DENSITY.default))
    w = check_weights(weights, len(deltas), normalise=False)
    return _consensus([_trim(d, density) for d in deltas], w)


@register(
    "dare",
    "dense",
    "drop with rate p, rescale by 1/(1-p); linear or TIES-style",
    (DROP, SEED, CONSENSUS),
)
def dare(deltas, weights, params, layer_seed):
    import torch

    p = DROP.check(params.get("drop", DROP.default))
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
