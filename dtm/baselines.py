"""The paper's baselines beyond vanilla SFT, as pieces the trainer plugs in, and the
diagonal Fisher of a sub-model that the Fisher merge needs.

- ``l2``: the loss plus ``l2_weight / 2 * sum ||delta W||_F^2`` over the LoRA layers, with
  delta W = s * B @ A; the norm is computed exactly from the r x r Gram matrices.
- ``ewc``: the loss plus ``ewc_weight / 2 * sum F * delta W^2``, F the diagonal Fisher of the
  base model's adapted weights on a reference corpus (squared per-document gradients,
  averaged, then divided by their global mean so that ``ewc_weight`` is on the scale of
  ``l2_weight``).
- ``replay``: reference documents mixed 1:1 into the training rows (loss on every token).
- ``soup`` (in ``train``): members on all data with different seeds, merged uniformly.

The reference corpus is a text file (one document per line) or JSONL with a ``text``
field; the lab's pretraining corpus is the default for a lab base model.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtm.errors import ConfigError


def default_reference(base: str) -> str | None:
    """The lab's pretraining corpus when ``base`` is a lab's model folder, else None."""
    corpus = Path(base).expanduser().parent / "data" / "corpus.txt"
    lab_json = Path(base).expanduser().parent / "lab.json"
    return str(corpus) if corpus.exists() and lab_json.exists() else None


def read_reference(path: str | Path, limit: int | None = None, seed: int = 0) -> list[str]:
    """Documents of a reference corpus: ``.txt`` one per line, ``.jsonl`` a ``text`` field.
    With ``limit``, a seeded sample of that many."""
    import numpy as np

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"reference corpus {path}: no such file.")
    docs: list[str] = []
    with open(p, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if p.suffix == ".jsonl":
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ConfigError(f"{p}:{n}: not a JSON object with a 'text' field.") from e
                if isinstance(text, str) and text.strip():
                    docs.append(text.strip())
            else:
                docs.append(line)
    if not docs:
        raise ConfigError(f"reference corpus {p}: no documents.")
    if limit is not None and len(docs) > limit:
        idx = np.random.default_rng(seed).choice(len(docs), limit, replace=False)
        docs = [docs[i] for i in sorted(idx)]
    return docs


def encode_documents(docs: list[str], tokenizer, max_length: int) -> list[dict]:
    """Language-modelling rows (loss on every token) in the trainer's row format."""
    rows = []
    for d in docs:
        ids = tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def lora_layers(model):
    """``(base module name, lora_A weight (r, in), lora_B weight (out, r), scaling)`` for
    each LoRA layer of a peft model (adapter ``default``)."""
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.")
            yield (
                base_name,
                mod.lora_A["default"].weight,
                mod.lora_B["default"].weight,
                mod.scaling["default"],
            )


def l2_penalty(model):
    """sum over LoRA layers of ||s * B @ A||_F^2 = s^2 * sum((B^T B) * (A A^T))."""
    total = 0.0
    for _, a, b, s in lora_layers(model):
        total = total + (s * s) * ((b.T @ b) * (a @ a.T)).sum()
    return total


def ewc_penalty(model, fisher: dict):
    """sum over LoRA layers of F * (s * B @ A)^2, F keyed by the base module name."""
    total = 0.0
    for name, a, b, s in lora_layers(model):
        f = fisher.get(name)
        if f is None:
            continue
        delta = s * (b @ a)
        total = total + (f.to(delta.device, delta.dtype) * delta * delta).sum()
    return total


def _per_example_sq_grads(model, rows, params: dict, collate_fn, progress=None, stage=""):
    """Mean over ``rows`` (one at a time) of the squared gradient of each tensor in
    ``params`` (name -> parameter that requires grad)."""
    import torch

    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    for i, row in enumerate(rows):
        batch = {k: v.to(device) for k, v in collate_fn([row]).items()}
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach().float() ** 2
        if progress and i % 16 == 0:
            progress(stage, (i + 1) / len(rows))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: a / max(1, len(rows)) for n, a in acc.items()}


def base_fisher(model, rows, target_modules, collate_fn, progress=None) -> dict:
    """Diagonal Fisher of the base model's adapted weights (modules named in
    ``target_modules``) on ``rows``, normalised to a global mean of 1. Keyed by module
    name (e.g. ``model.layers.0.mlp.gate_proj``)."""
    import torch

    wanted = {}
    for name, p in model.named_parameters():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod.split(".")[-1] in set(target_modules):
            wanted[mod] = p
    if not wanted:
        raise ConfigError(
            f"ewc: none of the target modules {list(target_modules)} is in the base model."
        )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in wanted.values():
        p.requires_grad_(True)
    try:
        fisher = _per_example_sq_grads(
            model, rows, wanted, collate_fn, progress, "Fisher of the base (EWC)"
        )
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    mean = torch.stack([f.mean() for f in fisher.values()]).mean().clamp_min(1e-30)
    return {n: f / mean for n, f in fisher.items()}


def adapter_fisher(model, rows, collate_fn, progress=None) -> dict:
    """Diagonal Fisher of a peft model's trainable (LoRA) parameters on ``rows``, keyed
    as in the saved adapter file (``...lora_A.weight``), ready for ``save_file``."""
    from peft.utils import get_peft_model_state_dict

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = _per_example_sq_grads(model, rows, params, collate_fn, progress, "Fisher")
    return {
        k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=fisher).items()
    }
