"""Shared-context scoring and greedy decoding: the model calls both engines make.

- ``continuation_scores(model, pairs, pad_id)``: lm-evaluation-harness's loglikelihood
  (``(sum of log p(continuation | context), continuation is the greedy one)``), each
  distinct context encoded once.
- ``mc_predictions(model, tokenizer, items)``: the option with the highest summed
  log-likelihood of ``" " + choice`` after the item's ``query`` (the harness's ``acc``
  convention: context encoded with the tokenizer's special tokens, continuation without).
- ``generate(model, tokenizer, prompts)``: greedy decoding of chat prompts;
  ``greedy(model, ids, mask, ...)`` the decoding loop on the key/value cache.
"""

from __future__ import annotations

from collections import defaultdict

import torch


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
        new = greedy(model, ids.to(dev), mask.to(dev), max_new_tokens, eos, pad)
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


def greedy(model, ids, mask, max_new_tokens: int, eos: int, pad: int):
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
