"""Training throughput of the lab model on this CPU (a GPU at Llama-2-7b's shape:
``bench/gpu.py``, which runs ``dtm train`` itself).

CPU, ``--part single`` (default ``all``): LoRA SFT of the lab's base model with the lab's
settings through the project's trainer; tokens/s (median over logged intervals, the
first dropped) and peak RSS. Side by side: two jobs at once against one after another,
which is why the local queue runs one CPU job at a time by default.

CPU, ``--part together``: the K=4 sub-models of the lab story (experiments/lab.yaml's
train values and step budget, a seeded random dispersal), through the job queue in a
fresh registry: one group job (one process over one base) against four sub-model jobs
one after another (separate processes, start-up included). Wall seconds, medians of
``--repeats`` rounds, each round running both, alternating which goes first.

CPU, ``--part story``: the whole lab story, ``dtm run experiments/lab.yaml`` from a built
lab in a fresh cache, with its group jobs (``--story together``) and/or one process per
run (``apart``); wall minutes.

    .venv/bin/python -m bench.train [--lab DIR] [--part all|single|together|story]
        [--steps 60] [--repeats 3] [--story together,apart]
        [--experiment experiments/lab.yaml] [--seeds 0,1,2] [--keep DIR [--keep-runs]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_job(lab: Path, out: Path, steps: int) -> dict:
    from dtm.jobs.runner import run_training as train
    from dtm.lab.measure import LAB_SFT
    from dtm.train import TrainConfig

    cfg = TrainConfig(
        base=str(lab / "model"),
        data=str(lab / "data" / "train.jsonl"),
        val_data=str(lab / "data" / "val.jsonl"),
        out=str(out),
        steps=steps,
        log_every=10,
        save_every=10**6,
        **LAB_SFT,
    )
    t0 = time.perf_counter()
    res = train(cfg)
    rates = [m["tokens_per_s"] for m in res["metrics"][2:] if m["tokens_per_s"]]
    return {
        "tokens_per_s": statistics.median(rates),
        "peak_rss_mb": max(m["mem_mb"] for m in res["metrics"]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def cpu_parallel(lab: Path, steps: int, n: int, threads: int | None = None) -> float:
    """Wall seconds for n CPU jobs started together (separate processes), each with
    ``threads`` torch threads (default: torch's own choice, all cores)."""
    import os

    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.train",
                    "--cpu-worker",
                    str(lab),
                    f"{tmp}/{i}",
                    str(steps),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            for i in range(n)
        ]
        assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - t0


