"""Data curation, Deita-style (Liu et al. 2024, "What Makes Good Data for Alignment"):
score every training row, then walk the rows from the best score down and keep a row only
if its embedding's cosine similarity to every row already kept is below a threshold,
until the budget is reached (score-first, diversity-aware selection).

Scores (``--curate-score``):

- ``ifd``: the instruction-following difficulty of Li et al. 2023 ("From Quantity to
  Quality"): the base model's mean token cross-entropy on the response given the prompt,
  divided by its mean cross-entropy on the same response tokens alone (after BOS). High
  IFD: the instruction helps little, the row teaches much. As in that paper, rows with
  IFD > 1 (the instruction makes the response less likely: misaligned) rank last.
- ``column:NAME``: a numeric field of the data file, higher better.
- ``deita:COMPLEXITY,QUALITY``: Deita's two scorers (causal LMs, hub ids or folders),
  each prompted with Deita's template; a scorer's score is the expectation of 1..6 under
  the softmax of its logits of the tokens "1".."6" at the next position, and the row's
  score is complexity × quality (Deita's evol score).

The embeddings are the Disperse step's (``dtm.disperse.embedding_step``: the default
MiniLM on the instruction field), from the registry's cache. ``curate_rows`` writes
``selection.csv`` (``id,score,kept``, every training row in data order) in the run folder
and registers the same file as an artifact of kind ``selection``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dtm.data import COLUMNS, load_instructions
from dtm.disperse import dataset_step, embedding_step, read_embeddings, read_table
from dtm.embed import prompt_text
from dtm.errors import ConfigError
from dtm.models import load_base
from dtm.store import Registry, file_digest, write_text_atomic
from dtm.train.config import check_curate, curate_budget
from dtm.train.rows import collate, encode_rows

COMPLEXITY_PROMPT = (
    "You are a helpful assistant. Please identify the complexity score of the following "
    "user query. \n##Query: {instruction}\n##Complexity: "
)
QUALITY_PROMPT = (
    "You are a helpful assistant. Please identify the quality score of the Response "
    "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} "
    "\n##Quality: "
)


def select(scores: np.ndarray, embeddings: np.ndarray, budget: int, threshold: float) -> np.ndarray:
    """Indices kept, in the order chosen: by score (ties by position), each kept only if
    its cosine to every kept row is below ``threshold``, until ``budget`` are kept.
    ``embeddings`` are L2-normalised rows."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=float)))
    kept: list[int] = []
    for i in order:
        if len(kept) == budget:
            break
        if kept and float(np.max(embeddings[kept] @ embeddings[i])) >= threshold:
            continue
        kept.append(int(i))
    return np.array(kept, dtype=int)


