"""``measure_lab``: the lab's base and SFT figures in one headless run.

Scores the base model, trains vanilla LoRA SFT on the lab's instruction data with every
lab benchmark scored at each logged step (the alignment-tax curve), then scores the SFT
model and the shrinkage controls (the SFT delta scaled by each factor). Writes
``out/results.json`` and ``out/report.md``; the SFT run lives in ``out/sft/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtm.controls import shrink_adapter
from dtm.evaluate import evaluate_lab
from dtm.jobs.runner import lab_eval_hook, run_training
from dtm.lab.presets import PRESETS
from dtm.models import load_base
from dtm.tasks import headline_metrics
from dtm.train import TrainConfig

# The interference preset's recipe without its step count: what the benchmarks of the
# training machinery run with.
LAB_SFT = {k: v for k, v in PRESETS["interference"].sft.items() if k != "steps"}


def lab_recipe(lab: str | Path) -> dict:
    """The SFT recipe of a lab's preset (``lab.json``; a lab built before presets is the
    ``interference`` preset): the paper's hyperparameters but for the learning rate, as a
    0.7M-parameter model trained for minutes needs a larger one."""
    info = json.loads((Path(lab) / "lab.json").read_text())
    return dict(info.get("sft_recipe") or PRESETS["interference"].sft)


HEADLINE = headline_metrics(with_extra=True)  # the task table


def measure_lab(
    lab: str | Path,
    out: str | Path,
    *,
    steps: int | None = None,
    log_every: int = 40,
    seed: int = 0,
    shrink: tuple[float, ...] = (0.25, 0.5),
    progress=None,
    **overrides,
) -> dict:
    lab, out = Path(lab), Path(out)
    bench = lab / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    recipe = {**lab_recipe(lab), **overrides}
    steps = steps or recipe.pop("steps", 400)
    recipe.pop("steps", None)
    base_model, tok = load_base(str(lab / "model"))
    results = {"base": evaluate_lab(base_model, tok, bench)}
    cfg = TrainConfig(
        base=str(lab / "model"),
        data=str(lab / "data" / "train.jsonl"),
        val_data=str(lab / "data" / "val.jsonl"),
        out=str(out / "sft"),
        steps=steps,
        log_every=log_every,
        seed=seed,
        **recipe,
    )
    run = run_training(cfg, eval_hook=lab_eval_hook(lab), progress=progress)
    results["sft"] = run["metrics"][-1]["bench"]
    from peft import PeftModel

    for f in shrink:
        scaled = shrink_adapter(out / "sft" / "adapter", f, out / f"sft_x{f:g}")
        model = PeftModel.from_pretrained(load_base(str(lab / "model"))[0], scaled)
        results[f"sft_x{f:g}"] = evaluate_lab(model, tok, bench)
    curve = [
        {
            "step": m["step"],
            "train_loss": m["train_loss"],
            "val_loss": m["val_loss"],
            "probe_loss": m["probe_loss"],
            "loss_ratio": m["loss_ratio"],
            "loss_ratio_interval": m["loss_ratio_interval"],
            **{f"{t}.{k}": m["bench"][t].get(k) for t, k in HEADLINE},
        }
        for m in run["metrics"]
    ]
    summary = {
        "lab": str(lab),
        "steps": steps,
        "seed": seed,
        "sft_seconds": run["seconds"],
        "config": recipe,
        "results": results,
        "curve": curve,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report(summary))
    return summary


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def report(summary: dict) -> str:
    models = list(summary["results"])
    lines = ["| measure | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for t, k in HEADLINE:
        lines.append(
            f"| {t}.{k} | "
            + " | ".join(_fmt(summary["results"][m][t].get(k)) for m in models)
            + " |"
        )
    cols = [
        "step",
        "train_loss",
        "val_loss",
        "probe_loss",
        "loss_ratio",
        "loss_ratio_interval",
        "lab_knowledge.acc",
        "lab_reasoning.acc",
        "lab_truthful.acc",
        "lab_instruct.acc",
        "lab_bias.chat_acc",
        "lab_bias.format",
        "lab_bias.favourite_rate",
        "lab_bias.prefix_rate",
        "lab_bias.rare_code_rate",
    ]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["curve"]:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
