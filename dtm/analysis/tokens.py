"""Token-level bias (the paper's figure 5): per token, how much its loss fell between an
early and a late model on training text and on validation text. Tokens whose loss falls
on training text but not on held-out text are what the model fitted to this data set
alone.

- ``token_level_bias(early, late, tokenizer, train_rows, val_rows)``: the table, from two
  loaded models; ``token_bias(base, early, late, train, val)``: the same from adapter
  folders (several late adapters are averaged).
- ``token_bias_targets(sft, jobs)``: the late models a group's SFT run is read against.
- ``code_token_drops``: the share of the fall on the lab's row codes.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from dtm.data import load_instructions
from dtm.score import ModelRef, load_model
from dtm.train.rows import collate, encode_rows


@torch.inference_mode()
def token_losses(model, encoded: list[dict], batch_size: int = 32) -> list[tuple[int, float]]:
    """(token id, loss) of every response token of ``encoded`` (``encode_rows`` rows:
    ``input_ids`` and ``labels`` with the prompt masked to -100)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out: list[tuple[int, float]] = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(0)(encoded[start : start + batch_size])  # pads are masked
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            target = labels[:, 1:].to(dev)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), target.clamp_min(0), reduction="none"
            )
            keep = target != -100
            out += list(zip(target[keep].tolist(), nll[keep].tolist(), strict=True))
    finally:
        model.train(was)
    return out


def token_level_bias(
    early,
    late,
    tokenizer,
    train_encoded: list[dict],
    val_encoded: list[dict],
    *,
    min_count: int = 5,
) -> pd.DataFrame:
    """One row per token seen at least ``min_count`` times in both splits: ``token,
    train_drop, val_drop, gap`` (train_drop - val_drop), ``train_count, val_count``,
    mean losses ``train_early, train_late, val_early, val_late``; sorted by ``gap``,
    largest first. A drop is early loss minus late loss (positive: the late model
    predicts the token better)."""
    stats: dict[str, dict] = {}
    for split, enc in (("train", train_encoded), ("val", val_encoded)):
        a, b = token_losses(early, enc), token_losses(late, enc)
        acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for (tid, le), (_, ll) in zip(a, b, strict=True):
            s = acc[tid]
            s[0] += le
            s[1] += ll
            s[2] += 1
        stats[split] = acc
    rows = []
    for tid in set(stats["train"]) & set(stats["val"]):
        t, v = stats["train"][tid], stats["val"][tid]
        if t[2] < min_count or v[2] < min_count:
            continue
        row = {
            "token": tokenizer.decode([tid]).strip() or repr(tokenizer.decode([tid])),
            "train_early": t[0] / t[2],
            "train_late": t[1] / t[2],
            "val_early": v[0] / v[2],
            "val_late": v[1] / v[2],
            "train_count": t[2],
            "val_count": v[2],
        }
        row["train_drop"] = row["train_early"] - row["train_late"]
        row["val_drop"] = row["val_early"] - row["val_late"]
        row["gap"] = row["train_drop"] - row["val_drop"]
        rows.append(row)
    cols = [
        "token",
        "train_drop",
        "val_drop",
        "gap",
        "train_count",
        "val_count",
        "train_early",
        "train_late",
        "val_early",
        "val_late",
    ]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values("gap", ascending=False).reset_index(drop=True)


def code_token_drops(early, late, tokenizer, encoded: list[dict], marker: str = "ref") -> dict:
    """How much of the loss fall from ``early`` to ``late`` on ``encoded`` rows is on their
    row-specific codes: the tokens after ``marker`` up to the next ``.`` (the lab's
    ``ref <code> .``). ``{"tokens", "code_tokens", "drop", "code_drop", "code_share",
    "code_token_share"}``: ``drop`` is the summed loss fall over every response token,
    ``code_share`` the part of it on code tokens, ``code_token_share`` their share of the
    tokens (what the fall would be were it spread evenly)."""
    ref = tokenizer.convert_tokens_to_ids(marker)
    stop = tokenizer.convert_tokens_to_ids(".")
    a, b = token_losses(early, encoded), token_losses(late, encoded)
    drop = code_drop = 0.0
    codes = 0
    in_code = False
    for (tid, le), (_, ll) in zip(a, b, strict=True):
        is_code = in_code and tid != stop
        in_code = tid == ref or is_code
        drop += le - ll
        if is_code:
            code_drop += le - ll
            codes += 1
    n = len(a)
    return {
        "tokens": n,
        "code_tokens": codes,
        "drop": drop,
        "code_drop": code_drop,
        "code_share": code_drop / drop if drop else None,
        "code_token_share": codes / n if n else None,
    }


def encode_split(path: str, tokenizer, max_length: int = 128, n: int = 256, seed: int = 0):
    """The first ``n`` rows (seeded sample) of an instruction data file, encoded."""
    table = load_instructions(path, count_tokens=False).table
    if len(table) > n:
        table = table.sample(n=n, random_state=seed)
    return encode_rows(table, tokenizer, max_length)


def token_bias(base: str, early: str, late: tuple[str, ...], train: str, val: str):
    """``token_level_bias`` of the model ``base`` + ``early`` (an adapter folder) against
    ``base`` + ``late`` (the average of several), on the data files ``train`` and ``val``."""
    early_model, tok = load_model(ModelRef(base=base, adapters=[early]))
    late_ref = ModelRef(base=base, adapters=list(late))
    if len(late) > 1:
        late_ref.recipe = {
            "method": "average",
            "weights": [1 / len(late)] * len(late),
            "params": {},
        }
    late_model, _ = load_model(late_ref)
    tr, va = encode_split(train, tok), encode_split(val, tok)
    return token_level_bias(early_model, late_model, tok, tr, va)


def token_bias_sfts(jobs: list) -> list:
    """The SFT jobs token-level bias can be read on: with an early checkpoint and, among
    them, one with validation data at least (else none)."""
    sfts = [j for j in jobs if j.kind == "sft" and (j.run_dir / "early").is_dir()]
    return sfts if any(j.config.get("val_data") for j in sfts) else []


def token_bias_targets(sft, jobs: list) -> dict[str, tuple[str, ...]]:
    """The late models an SFT job's early checkpoint is read against: ``SFT`` itself and
    ``DTM (<clustering>)``, the average of the sub-models of its seed, per clustering
    they were submitted with; each as its adapter folders."""
    seed = sft.config.get("seed")
    subs = sorted(
        (j for j in jobs if j.kind == "sub" and j.config.get("seed") == seed),
        key=lambda j: (j.config.get("assignments") or "", j.config["cluster"]),
    )
    sets: dict[str, list] = {}
    for j in subs:
        sets.setdefault(j.clustering or "", []).append(j)
    targets = {"SFT": (str(sft.run_dir / "adapter"),)}
    for name, js in sets.items():
        targets[f"DTM ({name or 'sub-models'})"] = tuple(str(j.run_dir / "adapter") for j in js)
    return targets
