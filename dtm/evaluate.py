"""The quick evaluator: in-process, batched scoring of a model object already in memory.

- Multiple choice: the option with the highest summed log-likelihood of ``" " + choice``
  after the item's ``query`` wins (lm-evaluation-harness's ``acc`` convention: context
  encoded with the tokenizer's special tokens, continuation without).
- Generation: greedy decoding of the chat prompt, checked by the task's rule.

``evaluate_lab(model, tokenizer, bench_dir)`` -> ``{task: {metric: value}}`` for the lab's
tasks; ``lab_bias`` adds chat accuracy and the uptake of each injected bias.

``evaluate(model, tokenizer, tasks, engine="quick"|"full", lab=...)`` is the one interface
over both engines: ``quick`` (this module, the lab's tasks) and ``full``
(lm-evaluation-harness, ``dtm.harness``: the lab's task configs and the paper's
benchmarks). On the lab's tasks the two give the same accuracies (a test checks it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from dtm.lab import checks
from dtm.tasks import MC_TASKS, PROBES, TASKS


def read_items(bench_dir: str | Path, task: str, limit: int | None = None) -> list[dict]:
    path = Path(bench_dir) / f"{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def mc_predictions(model, tokenizer, items: list[dict], batch_size: int = 256) -> list[int]:
    """Index of the most likely choice of each item."""
    pairs, owners = [], []
    for i, it in enumerate(items):
        ctx = tokenizer(it["query"])["input_ids"]
        for c in it["choices"]:
            cont = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            pairs.append((ctx, cont))
            owners.append(i)
    scores = _continuation_logprobs(model, pairs, tokenizer.pad_token_id, batch_size)
    best: dict[int, tuple[float, int]] = {}
    counts: dict[int, int] = defaultdict(int)
    for owner, s in zip(owners, scores, strict=True):
        j = counts[owner]
        counts[owner] += 1
        if owner not in best or s > best[owner][0]:
            best[owner] = (s, j)
    return [best[i][1] for i in range(len(items))]


def _continuation_logprobs(model, pairs, pad_id: int, batch_size: int) -> list[float]:
    dev = _device(model)
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][0]) - len(pairs[k][1]))
    result = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [pairs[k][0] + pairs[k][1] for k in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        tok_lp = logp.gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1).cpu()
        for r, k in enumerate(idx):
            n_ctx, n_cont = len(pairs[k][0]), len(pairs[k][1])
            result[k] = float(tok_lp[r, n_ctx - 1 : n_ctx - 1 + n_cont].sum())
    return result


@torch.inference_mode()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 256
) -> list[str]:
    """Greedy continuations of ``prompts`` (already chat-formatted, special tokens written
    out), decoded up to the end-of-text token."""
    dev = _device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[str] = [""] * len(prompts)
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for start in range(0, len(prompts), batch_size):
        chunk = enc[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):  # left padding, so every row ends where it continues
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        gen = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for r, row in enumerate(gen[:, width:].tolist()):
            if eos in row:
                row = row[: row.index(eos)]
            out[start + r] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


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
            if task in MC_TASKS:
                results[task] = score_mc(items, mc_predictions(model, tokenizer, items))
            elif task == "lab_instruct":
                results[task] = score_instruct(
                    items, generate(model, tokenizer, [it["prompt"] for it in items])
                )
            elif task == "lab_bias":
                results[task] = score_bias(
                    items, generate(model, tokenizer, [it["prompt"] for it in items]), lab
                )
            else:
                raise ValueError(f"unknown lab task {task!r}")
    finally:
        model.train(was_training)
    return results


ENGINES = ("quick", "full")


def known_tasks() -> list[str]:
    """The task names this tool knows: the lab's first, then the paper's benchmarks."""
    from dtm.harness import PAPER_TASKS

    return [*TASKS, *PROBES, *PAPER_TASKS]


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    engine: str = "quick",
    lab: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    allow_code: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``tasks``: ``{task: {metric: value, ..., "n": items}}``.

    ``lab`` is the lab folder whose benchmarks the ``lab_*`` tasks read. The quick engine
    scores the lab's tasks; ``full`` runs every task through lm-evaluation-harness but the
    ``lab_bias`` probe, which has no harness config and is always scored here."""
    from dtm.errors import ConfigError
    from dtm.harness import check_code_opt_in, run_harness

    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose quick or full.")
    if not tasks:
        raise ConfigError("no tasks given.")
    lab_tasks = [t for t in tasks if t in TASKS + PROBES]
    other = [t for t in tasks if t not in lab_tasks]
    check_code_opt_in(other, allow_code)
    bench = None
    if lab_tasks:
        if lab is None or not (Path(lab) / "benchmarks").is_dir():
            raise ConfigError(
                f"{', '.join(lab_tasks)} are the lab's tasks: build the lab first "
                "(`python -m dtm lab build --out LAB`, or open the dashboard) or name it with "
                f"--lab{f' (no benchmarks/ in {lab})' if lab else ''}."
            )
        bench = Path(lab) / "benchmarks"
    if engine == "quick" and other:
        raise ConfigError(
            f"the quick engine scores the lab's tasks only; run {', '.join(other)} with "
            "--engine full (lm-evaluation-harness)."
        )
    results: dict[str, dict[str, float]] = {}
    via_harness = [t for t in tasks if t not in PROBES] if engine == "full" else []
    here = [t for t in lab_tasks if t not in via_harness]
    if via_harness:
        results.update(
            run_harness(
                model,
                tokenizer,
                via_harness,
                include_path=bench,
                limit=limit,
                batch_size=batch_size,
                allow_code=allow_code,
                seed=seed,
            )
        )
    if here:
        results.update(evaluate_lab(model, tokenizer, bench, tuple(here), limit=limit))
    return {t: results[t] for t in tasks}
