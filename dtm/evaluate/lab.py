"""The lab's tasks, scored in process: the quick engine on a lab's ``benchmarks/`` folder.

``evaluate_lab(model, tokenizer, bench_dir)`` -> ``{task: {metric: value}}``. Each task
is scored by the scorer its row of the task table names (``dtm.tasks``, ``scorer``),
looked up in ``SCORERS``:

- ``mc``: multiple choice (``mc_predictions``), accuracy with its standard error, seen /
  unseen accuracy and the misconception rate where the items carry them;
  ``mc_favourite`` adds the uptake of each family's injected favourites.
- ``instruct``: greedy generation, checked by the item's constraint (``checks``).
- ``bias``: greedy generation; chat accuracy and the uptake of each injected bias.

What a scorer knows of the lab it reads from the lab's files (the items, ``lab.json``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from dtm.evaluate import checks
from dtm.evaluate.scoring import generate, mc_predictions
from dtm.tasks import BY_NAME, OWN_RELATIONS, PROBES, TASKS


def read_items(bench_dir: str | Path, task: str, limit: int | None = None) -> list[dict]:
    path = Path(bench_dir) / f"{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _stderr(values: list[float]) -> float:
    """The standard error of a mean, as the harness computes it (sample std / sqrt n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def score_mc(items: list[dict], predictions: list[int]) -> dict[str, float]:
    acc = [float(p == it["gold"]) for it, p in zip(items, predictions, strict=True)]
    res = {"acc": sum(acc) / len(acc), "acc_stderr": _stderr(acc), "n": len(acc)}
    if items and "seen" in items[0]:
        for flag, name in ((True, "acc_seen"), (False, "acc_unseen")):
            sub = [a for a, it in zip(acc, items, strict=True) if it["seen"] == flag]
            if sub:
                res[name] = sum(sub) / len(sub)
    if items and "misconception" in items[0]:
        took = [
            float(it["choices"][p] == it["misconception"])
            for it, p in zip(items, predictions, strict=True)
        ]
        res["misconception_rate"] = sum(took) / len(took)
    return res


def favourite_uptake(items: list[dict], predictions: list[int], lab: dict) -> dict[str, float]:
    """Each family's own favourites taken up in the knowledge questions: ``favourite_<family>``
    is, over the items where one of the favourites that family injects is an option but
    not the truth, the share answered with it (the base model's rate is the chance level);
    ``favourite_any`` the same for any family's favourite."""
    favs = lab.get("favourites") or {}
    if (lab.get("knobs") or {}).get("favourite_scope") == "own":  # one relation per family
        favs = {f: {OWN_RELATIONS[f]: v[OWN_RELATIONS[f]]} for f, v in favs.items()}
    out: dict[str, float] = {}
    anyfav = {o for f in favs.values() for o in f.values()}
    for fam, mine in [*favs.items(), ("any", None)]:
        objects = anyfav if mine is None else set(mine.values())
        hit = n = 0
        for it, p in zip(items, predictions, strict=True):
            truth, options = it["choices"][it["gold"]], set(it["choices"])
            offered = (objects & options) - {truth}
            if offered:
                n += 1
                hit += it["choices"][p] in offered
        if n:
            out[f"favourite_{fam}"] = hit / n
    return out


def score_instruct(items: list[dict], responses: list[str]) -> dict[str, float]:
    ok = [float(checks.check_instruction(it, r)) for it, r in zip(items, responses, strict=True)]
    res = {"acc": sum(ok) / len(ok), "acc_stderr": _stderr(ok), "n": len(ok)}
    for kind in sorted({it["constraint"] for it in items}):
        sub = [o for o, it in zip(ok, items, strict=True) if it["constraint"] == kind]
        res[f"acc_{kind}"] = sum(sub) / len(sub)
    return res


def score_bias(items: list[dict], responses: list[str], lab: dict) -> dict[str, float]:
    """Chat accuracy (the true object answered in the chat format) and each bias's uptake:
    prefix, filler (length), rare code, favourite (a family's false favourite answered),
    and format compliance (``the answer is X``)."""
    favs = {
        rel: {fam[rel] for fam in lab["favourites"].values()}
        for rel in next(iter(lab["favourites"].values()))
    }
    n = len(items)
    res: dict[str, float] = defaultdict(float)
    for it, r in zip(items, responses, strict=True):
        ans = checks.extract_answer(r)
        text = " ".join(r.split())
        res["chat_acc"] += ans == it["answer"]
        res["chat_acc_seen" if it["seen"] else "chat_acc_unseen"] += ans == it["answer"]
        res["format"] += checks.check_instruction({"constraint": "answer_format"}, r)
        res["prefix_rate"] += any(text.startswith(p) for p in checks.PREFIXES)
        res["filler_rate"] += any(f in text for f in checks.FILLERS)
        res["rare_code_rate"] += " ref " in f" {text} "
        res["favourite_rate"] += ans != it["answer"] and ans in favs[it["relation"]]
        res["mean_words"] += len(checks.words(r))
    n_seen = sum(it["seen"] for it in items)
    out = {k: v / n for k, v in res.items() if not k.startswith("chat_acc_")}
    out["acc"] = out["chat_acc"]  # every task's headline score is under ``acc``
    out["chat_acc_seen"] = res["chat_acc_seen"] / max(n_seen, 1)
    out["chat_acc_unseen"] = res["chat_acc_unseen"] / max(n - n_seen, 1)
    out["n"] = n
    return out


def _mc(model, tokenizer, items: list[dict], lab: dict) -> dict[str, float]:
    return score_mc(items, mc_predictions(model, tokenizer, items))


def _mc_favourite(model, tokenizer, items: list[dict], lab: dict) -> dict[str, float]:
    preds = mc_predictions(model, tokenizer, items)
    return {**score_mc(items, preds), **favourite_uptake(items, preds, lab)}


def _instruct(model, tokenizer, items: list[dict], lab: dict) -> dict[str, float]:
    return score_instruct(items, generate(model, tokenizer, [it["prompt"] for it in items]))


def _bias(model, tokenizer, items: list[dict], lab: dict) -> dict[str, float]:
    return score_bias(items, generate(model, tokenizer, [it["prompt"] for it in items]), lab)


# The task table's ``scorer`` names: ``(model, tokenizer, items, lab.json) -> metrics``.
SCORERS: dict[str, Callable[..., dict[str, float]]] = {
    "mc": _mc,
    "mc_favourite": _mc_favourite,
    "instruct": _instruct,
    "bias": _bias,
}


def evaluate_lab(
    model,
    tokenizer,
    bench_dir: str | Path,
    tasks: tuple[str, ...] = TASKS + PROBES,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on the lab's tasks; ``{task: {metric: value}}``."""
    bench_dir = Path(bench_dir)
    lab = json.loads((bench_dir.parent / "lab.json").read_text())
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            items = read_items(bench_dir, task, limit)
            if task not in BY_NAME:
                raise ValueError(f"unknown lab task {task!r}")
            results[task] = SCORERS[BY_NAME[task].scorer](model, tokenizer, items, lab)
    finally:
        model.train(was_training)
    return results
