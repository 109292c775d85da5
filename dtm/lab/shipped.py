"""The default lab's pretrained weights, shipped with the project so that a first start
does not pretrain for minutes: ``dtm/lab/shipped/<name>.safetensors`` beside
``<name>.json`` (its sha256, the sha256 of the tokenizer it was trained with, the
pretraining log, and where and how long it was built).

``build_lab(shipped=record)`` builds everything else from the code (world, data,
benchmarks, tokenizer: about two seconds) and loads the weights only when the hashes and
shapes match; ``dtm lab build`` without ``--shipped`` still pretrains from scratch.
``check_shipped`` pretrains again (all of it, or its first steps) and compares the loss
log with the record's: what the code builds at its seed, within a tolerance, because float
sums differ between CPUs. ``ship`` writes the record from a lab built by ``dtm lab build``
(after a change to the lab, with ``LAB_VERSION`` bumped).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from dtm.errors import ConfigError
from dtm.lab import default_lab_dir
from dtm.lab.build import build_lab
from dtm.store import file_digest, write_json_atomic

SHIPPED = Path(__file__).with_name("shipped")
TOLERANCE = 0.03  # relative difference allowed between a logged loss and its record's


def shipped_record(preset: str, size: str, seed: int) -> dict | None:
    """The shipped record of the default lab folder ``preset``-``size``-``seed`` (at this
    ``LAB_VERSION``) with ``path``, the weights file; None when none is shipped."""
    name = default_lab_dir(seed, size, preset).name
    record = SHIPPED / f"{name}.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    return info | {"path": str(SHIPPED / f"{name}.safetensors")}


def ship(lab: str | Path, out: Path = SHIPPED) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``out`` from a lab built by
    ``dtm lab build`` (it must have pretrained, not loaded shipped weights)."""
    lab = Path(lab)
    info_file = lab / "lab.json"
    if not info_file.is_file():
        raise ConfigError(f"--lab {lab}: not a built lab (no lab.json).")
    info = json.loads(info_file.read_text())
    if "shipped" in info["pretraining"]:
        raise ConfigError(f"--lab {lab}: its weights are the shipped ones; build it from scratch.")
    name = default_lab_dir(info["seed"], info["size"], info["preset"]).name
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    shutil.copyfile(lab / "model" / "model.safetensors", weights)
    write_json_atomic(
        out / f"{name}.json",
        {
            "name": name,
            "sha256": file_digest(weights),
            "tokenizer_sha256": file_digest(lab / "model" / "tokenizer.json"),
            "model": info["model"],
            "pretraining": {k: info["pretraining"][k] for k in ("steps", "documents", "log")},
            "built": {
                "seconds": info["seconds"],
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "date": time.strftime("%Y-%m-%d", time.gmtime(info_file.stat().st_mtime)),
                "command": f"python -m dtm lab build --preset {info['preset']} --size "
                f"{info['size']} --seed {info['seed']} --out DIR",
            },
        },
    )
    return weights


def compare_logs(record: list[dict], log: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """One row per step logged in both: ``step``, the recorded and the new loss, their
    relative difference and whether it is within ``tolerance``."""
    new = {h["step"]: h["loss"] for h in log if "loss" in h}
    rows = []
    for h in record:
        if h["step"] in new:
            diff = abs(new[h["step"]] - h["loss"]) / abs(h["loss"])
            rows.append(
                {
                    "step": h["step"],
                    "shipped": h["loss"],
                    "built": new[h["step"]],
                    "difference": diff,
                    "within": diff <= tolerance,
                }
            )
    return rows


def check_shipped(
    preset: str = "bias",
    size: str = "default",
    seed: int = 0,
    steps: int | None = None,
    tolerance: float = TOLERANCE,
    progress=lambda stage, frac: None,
) -> dict:
    """Pretrain the lab again from scratch (its first ``steps`` of the whole schedule, or all
    of it) and compare with the shipped record: ``{"rows": compare_logs, "ok": bool,
    "tokenizer": same tokenizer, "seconds": ...}``."""
    record = shipped_record(preset, size, seed)
    if record is None:
        raise ConfigError(f"no shipped weights for the {preset} {size} lab at seed {seed}.")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtm-check-shipped-") as tmp:
        out = Path(tmp) / "lab"
        summary = build_lab(
            out, seed=seed, size=size, preset=preset, stop_at=steps, progress=progress
        )
        same_tokenizer = file_digest(out / "model" / "tokenizer.json") == record["tokenizer_sha256"]
    rows = compare_logs(record["pretraining"]["log"], summary["pretraining"]["log"], tolerance)
    return {
        "rows": rows,
        "tokenizer": same_tokenizer,
        "ok": bool(rows) and same_tokenizer and all(r["within"] for r in rows),
        "tolerance": tolerance,
        "seconds": round(time.perf_counter() - t0, 1),
    }
