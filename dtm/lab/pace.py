"""This machine's pace on a lab, measured once when the dashboard's lab is built: what
the Home page estimates a story from before any story has run here.

``measure_pace(lab)`` times the code the stories run: a few optimizer steps of the lab's
SFT recipe through ``dtm.train`` (with its validation and probe losses at step 0 and at
the end) and one scoring of the base model on every lab benchmark (``dtm.evaluate``).
It writes ``<lab>.pace.json`` beside the lab folder (the lab itself stays what the code
builds): ``step_seconds`` (one optimizer step of ``batch_size`` rows), ``loss_seconds``
(the validation and probe losses of one log record), ``eval_seconds`` (every lab
benchmark, once), ``cores`` and ``measured`` (a time stamp).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from dtm.evaluate import evaluate_lab
from dtm.lab import pace_path
from dtm.lab.measure import lab_recipe
from dtm.models import load_base
from dtm.store import write_json_atomic
from dtm.train import TrainConfig, train

PROBE_STEPS = 8


def measure_pace(lab: str | Path, steps: int = PROBE_STEPS) -> dict:
    lab = Path(lab)
    recipe = {k: v for k, v in lab_recipe(lab).items() if k != "steps"}
    with tempfile.TemporaryDirectory(prefix="dtm-pace-") as tmp:
        cfg = TrainConfig(
            base=str(lab / "model"),
            data=str(lab / "data" / "train.jsonl"),
            val_data=str(lab / "data" / "val.jsonl"),
            out=str(Path(tmp) / "run"),
            steps=steps,
            log_every=steps,
            **recipe,
        )
        recs = train(cfg)["metrics"]
    first, last = recs[0], recs[-1]
    loss_seconds = float(first["seconds"])
    step_seconds = max(float(last["seconds"]) - 2 * loss_seconds, 0.0) / steps
    model, tok = load_base(str(lab / "model"))
    t0 = time.perf_counter()
    evaluate_lab(model, tok, lab / "benchmarks")
    pace = {
        "step_seconds": round(step_seconds, 4),
        "batch_size": cfg.batch_size,
        "loss_seconds": round(loss_seconds, 3),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "cores": len(os.sched_getaffinity(0)),
        "measured": time.time(),
    }
    write_json_atomic(pace_path(lab), pace)
    return pace
