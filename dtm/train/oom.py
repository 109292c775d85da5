"""A micro-batch that does not fit: the run goes on with a smaller one.

On an out-of-memory error a run (``dtm.train.loop``) or a group (``dtm.train.group``)
takes the largest divisor of its micro-batch that is at most half of it, and multiplies
its gradient accumulation by as much: a step trains the same rows, split into smaller
micro-batches, so the maths is that of the planned batch (to float rounding). What was
trained is kept: a run resumes from its last checkpoint (from step 0 when it has none),
a group redoes only the step in progress. At micro-batch 1 the run stops with a
``TrainingError`` (exit 2) naming the length, the micro-batch and the estimate.

``transformers``' ``auto_find_batch_size`` halves too, but restarts from step 0 with a
smaller batch (other maths); accelerate's ``should_reduce_batch_size`` is what tells an
out-of-memory error here.
"""

from __future__ import annotations

import gc
import sys

from dtm.errors import TrainingError


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA, MPS, XPU or the CPU allocator)."""
    from accelerate.utils.memory import should_reduce_batch_size  # lazy: torch

    return should_reduce_batch_size(e)


def smaller(micro: int) -> int | None:
    """The largest divisor of ``micro`` at most ``micro / 2`` (None at 1)."""
    for d in range(micro // 2, 0, -1):
        if micro % d == 0:
            return d
    return None


def split(batches: list[list[int]], micro: int) -> list[list[int]]:
    """Micro-batches of row indices cut into pieces of at most ``micro`` rows, in order
    (with ``micro`` a divisor of their size, the batches a run at ``micro`` draws)."""
    return [b[i : i + micro] for b in batches for i in range(0, len(b), micro)]


def free_memory() -> None:
    """What the failed attempt held, back to the allocator."""
    import torch  # lazy: torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halve_or_stop(micro: int, accum: int, step: int, cfg, estimate_gib: float | None, who=""):
    """``(micro, accum)`` after an out-of-memory error at ``step``, and the record of it;
    a ``TrainingError`` at micro-batch 1."""
    if estimate_gib is None:
        est = "not known"
    else:
        est = (
            f"~{estimate_gib:.1f} GiB" if estimate_gib >= 0.1 else f"~{estimate_gib * 1024:.0f} MiB"
        )
    if (new := smaller(micro)) is None:
        raise TrainingError(
            f"{who}out of memory at micro-batch 1 with rows of up to {cfg.max_length} "
            f"tokens (max_length), at step {step}; the memory estimate for the planned "
            f"micro-batch {cfg.micro_batch_size} was {est}. Lower --max-length, turn on "
            "--gradient-checkpointing, or use a GPU with more memory. The checkpoints "
            "already saved are kept."
        ) from None
    accum = accum * micro // new
    print(
        f"\n{who}out of memory at micro-batch {micro} (rows of up to {cfg.max_length} tokens) "
        f"at step {step}: going on with micro-batch {new} x {accum} accumulation steps, the "
        "same batch.",
        file=sys.stderr,
        flush=True,
    )
    note = {"step": step, "micro_batch_size": new, "accumulation": accum, "from": micro}
    return new, accum, note
