"""The merge-weight search (``dtm merge --search``'s ``search_weights``) against a grid, on
the lab at K=3, in one run.

K=3 sub-models of the lab, one per instruction family (``flan``, ``cot``, ``chat``; so the
sub-models differ), trained here for ``--steps`` steps each with the lab's SFT settings,
merged by ``average``. The objective is the mean of the
Merge page's default live score (knowledge, reasoning, instruct; the first ``--limit``
items of each). Every point of the 0.05 grid over the simplex is scored (231 points);
then the search runs from ``--seeds`` seeds with ``--budget`` evaluations each, and for
each seed the number of evaluations it took to reach the grid's best score is reported
(its own best, when it never does). Scores are exact (no noise between calls), so a
point scored twice scores the same.

    .venv/bin/python -m bench.search [--lab DIR] [--steps 40] [--limit 40] [--budget 60]
                                     [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.labsubs import train_lab_subs
from dtm.lab import default_lab_dir
from dtm.tasks import QUICK_TASKS

K = 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lab", default=str(default_lab_dir()))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--budget", type=int, default=60)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    from dtm.merge.engine import Merger  # lazy: torch (kept out of --help)
    from dtm.merge.landscape import merge_score_fn, simplex_grid  # lazy: torch
    from dtm.merge.objective import lab_objective  # lazy: torch
    from dtm.merge.search import search_weights  # lazy: optuna

    lab = Path(args.lab)
    if not (lab / "lab.json").exists():
        print(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(x) for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
        families = {"flan": 0, "cot": 1, "chat": 2}
        clusters = {r["id"]: families[r["source"]] for r in rows if r["source"] in families}
        adapters = train_lab_subs(lab, clusters, args.steps, Path(tmp))
        merger = Merger(str(lab / "model"), adapters)
        objective = lab_objective(str(lab), QUICK_TASKS, args.limit)
        fn = merge_score_fn(merger, "average", objective)
        t0 = time.perf_counter()
        grid = simplex_grid(K, 0.05)
        grid_scores = [fn(list(map(float, w)))[0] for w in grid]
        grid_s = time.perf_counter() - t0
        best_i = max(range(len(grid)), key=grid_scores.__getitem__)
        best = grid_scores[best_i]
        uniform = fn([1 / K] * K)[0]
        print(
            f"lab {lab}; K={K} sub-models ({args.steps} steps each), average merge; objective: "
            f"mean of {', '.join(QUICK_TASKS)} on {args.limit} items each"
        )
        print(
            f"grid 0.05: {len(grid)} points, best {best:.4f} at "
            f"{[round(float(x), 2) for x in grid[best_i]]} ({grid_s:.0f} s); uniform {uniform:.4f}"
        )
        distinct = len({round(x, 9) for x in grid_scores})
        print(f"the grid's scores take {distinct} distinct values")
        if uniform >= best - 1e-12:
            print("the uniform point is already the grid's best: the search starts there")
        tol = 1 / (args.limit * len(QUICK_TASKS))  # one item of one task
        reached = []
        near = []
        print(
            f"{'seed':>4}  {'evals to reach grid best':>25}  {'within one item':>15}  "
            f"{'search best':>11}  at"
        )
        for seed in range(args.seeds):
            found = search_weights(fn, K, args.budget, seed=seed)
            hit = next(
                (i + 1 for i, pt in enumerate(found["points"]) if pt["score"] >= best - 1e-12),
                None,
            )
            reached.append(hit)
            near.append(
                next(
                    (i + 1 for i, pt in enumerate(found["points"]) if pt["score"] >= best - tol),
                    None,
                )
            )
            b = found["best"]
            print(
                f"{seed:>4}  {hit if hit else f'not in {args.budget}':>25}  "
                f"{near[-1] if near[-1] else f'not in {args.budget}':>15}  {b['score']:>11.4f}  "
                f"{[round(x, 2) for x in b['weights']]}"
            )
        hits = [h for h in reached if h]
        if hits:
            print(
                f"reached the grid's best in {len(hits)}/{args.seeds} seeds; median "
                f"{statistics.median(hits):.0f} evaluations against the grid's {len(grid)} "
                f"({len(grid) / statistics.median(hits):.1f}x fewer)"
            )
        else:
            print(f"never reached the grid's best within {args.budget} evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
