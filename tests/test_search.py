"""The merge-weight search and LM-Cocktail's weights, on objectives with a known answer."""

import math

import pytest

from dtm.errors import ConfigError
from dtm.merge.search import cocktail_weights, search_weights

TARGET = [0.6, 0.1, 0.3]


def _peak(w):
    """A concave objective over the simplex with its maximum 0 at TARGET."""
    return -sum((a - b) ** 2 for a, b in zip(w, TARGET, strict=True)), {}


def test_the_search_starts_at_uniform_and_the_vertices_then_finds_the_peak():
    found = search_weights(_peak, 3, budget=80, seed=0)
    pts = [p["weights"] for p in found["points"]]
    assert len(pts) == 80
    assert pts[0] == pytest.approx([1 / 3] * 3)
    assert pts[1:4] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    best = found["best"]
    assert best["score"] == max(p["score"] for p in found["points"])
    # far better than every starting point, and near the peak
    assert best["score"] > max(p["score"] for p in found["points"][:4]) + 0.05
    assert best["weights"] == pytest.approx(TARGET, abs=0.05)


def test_a_search_is_reproducible_with_its_seed():
    a = search_weights(_peak, 3, budget=20, seed=3)
    b = search_weights(_peak, 3, budget=20, seed=3)
    assert [p["weights"] for p in a["points"]] == [p["weights"] for p in b["points"]]


def test_the_pareto_front_holds_exactly_the_non_dominated_points():
    def two(w):  # conflicting: the first weight against the second
        return (w[0], w[1] + 0.5 * w[2]), {}

    found = search_weights(two, 3, budget=30, seed=0, pareto=True)
    values = [tuple(p["score"]) for p in found["points"]]
    front = {tuple(p["score"]) for p in found["front"]}
    for v in values:
        dominated = any(o[0] >= v[0] and o[1] >= v[1] and o != v for o in values)
        assert (v in front) == (not dominated)
    assert len(front) >= 2


def test_cocktail_weights_are_a_softmax_of_minus_loss_over_t():
    losses = [2.0, 1.0, 3.0]
    e = [math.exp(-x / 5.0) for x in losses]
    assert cocktail_weights(losses) == pytest.approx([v / sum(e) for v in e])
    # a lower temperature puts more weight on the lowest loss
    assert cocktail_weights(losses, 0.1)[1] > 0.99


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: search_weights(_peak, 3, budget=3), "--budget 3"),
        (lambda: search_weights(_peak, 1, budget=10), "at least two"),
        (lambda: cocktail_weights([1.0, float("nan")]), "finite loss"),
        (lambda: cocktail_weights([1.0, 2.0], 0.0), "temperature"),
    ],
)
def test_bad_search_settings_are_refused(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_the_search_by_block_finds_a_different_peak_in_each_block():
    """K = 3, B = 2: points are K x B tables; the starts are uniform and the vertices in
    every block; each block's column reaches its own peak."""
    from dtm.merge.search import default_budget

    target = [[0.6, 0.1], [0.1, 0.2], [0.3, 0.7]]

    def peak(t):
        flat = [x for r in t for x in r]
        want = [x for r in target for x in r]
        return -sum((a - b) ** 2 for a, b in zip(flat, want, strict=True)), {}

    found = search_weights(peak, 3, budget=150, seed=0, blocks=2)
    pts = [p["weights"] for p in found["points"]]
    assert all(len(p) == 3 and all(len(r) == 2 for r in p) for p in pts)
    assert [x for r in pts[0] for x in r] == pytest.approx([1 / 3] * 6)
    assert pts[1] == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    for p in pts:  # every block's weights sum to 1
        assert [sum(r[b] for r in p) for b in (0, 1)] == pytest.approx([1, 1])
    best = found["best"]["weights"]
    assert [x for r in best for x in r] == pytest.approx([x for r in target for x in r], abs=0.08)
    assert default_budget(3) == 40 and default_budget(4, 3) == 120
