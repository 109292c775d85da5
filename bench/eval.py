"""Evaluation engines, side by side in one run: the quick engine (this project's batched
in-process scorer; each multiple-choice context encoded once) and the full engine
(lm-evaluation-harness) on the same model, on the lab's five tasks and on user tasks
made from the lab (``bench.usertasks``: task YAMLs in a folder, scored through
``--tasks-dir``, one per output type). Per engine and task: items, seconds, items/s and
the headline score, which must match; then the totals and the throughput ratio. Each
engine runs ``--repeats`` times, alternating, and the median time is reported. The
harness's task index and each task's dataset are built once, outside the timing. The
quick engine keeps a task's requests and token ids between calls (the live score scores
one task many times); its ``cold`` time is a call with both cleared first.

    .venv/bin/python -m bench.eval [--lab DIR] [--adapter DIR] [--limit N] [--repeats 3]
                                   [--only lab|user]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.usertasks import NAMES, write_user_tasks
from dtm.lab import default_lab_dir

HEADLINE = {"user_corpus": "bits_per_byte", "user_chat": "exact_match"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lab", default=str(default_lab_dir()))
    p.add_argument("--adapter", default=None, help="score base + this adapter (e.g. an SFT run)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["lab", "user"], default=None)
    args = p.parse_args()
    from dtm.evaluate import evaluate  # lazy: torch, lm_eval (kept out of --help)
    from dtm.evaluate.harness import run_harness, task_manager  # lazy: lm_eval
    from dtm.lab.benchmarks import TASKS
    from dtm.score import ModelRef, load_model  # lazy: torch

    lab = Path(args.lab)
    if not (lab / "lab.json").exists():
        print(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
        return 2
    model, tok = load_model(
        ModelRef(base=str(lab / "model"), adapters=[args.adapter] if args.adapter else [])
    )
    tmp = tempfile.TemporaryDirectory()
    folder = write_user_tasks(lab, Path(tmp.name) / "tasks")
    tm = task_manager(lab / "benchmarks")  # indexing the harness's tasks: not timed
    lab_tasks = [] if args.only == "user" else list(TASKS)
    user_tasks = [] if args.only == "lab" else list(NAMES)

    def run(engine: str, task: str) -> dict:
        if engine == "cold":  # the quick engine with nothing kept from an earlier call
            from dtm.evaluate import user as usertasks

            usertasks._REQUESTS.clear()
            usertasks._ENCODED.clear()
            engine = "quick"
        if task in user_tasks:
            res = evaluate(model, tok, [task], engine=engine, tasks_dir=folder, limit=args.limit)
            return res[task]
        if engine == "full":
            return run_harness(model, tok, [task], limit=args.limit, tm=tm)[task]
        return evaluate(model, tok, [task], engine="quick", lab=lab, limit=args.limit)[task]

    for task in user_tasks:  # build every task's dataset once, outside the timing
        run("full", task)
    times: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeats):
        for engine in ("quick", "full", "cold"):
            for task in lab_tasks + user_tasks:
                if engine == "cold" and task not in user_tasks:
                    continue
                t0 = time.perf_counter()
                res = run(engine, task)
                times.setdefault((engine, task), []).append(time.perf_counter() - t0)
                scores[(engine, task)] = res
    print(
        f"lab {lab}; model {'base + ' + args.adapter if args.adapter else 'base'}; "
        f"median of {args.repeats}; limit {args.limit or 'all'}"
    )
    print(
        f"{'task':<16}{'items':>7}{'quick s':>10}{'full s':>10}{'quick it/s':>12}"
        f"{'full it/s':>11}{'speedup':>9}  headline quick = full   (cold: a first call)"
    )
    same = True
    for part, names in (("lab tasks", lab_tasks), ("user tasks", user_tasks)):
        if not names:
            continue
        tot = {"quick": 0.0, "full": 0.0, "cold": 0.0}
        items_all = 0
        for task in names:
            metric = HEADLINE.get(task, "acc")
            n = scores[("quick", task)]["n"]
            q = statistics.median(times[("quick", task)])
            f = statistics.median(times[("full", task)])
            aq, af = scores[("quick", task)][metric], scores[("full", task)][metric]
            ok = aq == af if metric != "bits_per_byte" else math.isclose(aq, af, rel_tol=1e-5)
            if ("cold", task) in scores:
                ac = scores[("cold", task)][metric]
                ok &= math.isclose(ac, aq, rel_tol=1e-9)
            same &= ok
            tot["quick"] += q
            tot["full"] += f
            items_all += n
            cold = ""
            if ("cold", task) in times:
                c = statistics.median(times[("cold", task)])
                tot["cold"] += c
                cold = f"   cold {c:.2f} s, {f / c:.2f}×"
            print(
                f"{task:<16}{n:>7}{q:>10.2f}{f:>10.2f}{n / q:>12.1f}{n / f:>11.1f}"
                f"{f / q:>8.2f}×  {metric} {aq:.4f} {'=' if ok else '≠'} {af:.4f}{cold}"
            )
        cold = (
            f"   cold {tot['cold']:.2f} s, {tot['full'] / tot['cold']:.2f}×" if tot["cold"] else ""
        )
        print(
            f"{'all ' + part:<16}{items_all:>7}{tot['quick']:>10.2f}{tot['full']:>10.2f}"
            f"{items_all / tot['quick']:>12.1f}{items_all / tot['full']:>11.1f}"
            f"{tot['full'] / tot['quick']:>8.2f}×{cold}"
        )
    print("headlines identical on every task" if same else "HEADLINES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
