"""Learned merge weights: gradient descent on the K x B per-block weights, the adapters
fixed, to minimise the held-out response loss of chosen rows (as AdaMerging learns
layer-wise coefficients from data, and LoRA Soups / CAT learns layer-wise LoRA weights).

Parametrisation: a raw parameter theta (K x B, zeros at the start), and each block's
weights the softmax of its column, ``w[:, b] = softmax(theta[:, b])``: they stay on the
simplex, as the weight search's do and as ``average`` normalises them, and the start is
the uniform merge. The linear method maps them to coefficients (``average``, ``linear``:
w; ``task_arithmetic``: lambda * w) and each layer's LoRA scale of sub-model k is
``c[k, b(layer)] * s_k``, a 0-d tensor in peft's scaling table, so one backward pass
through the merged model gives the loss's gradient in theta (``Merger._set_scales``).
Only linear methods are learned: a dense or factor method's merge is not a smooth
function of the weights the model can carry.

Each step is one forward and backward pass over every row (full batch; Adam, ``lr``).
``learn_weights`` returns ``{"path": [{"weights", "loss"}...], "best": {...}, "steps",
"evaluations", "lr", "parametrisation"}``: every point it passes through, the uniform one
first, each with its held-out loss measured at that point (the loss of the forward pass
before the update; the last point is scored once more), and the point of lowest loss.
``evaluations`` counts the passes over the rows (steps + 1), the number a weight search
is compared at. The loss is the mean over the sources of each one's mean token loss (the
objective's held-out scores).
"""

from __future__ import annotations

from collections.abc import Callable

from dtm.errors import ConfigError
from dtm.merge.blocks import check_blocks
from dtm.merge.methods import LAMBDA, METHODS

PARAMETRISATION = "softmax over each block's column of a K x B parameter (zeros: uniform)"


def _rows(objective, tokenizer) -> list[list[dict]]:
    from dtm.evaluate.heldout import encode_source  # lazy: torch

    items = objective._heldout_items()
    if not items or objective.lab_tasks or objective.tasks:
        raise ConfigError(
            "the learned weights minimise a held-out loss: give held-out rows (--heldout "
            "FILE) and no tasks (a task's score has no gradient)."
        )
    return [encode_source(src, tokenizer, limit=objective.limit) for _, src in items]


def _tokens(rows: list[dict]) -> int:
    return sum(1 for r in rows for x in r["labels"][1:] if x != -100)


def learn_weights(
    merger,
    method: str,
    objective,
    blocks: int = 3,
    steps: int = 30,
    *,
    lr: float = 0.1,
    params: dict | None = None,
    batch_size: int = 16,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """Learn the K x ``blocks`` weights of ``merger``'s ``method`` merge (a linear one)
    on ``objective``'s held-out rows; see the module's docstring."""
    import torch

    from dtm.evaluate.heldout import batch_nll, row_batches  # lazy: torch

    if METHODS.get(method) is None or METHODS[method].kind != "linear":
        linear = ", ".join(n for n, m in METHODS.items() if m.kind == "linear")
        raise ConfigError(
            f"--learn with {method}: the learned weights flow a gradient through each "
            f"layer's LoRA scales, which only a linear method uses; choose {linear}."
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigError(f"--steps {steps}: give a whole number of at least 1.")
    blocks = check_blocks(blocks, merger.n_layers)
    params = dict(params or {})
    scale = float(LAMBDA.check(params.get("lambda", 1.0))) if method == "task_arithmetic" else 1.0
    k = len(merger.sets)
    tok = merger.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sources = [row_batches(rows, pad, batch_size) for rows in _rows(objective, tok)]
    counts = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in s) for s in sources]
    if any(c == 0 for c in counts):
        raise ConfigError("held-out rows: no response tokens to score (every row truncated?).")
    which = merger.blocks_of_layers(blocks)
    theta = torch.zeros(k, blocks, device=merger.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    model = merger.model
    merger.apply(method, [1.0] * k, **params)  # the base weights as they are, adapters on
    model.eval()

    def table(t) -> list[list[float]]:
        return torch.softmax(t.detach(), 0).cpu().tolist()

    def set_scales(t) -> None:
        coefs = scale * torch.softmax(t, 0)  # (K, B)
        per_block = [[coefs[i, b] for i in range(k)] for b in range(blocks)]
        merger._set_scales({n: per_block[b] for n, b in which.items()})

    path = []
    try:
        for step in range(steps + 1):
            last = step == steps
            total = 0.0
            with torch.set_grad_enabled(not last):
                for batches, count in zip(sources, counts, strict=True):
                    for b in batches:
                        set_scales(theta)  # a fresh graph from theta for each batch
                        nll, _ = batch_nll(model, b)
                        part = nll / (count * len(sources))
                        if not last:
                            part.backward()
                        total += float(part.detach())
            path.append({"weights": table(theta), "loss": total})
            if progress:
                progress("learning the weights", (step + 1) / (steps + 1))
            if not last:
                opt.step()
                opt.zero_grad()
    finally:
        merger._set_scales([0.0] * k)  # no tensor is left in the scales
    best = min(path, key=lambda p: p["loss"])
    merger.apply(method, best["weights"], **params)
    return {
        "method": method,
        "blocks": blocks,
        "steps": steps,
        "evaluations": len(path),
        "lr": lr,
        "parametrisation": PARAMETRISATION,
        "path": path,
        "best": best,
    }