def lab_story_subs(
    lab: Path, seed: int = 0, experiment: Path = ROOT / "experiments" / "lab.yaml"
) -> tuple[list, Path]:
    """The K=4 sub-model configs of a lab story (experiments/lab.yaml: its train values,
    eval settings and epochs budget) for one seed on a seeded random dispersal of the lab's
    rows."""
    import numpy as np
    import yaml

    from dtm.experiment import dtm_set

    exp = yaml.safe_load(experiment.read_text())
    ids = [json.loads(x)["id"] for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
    clusters = np.random.default_rng(seed).integers(0, 4, len(ids))
    asg = Path(tempfile.mkdtemp(prefix="dtm-bench-")) / "assignments.csv"
    asg.write_text(
        "id,cluster\n" + "".join(f"{i},{c}\n" for i, c in zip(ids, clusters, strict=True))
    )
    common = {
        **exp["train"],
        "base": str(lab / "model"),
        "data": str(lab / "data" / "train.jsonl"),
        "val_data": str(lab / "data" / "val.jsonl"),
        "eval_lab": str(lab),
        "seed": seed,
        "out": "-",
    }
    sizes = [int((clusters == c).sum()) for c in range(4)]
    subs = dtm_set(common, asg, sizes, exp["sub_budget"], clustering="random")[1:]
    return subs, asg


def queue_wall(subs: list, together: bool) -> float:
    """Wall seconds from submitting the sub-models to a fresh registry until every job
    is done, as the local queue runs them."""
    from dtm import jobs
    from dtm.experiment import together_members
    from dtm.store import Registry

    with tempfile.TemporaryDirectory() as tmp:
        store = jobs.JobStore(Registry(tmp))
        t0 = time.perf_counter()
        if together:
            g, _, _ = jobs.submit_group(together_members(subs), store=store, backend="local")
            ids = [g.id]
        else:
            ids = [jobs.submit(c, name=n, store=store, backend="local")[0].id for n, c, _ in subs]
        while True:
            rows = {j.id: j for j in jobs.refresh(store)}
            if all(rows[i].state in jobs.FINAL for i in ids):
                break
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        bad = [rows[i] for i in ids if rows[i].state != "done"]
        assert not bad, [(j.name, j.state, j.error) for j in bad]
    return wall


def together_bench(lab: Path, repeats: int, experiment: Path) -> None:
    subs, _ = lab_story_subs(lab, experiment=experiment)
    steps = [c.steps for _, c, _ in subs]
    print(f"K=4 sub-models of the lab story (steps {steps}, lab benchmarks at 0 and the end):")
    walls: dict[str, list[float]] = {"together": [], "separate": []}
    for r in range(repeats):
        order = ("together", "separate") if r % 2 == 0 else ("separate", "together")
        for mode in order:
            walls[mode].append(queue_wall(subs, mode == "together"))
        print(
            f"  round {r + 1}: one group job {walls['together'][-1]:.1f} s; four jobs one "
            f"after another {walls['separate'][-1]:.1f} s",
            flush=True,
        )
    t, s = statistics.median(walls["together"]), statistics.median(walls["separate"])
    print(
        f"  median of {repeats}: together {t:.1f} s, one after another {s:.1f} s: "
        f"{s / t:.2f}x faster together"
    )
    from dataclasses import replace

    from dtm.train.group import train_group

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train_group([replace(c, out=f"{tmp}/{i}") for i, (_, c, _) in enumerate(subs)])
        wall = time.perf_counter() - t0
    steps_s = res["timings"].get("steps", 0.0)
    print(
        f"  the group in this process: {wall:.1f} s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(res["timings"].items()))
    )
    print(
        f"  training steps: {1000 * steps_s / sum(steps):.1f} ms per member-step; real tokens "
        f"{res['real_tokens']:.0%} of the shared batches' positions "
        f"({res['real_tokens_alone']:.0%} had each member been padded alone)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        from dtm.jobs.runner import run_training as train

        cfg = subs[0][1]
        t0 = time.perf_counter()
        recs = train(replace(cfg, out=tmp))["metrics"]
        alone = statistics.median(r["tokens_per_s"] for r in recs if r["tokens_per_s"])
        print(
            f"  one sub-model alone in this process: {time.perf_counter() - t0:.1f} s for "
            f"{cfg.steps} steps; training {alone:.0f} tokens/s (the trainer's median), against "
            f"{res['tokens'] / steps_s:.0f} tokens/s of all members' "
            "tokens over the group's training-step time"
        )


def story_wall(
    lab: Path,
    together: bool,
    experiment: Path = ROOT / "experiments" / "lab.yaml",
    seeds: list[int] | None = None,
    keep: Path | None = None,
    keep_runs: bool = False,
) -> dict:
    """``dtm run EXPERIMENT`` (``train.together`` as given, ``seeds`` in place of its
    own) in a fresh cache that holds only the built lab: wall seconds of the whole
    story. ``keep``: a folder to copy the experiment's results.md and results.json to
    (and, with ``keep_runs``, the run folders)."""
    import re
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "lab" / lab.name
        dest.parent.mkdir()
        dest.symlink_to(lab.resolve(), target_is_directory=True)
        exp = Path(tmp) / experiment.name
        text = experiment.read_text()
        if not together:
            text = text.replace("train:", "train:\n  together: false", 1)
        if seeds is not None:
            text = re.sub(r"^seeds: .*$", f"seeds: {seeds}", text, flags=re.M)
        exp.write_text(text)
        name = re.search(r"^name: (.*)$", text, flags=re.M).group(1).strip()
        env = {**os.environ, "DTM_CACHE": tmp}
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "dtm", "run", str(exp)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        out = Path(tmp) / "experiments" / name
        if keep is not None:  # kept first: a failed story's results are not lost with tmp
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("results.md", "results.json", "jobs.md"):
                if (out / f).exists():
                    shutil.copy2(out / f, keep / f)
            if keep_runs and (Path(tmp) / "runs").exists():  # for studies.lab_story
                shutil.copytree(Path(tmp) / "runs", keep / "runs", dirs_exist_ok=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "results.md").exists()
    return {"wall_s": wall}


def story_bench(
    lab: Path,
    modes: list[str],
    experiment: Path,
    seeds: list[int] | None,
    keep: Path | None,
    keep_runs: bool = False,
) -> None:
    walls = {}
    for mode in modes:
        r = story_wall(lab, mode == "together", experiment, seeds, keep, keep_runs)
        n = f"seeds {seeds}" if seeds is not None else "its seeds"
        shown = experiment.resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        print(
            f"the lab story (`dtm run {shown}`, {n}, from a built "
            f"lab), {mode}: {r['wall_s'] / 60:.1f} min"
        )
        walls[mode] = r["wall_s"]
    if {"together", "apart"} <= walls.keys():
        print(f"apart / together: {walls['apart'] / walls['together']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", default=None, help="a built lab (default: the dashboard's lab)")
    ap.add_argument("--part", default="all", choices=["all", "single", "together", "story"])
    ap.add_argument(
        "--story", default="together", help="story modes, comma-separated: together,apart"
    )
    ap.add_argument(
        "--experiment", type=Path, default=ROOT / "experiments" / "lab.yaml", help="story file"
    )
    ap.add_argument("--seeds", default=None, help="story seeds in place of the file's, e.g. 0")
    ap.add_argument("--keep", type=Path, default=None, help="copy the story's results here")
    ap.add_argument("--keep-runs", action="store_true", help="with --keep: the run folders too")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_worker:
        lab, out, steps = args.cpu_worker
        cpu_job(Path(lab), Path(out), int(steps))
        return

    from dtm.lab import default_lab_dir

    lab = Path(args.lab) if args.lab else default_lab_dir()
    if not (lab / "lab.json").exists():
        sys.exit(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
    if args.part in ("all", "single"):
        single_bench(lab, args.steps)
    if args.part in ("all", "together"):
        together_bench(lab, args.repeats, args.experiment.resolve())
    if args.part in ("all", "story"):
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        story_bench(
            lab, args.story.split(","), args.experiment.resolve(), seeds, args.keep, args.keep_runs
        )


def single_bench(lab: Path, steps: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        one = cpu_job(lab, Path(tmp) / "one", steps)
    print(f"lab model, CPU ({torch.get_num_threads()} threads), {steps} steps:")
    print(f"  tokens/s (median) {one['tokens_per_s']:.0f}; peak RSS {one['peak_rss_mb']:.0f} MB;")
    print(f"  one job: {one['wall_s']} s wall including model load and evaluation")
    half = max(1, (os.cpu_count() or 2) // 2)
    seq = 2 * cpu_parallel(lab, steps, 1)
    rows = [
        ("one after another", seq),
        ("at once, all threads each", cpu_parallel(lab, steps, 2)),
        (f"at once, {half} thread(s) each", cpu_parallel(lab, steps, 2, threads=half)),
    ]
    print(f"  {'two jobs':<30} {'wall s':>8} {'x one after another':>20}")
    for name, wall in rows:
        print(f"  {name:<30} {wall:>8.1f} {wall / seq:>20.2f}")


if __name__ == "__main__":
    main()
