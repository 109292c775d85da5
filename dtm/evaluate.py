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
    return [lp for lp, _ in continuation_scores(model, pairs, pad_id, batch_size)]


def _pad_left(seqs: list[list[int]], pad_id: int):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def continuation_scores(
    model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 256
) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy one)`` of each
    ``(context ids, continuation ids)`` pair (lm-evaluation-harness's loglikelihood).

    Each distinct context is encoded once: the contexts of a batch run left-padded (with
    position ids counted from each row's first real token), and every continuation of a
    context then runs on a copy of that context's key/value cache. A multiple-choice item
    costs one pass over its context instead of one per option. Continuations of a single
    token need no second pass at all. Models without a key/value cache are scored one
    full sequence per pair."""
    if not pairs:
        return []
    dev = _device(model)
    contexts: dict[tuple[int, ...], list[int]] = {}
    for k, (ctx, _) in enumerate(pairs):
        contexts.setdefault(tuple(ctx), []).append(k)
    order = sorted(contexts, key=lambda c: -len(c))
    result: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    start = 0
    while start < len(order):
        # a batch of contexts holds at most ``batch_size`` continuations
        chunk, n_rows = [], 0
        while start < len(order) and (
            not chunk or n_rows + len(contexts[order[start]]) <= batch_size
        ):
            chunk.append(order[start])
            n_rows += len(contexts[order[start]])
            start += 1
        ids, mask = _pad_left([list(c) for c in chunk], pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = _last_logits(model, ids.to(dev), mask.to(dev), pos.to(dev))
        if getattr(out, "past_key_values", None) is None or not hasattr(
            out.past_key_values, "reorder_cache"
        ):
            return _full_sequence_scores(model, pairs, pad_id, batch_size)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # the next-token law
        cache = out.past_key_values
        del out  # the context pass's logits are not needed past their last position
        rows = [(b, k) for b, c in enumerate(chunk) for k in contexts[c]]
        conts = [pairs[k][1] for _, k in rows]
        owner = torch.tensor([b for b, _ in rows], device=dev)
        lp0 = first[owner, torch.tensor([c[0] for c in conts], device=dev)]
        greedy0 = first.argmax(-1)[owner] == torch.tensor([c[0] for c in conts], device=dev)
        sums, greedy = lp0.cpu().tolist(), greedy0.cpu().tolist()
        longest = max(map(len, conts))
        if longest > 1:
            cache.reorder_cache(owner)
            width = longest - 1  # feed tokens 0..n-2, read the law of tokens 1..n-1
            cids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, c in enumerate(conts):
                cids[r, : len(c) - 1] = torch.tensor(c[:-1])
                cmask[r, : len(c) - 1] = 1
            ctx_len = mask.sum(-1)[owner.cpu()]
            cpos = ctx_len[:, None] + torch.arange(width)[None, :]
            full_mask = torch.cat([mask[owner.cpu()], cmask], dim=1)
            logits = model(
                input_ids=cids.to(dev),
                attention_mask=full_mask.to(dev),
                position_ids=cpos.to(dev),
                past_key_values=cache,
                use_cache=True,
            ).logits.float()
            logp = torch.log_softmax(logits, -1)
            for r, c in enumerate(conts):
                if len(c) < 2:
                    continue
                tgt = torch.tensor(c[1:], device=dev)
                lp = logp[r, : len(c) - 1]
                sums[r] += float(lp.gather(-1, tgt[:, None]).sum())
                greedy[r] = bool(greedy[r]) and bool((lp.argmax(-1) == tgt).all())
        for r, (_, k) in enumerate(rows):
            result[k] = (float(sums[r]), bool(greedy[r]))
    return result


def _last_logits(model, ids, mask, pos):
    """The forward pass of a context batch, keeping only the last position's logits
    (``logits_to_keep=1``) where the model takes it."""
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:
        return model(**kw)


def _full_sequence_scores(model, pairs, pad_id: int, batch_size: int) -> list[tuple[float, bool]]:
    dev = _device(model)
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][0]) - len(pairs[k][1]))
    result: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
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
        logp = torch.log_softmax(logits[:, :-1], -1).cpu()
        for r, k in enumerate(idx):
            n_ctx, n_cont = len(pairs[k][0]), len(pairs[k][1])
            lp = logp[r, n_ctx - 1 : n_ctx - 1 + n_cont]
            tgt = torch.tensor(pairs[k][1])
            result[k] = (
                float(lp.gather(-1, tgt[:, None]).sum()),
                bool((lp.argmax(-1) == tgt).all()),
            )
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
        new = _greedy(model, ids.to(dev), mask.to(dev), max_new_tokens, eos, pad)
        if new is None:  # a model without a key/value cache (the logit ensemble)
            new = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )[:, width:]
        for r, row in enumerate(new.tolist()):
            if eos in row:
                row = row[: row.index(eos)]
            out[start + r] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def _greedy(model, ids, mask, max_new_tokens: int, eos: int, pad: int):
    """Greedy decoding of left-padded rows on the model's key/value cache: each step runs
    only the rows still writing (a finished row leaves the batch and its cache). The
    argmax of the same logits as ``generate(do_sample=False)``, without its per-step
    machinery. None when the model returns no cache."""
    n = ids.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = _last_logits(model, ids, mask, pos)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=ids.device)
    active = torch.arange(n, device=ids.device)  # rows still writing, in cache order
    nxt = out.logits[:, -1].argmax(-1)
    last = pos[:, -1]
    for step in range(max_new_tokens):
        tokens[active, step] = nxt
        live = nxt != eos
        if step == max_new_tokens - 1 or not live.any():
            break
        if not live.all():
            keep = live.nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            active, nxt, mask, last = active[keep], nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        nxt = out.logits[:, -1].argmax(-1)
    return tokens


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
    from dtm.lab.sft_data import OWN_RELATIONS

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
                preds = mc_predictions(model, tokenizer, items)
                results[task] = score_mc(items, preds)
                if task == "lab_knowledge":
                    results[task].update(favourite_uptake(items, preds, lab))
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


def known_tasks(tasks_dir: str | Path | None = None) -> list[str]:
    """The task names this tool knows: the lab's first, then a ``tasks_dir``'s, then the
    paper's benchmarks (any other lm-evaluation-harness task works with the full engine)."""
    from dtm.harness import PAPER_TASKS
    from dtm.usertasks import folder_tasks

    user = list(folder_tasks(tasks_dir)) if tasks_dir else []
    return [*TASKS, *PROBES, *user, *[t for t in PAPER_TASKS if t not in user]]


def check_heldout(paths) -> None:
    """Held-out files that exist and whose result names (``heldout:<stem>``) differ,
    checked before any model loads."""
    from dtm.errors import ConfigError
    from dtm.heldout import result_key

    seen: dict[str, str] = {}
    for p in paths:
        if not isinstance(p, (str, Path)):
            continue
        if not Path(p).expanduser().is_file():
            raise ConfigError(f"--heldout {p}: no such file.")
        key = result_key(p)
        if key in seen:
            raise ConfigError(
                f"--heldout {p}: its result name {key} is also that of {seen[key]}; rename one."
            )
        seen[key] = str(p)


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    engine: str = "quick",
    lab: str | Path | None = None,
    tasks_dir: str | Path | None = None,
    heldout: list[str | Path] | tuple = (),
    limit: int | None = None,
    batch_size: int | None = None,
    allow_code: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``tasks``: ``{task: {metric: value, ..., "n": items}}``.

    - ``lab``: the lab folder whose benchmarks the ``lab_*`` tasks read.
    - ``tasks_dir``: a folder of lm-evaluation-harness task YAMLs (``dtm.usertasks``); its
      task names win over the lab's and the harness's.
    - ``heldout``: files whose mean response-token loss is added under
      ``heldout:<stem>`` as ``{"loss", "tokens"}`` (``dtm.heldout``), over every row of
      each file (``limit`` is items per task).
    - ``batch_size``: the full engine's (default 64, the harness's) and the quick
      engine's on a tasks folder (default 256).

    The quick engine scores the lab's tasks and a ``tasks_dir``'s in process; ``full``
    runs every task through lm-evaluation-harness but the ``lab_bias`` probe, which has no
    harness config and is always scored here."""
    from dtm.errors import ConfigError
    from dtm.harness import check_code_opt_in, flatten_user, run_harness

    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose quick or full.")
    if not tasks and not heldout:
        raise ConfigError("no tasks given.")
    from dtm.usertasks import folder_tasks

    check_heldout(heldout)
    user = folder_tasks(tasks_dir) if tasks_dir else {}
    lab_tasks = [t for t in tasks if t in TASKS + PROBES and t not in user]
    mine = [t for t in tasks if t in user]
    other = [t for t in tasks if t not in lab_tasks and t not in mine]
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
        where = f" (not in --tasks-dir {tasks_dir})" if tasks_dir else ""
        raise ConfigError(
            f"the quick engine scores the lab's tasks and a --tasks-dir's only; "
            f"{', '.join(other)}{where}: run with --engine full (lm-evaluation-harness) or "
            "add a task file for it to --tasks-dir."
        )
    prepared = {}
    if mine:
        from dtm.usertasks import build_task

        prepared = {t: build_task(user[t]) for t in mine}
    results: dict[str, dict[str, float]] = {}
    via_harness = [t for t in tasks if t in mine or t not in PROBES] if engine == "full" else []
    here = [t for t in lab_tasks if t not in via_harness]
    if via_harness:
        results.update(
            run_harness(
                model,
                tokenizer,
                via_harness,
                include_path=bench,
                limit=limit,
                batch_size=batch_size or 64,
                allow_code=allow_code,
                seed=seed,
                prepared={t: prepared[t] for t in via_harness if t in prepared},
            )
        )
    if here:
        results.update(evaluate_lab(model, tokenizer, bench, tuple(here), limit=limit))
    if engine == "quick" and mine:
        from dtm.usertasks import quick_evaluate

        was_training = model.training
        model.eval()
        try:
            raw = quick_evaluate(
                model,
                tokenizer,
                prepared,
                limit=limit,
                seed=seed,
                **({"batch_size": batch_size} if batch_size else {}),
            )
        finally:
            model.train(was_training)
        for t in mine:
            flat = flatten_user(raw[t], prepared[t].OUTPUT_TYPE)
            flat["n"] = raw[t]["_n"]
            results[t] = flat
    out = {t: results[t] for t in tasks}
    if heldout:
        from dtm.heldout import heldout_loss, result_key

        for path in heldout:
            key = result_key(path)
            res = heldout_loss(model, tokenizer, path)
            out[key] = {"loss": res["loss"], "tokens": res["tokens"]}
    return out
