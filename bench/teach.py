"""What a teacher waits for, on this machine: the lab build alone and beside a training
job, and the class story's time to its first chart and to done.

``--part build``: ``dtm lab build`` (``--size``, default ``small``) alone, then beside a
real training job (``dtm train`` on a lab, many steps, started first, running the whole
time), each ``--repeats`` times; medians and their ratio. Every process claims its share
of the cores (``dtm.threads``); ``--threads all`` gives each process every core instead
(``DTM_THREADS`` = the core count: what every process did before), side by side.

``--part class``: ``dtm run experiments/lab-class.yaml`` in a fresh cache holding a copy
of a built lab (``--lab``, default the dashboard's): seconds to the first chart of the
Home page (``dtm.story.story_panels`` non-empty), to every chart, and to done. ``--part
full``: the same for the full story, ``experiments/lab.yaml``.

``--part first-start``: ``streamlit run app.py`` (what ``make run`` runs once installed) on
a fresh, empty cache: seconds from the command to the default lab ready (its
``lab.json`` written), each of ``--repeats`` times, and their median.

    .venv/bin/python -m bench.teach [--part build|class|full|first-start|all]
                                    [--size small|default] [--repeats 3]
                                    [--threads share|all|both] [--lab DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(cpu_dir: Path, threads: str, cache: Path | None = None) -> dict:
    env = {**os.environ, "DTM_CPU_DIR": str(cpu_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("DTM_THREADS", None)
    if threads == "all":
        env["DTM_THREADS"] = str(len(os.sched_getaffinity(0)))
    if cache is not None:
        env["DTM_CACHE"] = str(cache)
    return env


def _build(out: Path, size: str, env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "dtm", "lab", "build", "--size", size, "--out", str(out), "--force"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode:
        sys.exit(f"the lab build failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def _busy_job(lab: Path, out: Path, env: dict) -> subprocess.Popen:
    """A training job on ``lab`` that runs far longer than a build."""
    return subprocess.Popen(
        [sys.executable, "-m", "dtm", "train", "--base", str(lab / "model"),
         "--data", str(lab / "data" / "train.jsonl"), "--steps", "100000", "--log-every",
         "100000", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def build_part(size: str, repeats: int, modes: list[str]) -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"dtm lab build --size {size}, {cores} cores, medians of {repeats}:")
    print(f"  {'threads':<34} {'alone s':>8} {'beside a job s':>15} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job_lab = tmp / "job-lab"
        _build(job_lab, "small", _env(tmp / "cpu0", "share"))
        for mode in modes:
            env = _env(tmp / f"cpu-{mode}", mode)
            alone = [_build(tmp / "lab", size, env) for _ in range(repeats)]
            job = _busy_job(job_lab, tmp / f"job-{mode}", env)
            try:
                time.sleep(15)  # the job is training
                beside = [_build(tmp / "lab", size, env) for _ in range(repeats)]
            finally:
                job.terminate()
                job.wait()
            a, b = statistics.median(alone), statistics.median(beside)
            label = "each its share (dtm.threads)" if mode == "share" else "every core each"
            print(f"  {label:<34} {a:>8.1f} {b:>15.1f} {b / a:>6.2f}")


def first_start_part(repeats: int) -> None:
    import socket

    from dtm.lab import default_lab_dir

    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            env = _env(Path(tmp) / "cpu", "share", cache)
            with socket.socket() as sock:  # a free port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ["DTM_CACHE"] = str(cache)
            ready = default_lab_dir() / "lab.json"
            t0 = time.perf_counter()
            server = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                 "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                # the lab build starts on the first page load, as a browser opening it does
                for _ in range(600):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                        break
                    except OSError:
                        time.sleep(0.2)
                _open_session(port)
                while not ready.exists():
                    if time.perf_counter() - t0 > 1800:
                        sys.exit("the lab was not ready in 30 minutes")
                    time.sleep(0.2)
                times.append(time.perf_counter() - t0)
            finally:
                server.terminate()
                server.wait()
    cores = len(os.sched_getaffinity(0))
    shown = ", ".join(f"{t:.1f}" for t in times)
    print(f"first start (streamlit run app.py, fresh cache) to the lab ready, {cores} cores:")
    print(f"  {shown} s; median {statistics.median(times):.1f} s")


def _open_session(port: int) -> None:
    """Run the app's script once, as a browser's first visit does (streamlit's own
    AppTest runs the same script in-process with the server's cache)."""
    from streamlit.testing.v1 import AppTest

    AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def class_part(lab: Path, exp_name: str = "lab-class", keep: Path | None = None) -> None:
    from dtm.experiment import load_experiment
    from dtm.lab import default_lab_dir
    from dtm.score import scores
    from dtm.story import story_jobs, story_panels

    lab = lab or default_lab_dir()
    if not (lab / "lab.json").exists():
        sys.exit(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
    exp_file = ROOT / "experiments" / f"{exp_name}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        cache = (keep or Path(tmp)) / "cache"
        if keep and cache.exists():
            sys.exit(f"--keep {keep}: it holds a cache already; give a new folder")
        shutil.copytree(lab, cache / "lab" / lab.name)
        env = _env(Path(tmp) / "cpu", "share", cache)
        os.environ["DTM_CACHE"] = str(cache)
        exp = load_experiment(exp_file)
        t0 = time.perf_counter()
        run = subprocess.Popen(
            [sys.executable, "-m", "dtm", "run", str(exp_file)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        seen: dict[str, float] = {}
        while run.poll() is None:
            time.sleep(2)
            from dtm.experiment import read_status

            status = read_status(exp.name)
            try:
                panels = story_panels(exp, story_jobs(exp.name, status), scores(group=exp.name))
            except Exception:  # the registry mid-write: look again
                continue
            for p in panels:
                seen.setdefault(p["key"], time.perf_counter() - t0)
        done = time.perf_counter() - t0
        if run.returncode:
            sys.exit(f"the class story failed:\n{run.stderr.read()[-2000:]}")
    cores = len(os.sched_getaffinity(0))
    print(f"story experiments/{exp_name}.yaml from a built lab, {cores} cores:")
    first = min(seen.values()) if seen else float("nan")
    print(f"  first chart {first:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in seen.items()))
    print(f"  done {done:.0f} s ({done / 60:.1f} min)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["build", "class", "full", "first-start", "all"]
    ap.add_argument("--part", default="all", choices=parts)
    ap.add_argument("--size", default="small", choices=["small", "default"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="both", choices=["share", "all", "both"])
    ap.add_argument("--lab", type=Path, default=None)
    ap.add_argument(
        "--keep", type=Path, default=None, help="class/full: keep the story's cache in KEEP/cache"
    )
    args = ap.parse_args()
    if args.part in ("build", "all"):
        modes = ["share", "all"] if args.threads == "both" else [args.threads]
        build_part(args.size, args.repeats, modes)
    if args.part in ("first-start", "all"):
        first_start_part(args.repeats)
    if args.part in ("class", "all"):
        class_part(args.lab, keep=args.keep)
    if args.part in ("full", "all"):
        class_part(args.lab, "lab", keep=args.keep)


if __name__ == "__main__":
    main()
