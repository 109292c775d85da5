"""Evaluation engines, side by side in one run: the quick engine (this project's batched
in-process scorer) and the full engine (lm-evaluation-harness over the lab's task
configs) on the same model and the same lab tasks. Per engine and task: items, seconds,
items/s and accuracy (which must match); then the totals and the throughput ratio.
Each engine runs ``--repeats`` times, alternating, and the median time is reported.

    .venv/bin/python bench/eval.py [--lab DIR] [--adapter DIR] [--limit N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from dtm.evaluate import evaluate
    from dtm.lab import default_lab_dir
    from dtm.lab.benchmarks import TASKS
    from dtm.score import ModelRef, load_model

    p = argparse.ArgumentParser()
    p.add_argument("--lab", default=str(default_lab_dir()))
    p.add_argument("--adapter", default=None, help="score base + this adapter (e.g. an SFT run)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    lab = Path(args.lab)
    model, tok = load_model(
        ModelRef(base=str(lab / "model"), adapters=[args.adapter] if args.adapter else [])
    )
    from dtm.harness import task_manager

    tm = task_manager(lab / "benchmarks")  # indexing the harness's tasks: not timed
    times: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeats):
        for engine in ("quick", "full"):
            for task in TASKS:
                t0 = time.perf_counter()
                if engine == "full":
                    from dtm.harness import run_harness

                    res = run_harness(model, tok, [task], limit=args.limit, tm=tm)
                else:
                    res = evaluate(model, tok, [task], engine="quick", lab=lab, limit=args.limit)
                times.setdefault((engine, task), []).append(time.perf_counter() - t0)
                scores[(engine, task)] = res[task]
    print(
        f"lab {lab}; model {'base + ' + args.adapter if args.adapter else 'base'}; "
        f"median of {args.repeats}"
    )
    print(
        f"{'task':<15}{'items':>7}{'quick s':>10}{'full s':>10}{'quick it/s':>12}"
        f"{'full it/s':>11}{'speedup':>9}  acc quick = full"
    )
    tot = {"quick": 0.0, "full": 0.0}
    items_all = 0
    same = True
    for task in TASKS:
        n = scores[("quick", task)]["n"]
        q = statistics.median(times[("quick", task)])
        f = statistics.median(times[("full", task)])
        aq, af = scores[("quick", task)]["acc"], scores[("full", task)]["acc"]
        same &= aq == af
        tot["quick"] += q
        tot["full"] += f
        items_all += n
        print(
            f"{task:<15}{n:>7}{q:>10.2f}{f:>10.2f}{n / q:>12.1f}{n / f:>11.1f}{f / q:>8.2f}×"
            f"  {aq:.4f} {'=' if aq == af else '≠'} {af:.4f}"
        )
    print(
        f"{'all':<15}{items_all:>7}{tot['quick']:>10.2f}{tot['full']:>10.2f}"
        f"{items_all / tot['quick']:>12.1f}{items_all / tot['full']:>11.1f}"
        f"{tot['full'] / tot['quick']:>8.2f}×  {'identical' if same else 'DIFFERENT'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