def _row_losses(model, batches) -> list[float]:
    """Mean cross-entropy over the labelled tokens of each row (``batches`` of collated
    ``input_ids, labels, attention_mask``)."""
    import torch  # lazy: torch

    out: list[float] = []
    device = next(model.parameters()).device
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        nll = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask
        out += (nll.sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def ifd_scores(model, tok, table: pd.DataFrame, max_length: int, batch_size: int = 8) -> np.ndarray:
    """IFD of each row under ``model``: conditioned over unconditioned response loss."""
    rows = encode_rows(table, tok, max_length)
    alone = []
    for r in rows:
        resp = [t for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != -100]
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = head + resp
        alone.append({"input_ids": ids, "labels": [-100] * len(head) + resp})
    fn = collate(tok.pad_token_id if tok.pad_token_id is not None else 0)

    def batches(rs):
        return (fn(rs[i : i + batch_size]) for i in range(0, len(rs), batch_size))

    was_training = model.training
    model.eval()
    try:
        cond = np.array(_row_losses(model, batches(rows)))
        base = np.array(_row_losses(model, batches(alone)))
    finally:
        model.train(was_training)
    return cond / np.maximum(base, 1e-12)


def column_scores(data: str, table: pd.DataFrame, name: str) -> np.ndarray:
    """The numeric field ``name`` of the data file, for ``table``'s rows (by id)."""
    full = load_instructions(data, count_tokens=False, keep=(name,)).table
    if name not in full.columns or (name not in COLUMNS and full[name].isna().all()):
        raise ConfigError(f"--curate-score column:{name}: {data} has no field {name!r}.")
    by_id = dict(zip(full["id"], full[name], strict=True))
    values = []
    for rid in table["id"]:
        v = by_id.get(rid)
        try:
            x = float(v)
            if isinstance(v, bool) or not np.isfinite(x):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(
                f"--curate-score column:{name}: row {rid} of {data} has {v!r}, not a number."
            ) from None
        values.append(x)
    return np.array(values)


def _load_scorer(name: str):
    try:
        model, tok = load_base(name)
    except Exception as e:  # a missing folder, no weights, not a causal LM
        raise ConfigError(
            f"--curate-score deita: the scorer {name} cannot be loaded: {e}"
        ) from None
    digits = []
    for d in "123456":
        ids = tok.encode(d, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"--curate-score deita: the scorer {name}'s tokenizer has no single token "
                f"for {d!r}; a Deita scorer scores with the tokens 1..6."
            )
        digits.append(ids[0])
    return model.eval(), tok, digits


def _expected_score(
    model, tok, digits: list[int], prompts: list[str], max_length: int
) -> np.ndarray:
    import torch  # lazy: torch

    out = []
    device = next(model.parameters()).device
    for p in prompts:
        ids = tok(p, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids.to(device)).logits[0, -1, digits].float()
        probs = torch.softmax(logits, -1).cpu().numpy()
        out.append(float(probs @ np.arange(1, 7)))
    return np.array(out)


def deita_scores(spec: str, table: pd.DataFrame, max_length: int) -> np.ndarray:
    complexity_name, quality_name = (m.strip() for m in spec.split(","))
    instructions = prompt_text(table).tolist()
    model, tok, digits = _load_scorer(complexity_name)
    complexity = _expected_score(
        model, tok, digits, [COMPLEXITY_PROMPT.format(instruction=x) for x in instructions],
        max_length,
    )  # fmt: skip
    model, tok, digits = _load_scorer(quality_name)
    quality = _expected_score(
        model, tok, digits,
        [
            QUALITY_PROMPT.format(instruction=x, output=y)
            for x, y in zip(instructions, table["response"], strict=True)
        ],
        max_length,
    )  # fmt: skip
    return complexity * quality


def scores_for(cfg, table: pd.DataFrame, tok=None, model=None) -> np.ndarray:
    """Each row's score by ``cfg.curate_score`` (ifd needs the base ``model``)."""
    score = cfg.curate_score
    if score.startswith("column:"):
        return column_scores(cfg.data, table, score[len("column:") :].strip())
    if score.startswith("deita:"):
        return deita_scores(score[len("deita:") :], table, cfg.max_length)
    if model is None:
        raise ConfigError("--curate-score ifd needs the base model (--base).")
    return ifd_scores(model, tok, table, cfg.max_length)


def ranking_scores(cfg, scores: np.ndarray) -> np.ndarray:
    """The scores the ranking uses: for ifd, rows above 1 go last (Li et al. 2023)."""
    if cfg.curate_score == "ifd":
        return np.where(scores > 1, -scores, scores)
    return scores


def embeddings_for(data: str, table: pd.DataFrame) -> np.ndarray:
    """The Disperse step's cached embeddings of ``table``'s rows (by id)."""
    registry = Registry()
    ds = dataset_step(data, registry)
    emb, _ = embedding_step(ds, registry)
    index = {rid: i for i, rid in enumerate(read_table(ds)["id"])}
    vectors = np.asarray(read_embeddings(emb))
    return vectors[[index[rid] for rid in table["id"]]]


def selection(cfg, table: pd.DataFrame, tok=None, model=None) -> pd.DataFrame:
    """``id, score, kept`` for every row of ``table`` (data order)."""
    budget = curate_budget(cfg, len(table))
    scores = scores_for(cfg, table, tok, model)
    kept = select(ranking_scores(cfg, scores), embeddings_for(cfg.data, table), budget,
                  cfg.curate_threshold)  # fmt: skip
    if len(kept) < budget:
        print(
            f"note: curate kept {len(kept)} rows of a budget of {budget}: the others are "
            f"within cosine {cfg.curate_threshold} of a kept row.",
            file=sys.stderr,
        )
    flags = np.zeros(len(table), dtype=int)
    flags[kept] = 1
    return pd.DataFrame({"id": table["id"].to_numpy(), "score": scores, "kept": flags})


def save_selection(cfg, sel: pd.DataFrame, out: Path) -> None:
    """``out/selection.csv``, and the same file as a registry artifact of kind selection."""
    text = sel.to_csv(index=False)
    write_text_atomic(out / "selection.csv", text)
    inputs: dict[str, Any] = {
        "data": file_digest(cfg.data) if Path(cfg.data).is_file() else cfg.data,
        "score": cfg.curate_score,
        "budget": str(cfg.curate_budget),
        "threshold": cfg.curate_threshold,
        "base": cfg.base if cfg.curate_score == "ifd" else None,
        "rows": pd.util.hash_pandas_object(sel, index=False).sum().item(),
    }

    def build(folder: Path) -> dict[str, Any]:
        (folder / "selection.csv").write_text(text)
        return {
            "data": str(cfg.data),
            "score": cfg.curate_score,
            "kept": int(sel["kept"].sum()),
            "rows": len(sel),
            "run": str(out),
        }

    Registry().produce("selection", inputs, build)


def selections_for(digest: str | None, registry=None) -> list:
    """The saved selections (registry artifacts of kind ``selection``) of the data file
    whose content digest (``dtm.store.file_digest``) is ``digest``, newest first."""
    if not digest:
        return []
    registry = registry or Registry()
    return [a for a in registry.list("selection") if a.inputs.get("data") == digest]


def read_selection(art) -> pd.DataFrame:
    """A saved selection's ``id, score, kept`` table (ids as strings)."""
    return pd.read_csv(art.path / "selection.csv", dtype={"id": str})


def kept_mask(sel: pd.DataFrame, ids: pd.Series) -> np.ndarray:
    """Per row of ``ids``: whether the selection ``sel`` kept it (rows it did not score,
    such as the held-out ones, are not kept)."""
    kept = set(sel.loc[sel["kept"] == 1, "id"].astype(str))
    return ids.astype(str).isin(kept).to_numpy()


def curate_rows(cfg, table: pd.DataFrame, tok=None, model=None) -> pd.DataFrame:
    """The kept rows of ``table`` (data order); writes the selection (``save_selection``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sel = selection(cfg, table, tok, model)
    save_selection(cfg, sel, out)
    return table[sel["kept"].to_numpy() == 1].reset_index(drop=True)


def curate_folder(cfg) -> pd.DataFrame:
    """``python -m dtm curate``: the selection of ``cfg.data`` (scored by ``cfg.base``
    for ``ifd``), written to ``cfg.out/selection.csv`` and the registry; checked first."""
    check_curate(cfg)
    if cfg.curate_score == "ifd" and not cfg.base:
        raise ConfigError("--curate-score ifd needs --base MODEL (the model that scores).")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder.")
    table = load_instructions(cfg.data, count_tokens=False).table
    model = tok = None
    if cfg.curate_score == "ifd":
        model, tok = load_base(cfg.base)
    sel = selection(cfg, table, tok, model)
    out.mkdir(parents=True, exist_ok=True)
    save_selection(cfg, sel, out)
    return sel
