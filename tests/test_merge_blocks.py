"""Weights by block of layers: the blocks, the --weights text and its errors."""

import pytest

from dtm.errors import ConfigError
from dtm.merge.blocks import block_bounds, block_of, compact, format_weights, parse_weights


def test_layers_split_into_contiguous_blocks_as_evenly_as_possible():
    assert block_bounds(4, 2) == [(0, 1), (2, 3)]
    assert block_bounds(4, 3) == [(0, 1), (2, 2), (3, 3)]
    assert block_bounds(24, 3) == [(0, 7), (8, 15), (16, 23)]
    assert block_bounds(4, 1) == [(0, 3)]
    assert [block_of(i, 5, 3) for i in range(5)] == [0, 0, 1, 1, 2]
    assert block_of(None, 5, 3) == 2  # a module outside the numbered layers: the top


def test_weights_text_is_blocks_from_the_bottom_each_with_k_weights():
    assert parse_weights("0.2,0.3,0.5", 3) == [0.2, 0.3, 0.5]
    t = parse_weights("0.6,0.3,0.1;0.1,0.2,0.7", 3)
    assert t == [[0.6, 0.1], [0.3, 0.2], [0.1, 0.7]]  # K rows x B columns
    assert format_weights(t) == "0.6,0.3,0.1;0.1,0.2,0.7"
    assert compact([[0.5, 0.5], [0.5, 0.5]]) == [0.5, 0.5]
    assert compact(t) == t


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "text, kw, message",
    [
        ("0.5,0.5", {}, "2 weights for 3 adapters: give one weight each"),
        ("0.2,0.3,0.5;0.5,0.5", {}, "block 2: 2"),
        ("1,1,1;1,1,1", {"blocks": 3}, "2 blocks, but --blocks 3"),
        ("1,1,1;1,1,1;1,1,1", {"n_layers": 2}, "3 blocks but the model has 2 layers"),
        ("1,x,1", {}, "not numbers"),
        ("0,0,0;0,0,0", {}, "all zero"),
        ("1,nan,1", {}, "NaN"),
    ],
)
def test_bad_weights_text_is_refused(text, kw, message):
    with pytest.raises(ConfigError, match=message):
        parse_weights(text, 3, **kw)


def test_the_k4_landscape_is_a_tetrahedron_with_its_points_inside():
    import numpy as np
    import pandas as pd

    from dtm.charts import tetrahedron, weight_heatmap
    from dtm.charts.blocks import VERTICES, to_3d

    # each sub-model alone is its vertex, the uniform point the centre; all edges equal
    assert np.allclose(to_3d(np.eye(4)), VERTICES)
    assert np.allclose(to_3d([[1, 1, 1, 1]]), 0)
    edges = {
        round(float(np.linalg.norm(VERTICES[i] - VERTICES[j])), 9)
        for i in range(4)
        for j in range(i)
    }
    assert len(edges) == 1
    frame = pd.DataFrame({"w0": [1, 0.25], "w1": [0, 0.25], "w2": [0, 0.25], "w3": [0, 0.25]})
    frame["acc"] = [0.3, 0.6]
    found = frame.iloc[[1]]
    fig = tetrahedron(frame, "acc", list("abcd"), current=[0.25] * 4, found=found)
    names = [t.name for t in fig.data]
    assert names[-3:] == ["scored", "found", "current"]
    assert list(fig.data[-3].marker.color) == [0.3, 0.6]
    heat = weight_heatmap([[0.6, 0.1], [0.4, 0.9]], ["s0", "s1"])
    assert heat.data[0].z.tolist() == [[0.6, 0.1], [0.4, 0.9]]
    assert list(heat.data[0].x) == ["bottom", "top"]


def test_a_merges_label_shows_its_weights_block_by_block():
    from dtm.merge.labels import recipe_label

    table = {"method": "average", "weights": [[0.6, 0.1], [0.3, 0.2], [0.1, 0.7]]}
    assert recipe_label(table) == "average: by block ×2: c0 .60/.10 · c1 .30/.20 · c2 .10/.70"
    same = {"method": "average", "weights": [[0.5, 0.5], [0.5, 0.5]]}
    assert recipe_label(same) == recipe_label({"method": "average", "weights": [0.5, 0.5]})
    assert recipe_label({"method": "ties", "weights": [0.2, 0.8], "params": {"density": 0.2}}) == (
        "ties: c0 .20 · c1 .80 · density=0.2"
    )


def test_the_landscape_beyond_k4_is_the_score_against_the_distance_from_uniform():
    """K = 5: each point at its distance from the uniform merge (0) toward a single
    sub-model (1), its score on the y axis and as its colour, the search's points apart;
    a point's index comes back on a click."""
    import math

    import pandas as pd

    from dtm import charts

    rows = [[0.2] * 5, [1, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.4, 0.4, 0.2, 0, 0]]
    frame = pd.DataFrame(rows, columns=[f"w{i}" for i in range(5)])
    frame["knowledge"] = [0.5, 0.3, 0.45, 0.47]
    frame["from"] = ["grid", "grid", "grid", "search"]
    fig = charts.by_distance(frame, [f"c{i}" for i in range(5)], "knowledge")
    grid, search = fig.data
    # by hand: |w - 1/5| over |e_1 - 1/5| = sqrt(0.8); (0.5, 0.5, 0, 0, 0): sqrt(0.3)
    assert list(grid.x) == pytest.approx([0.0, 1.0, math.sqrt(0.3 / 0.8)])
    assert list(search.x) == pytest.approx([math.sqrt((0.04 + 0.04 + 0 + 0.04 + 0.04) / 0.8)])
    assert list(grid.y) == [0.5, 0.3, 0.45] and list(grid.marker.color) == [0.5, 0.3, 0.45]
    assert list(grid.customdata) == [0, 1, 2] and list(search.customdata) == [3]
    assert search.marker.symbol == "diamond" and not search.marker.showscale
    assert fig.layout.legend.orientation == "h"  # above the plot, not over the colour bar
    assert "c0 1.00" in grid.text[1]
