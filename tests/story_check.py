"""A story panel's sentence read against the table shown under its chart: every number the
sentence states is a cell of the table, or the median or mean of cells that it names,
recomputed here from the table's text (not from the code that wrote the sentence).

``table`` is a list of rows, each a dict of column -> text, as a reader sees it."""

from __future__ import annotations

import re
import statistics

NUM = r"([+-]?\d+(?:\.\d+)?)"


def _f(x: str) -> float:
    return float(x.replace("+", ""))


def _close(said: str, value: float, digits: int) -> None:
    assert abs(_f(said) - value) <= 0.5 * 10**-digits + 1e-9, (said, value)


def _digits(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def check_tax(sentence: str, table: list[dict]) -> None:
    first, last = table[0], table[-1]
    m = re.search(
        rf"format (?:goes|has gone) from {NUM} to {NUM} and knowledge from {NUM} to {NUM}",
        sentence,
    )
    assert m, sentence
    f0, f1, k0, k1 = m.groups()
    assert (f0, k0) == (first["answer format"], first["knowledge"]), (sentence, first)
    assert (f1, k1) == (last["answer format"], last["knowledge"]), (sentence, last)
    so_far = re.search(r"So far \(SFT seed \d+, step (\d+)(?: of (\d+))?\)", sentence)
    if so_far:
        assert so_far.group(1) == last["step"]
        if so_far.group(2):
            assert int(so_far.group(1)) < int(so_far.group(2))  # not over: no finding
        assert "%" not in sentence and "by step" not in sentence
        return
    at = re.search(r"by step (\d+), where the format has 90% of its gain", sentence)
    if at:
        fmt = [(int(r["step"]), _f(r["answer format"])) for r in table]
        gain = _f(f1) - _f(f0)
        reached = [s for s, v in fmt if v - _f(f0) >= 0.9 * gain - 1e-9]
        # the table rounds to 2 digits: the step is the first one at 90%, give or take that
        assert int(at.group(1)) in {s for s, _ in fmt}
        assert abs(reached[0] - int(at.group(1))) <= max(
            b - a for (a, _), (b, _) in zip(fmt, fmt[1:], strict=False)
        )


def check_ratio(sentence: str, table: list[dict]) -> None:
    if "not yet moved" in sentence:
        assert all(r["ratio"] == "within noise" for r in table), table
        return
    m = re.search(rf"falls {NUM}× as fast as the validation loss in the first window", sentence)
    assert m, sentence
    firsts = {}
    for r in sorted(table, key=lambda r: int(r["window"])):
        if r["ratio"] != "within noise":
            firsts.setdefault(r["run"], r)
    _close(m.group(1), statistics.median(_f(r["ratio"]) for r in firsts.values()), 2)
    steps = re.search(r"\(steps (\S+)–(\S+)\)", sentence)
    if steps:
        (only,) = firsts.values()
        assert only["steps"] == f"{steps.group(1)}–{steps.group(2)}"
    later = re.search(r"at least \S+× as fast in every seed \(([^;]+);", sentence)
    if later:
        said = [x.strip() for x in later.group(1).split(",")]
        for run, value in zip(sorted(firsts), said, strict=True):
            w = int(firsts[run]["window"])
            bounds = [
                _f(r["at least (95%)"])
                for r in table
                if r["run"] == run and int(r["window"]) > w and r["at least (95%)"]
            ]
            _close(value, max(bounds), 1)


def check_bars(sentence: str, table: list[dict]) -> None:
    rows = {r["model"]: r for r in table}
    m = re.match(r"(\S+): knowledge " + NUM + r" against SFT's " + NUM, sentence)
    assert m, sentence
    d = rows[m.group(1)]
    assert (m.group(2), m.group(3)) == (d["knowledge"], rows["sft"]["knowledge"])
    r = re.search(rf"reasoning {NUM} against SFT's {NUM}", sentence)
    if r:
        assert (r.group(1), r.group(2)) == (d["reasoning"], rows["sft"]["reasoning"])
    f = re.search(
        rf"format {NUM}, where the shrinkage control (.+?) has {NUM} and SFT {NUM}", sentence
    )
    if f:
        assert f.group(1) == d["answer format"]
        assert f.group(3) == rows[f.group(2)]["answer format"]
        assert f.group(4) == rows["sft"]["answer format"]
    n = re.search(r"mean over (\d+) seed", sentence)
    assert n and n.group(1) == d["seeds"]


def check_keeps(sentence: str, table: list[dict]) -> None:
    fav = [r for r in table if r["what"] != "shared format"]
    fmt = [r for r in table if r["what"] == "shared format"]

    def mean(rows, role):
        return statistics.mean(_f(r["above the base"]) for r in rows if r["role"] == role)

    m = re.search(rf"favourite by {NUM} on average, the merge by {NUM}", sentence)
    if m:
        _close(m.group(1), mean(fav, "own sub-model"), _digits(m.group(1)))
        _close(m.group(2), mean(fav, "DTM"), _digits(m.group(2)))
    g = re.search(rf"format gains {NUM} in a sub-model alone and {NUM} in the merge", sentence)
    if g:
        _close(g.group(1), mean(fmt, "sub-model"), _digits(g.group(1)))
        _close(g.group(2), mean(fmt, "DTM"), _digits(g.group(2)))
    assert m or g, sentence


CHECKS = {"tax": check_tax, "ratio": check_ratio, "bars": check_bars, "keeps": check_keeps}


def check_panel(key: str, sentence: str, table: list[dict]) -> None:
    CHECKS[key](sentence, table)


def frame_rows(frame) -> list[dict]:
    """A panel's ``table`` (a DataFrame of text) as rows."""
    return [{c: str(v) for c, v in row.items()} for row in frame.to_dict("records")]
