"""The order a run visits its training rows, and how many of the computed tokens are
padding.

Epoch ``e`` starts from ``torch.randperm(n)`` seeded with ``seed + e`` (the Trainer's
seedable sampler with ``data_seed``). With ``group_by_length`` that order is cut into
mega-batches of ``mult`` optimizer steps' rows and each is sorted by length, longest
first, so that the rows of a micro-batch have about one length and little of a batch is
padding (the rule of ``transformers``' ``get_length_grouped_indices``, which its
``group_by_length`` sampler uses, here seeded per epoch so that a group run's members and
their separate runs draw the same order). The micro-batch holding the longest row comes
first, so a batch that does not fit in memory shows at the first step.

``SeededOrder`` is that order as a sampler for the Trainer (``dtm.train.loop``);
``step_plan`` the same order as optimizer steps for a group run (``dtm.train.group``).
"""

from __future__ import annotations

import math

MEGA_STEPS = 50  # at most 50 steps' rows per sorted mega-batch, as transformers' default


def epoch_order(lengths: list[int], seed: int, epoch: int, step_rows: int, by_length: bool):
    """Row indices of epoch ``epoch`` (see the module docstring)."""
    import torch  # lazy: torch

    n = len(lengths)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if not by_length or n == 0:
        return perm
    mult = max(1, min(n // (step_rows * 4), MEGA_STEPS))
    size = mult * step_rows
    megas = [
        sorted(perm[i : i + size], key=lambda j: lengths[j], reverse=True)
        for i in range(0, n, size)
    ]
    longest = max(range(len(megas)), key=lambda k: lengths[megas[k][0]])
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [j for m in megas for j in m]


class SeededOrder:
    """``epoch_order`` as a sampler: ``set_epoch`` (called by the Trainer and accelerate
    at each epoch) picks the epoch. ``run_one`` mixes it with ``torch``'s ``Sampler``."""

    def __init__(self, lengths: list[int], seed: int, step_rows: int, by_length: bool) -> None:
        self.lengths, self.seed, self.step_rows = lengths, seed, step_rows
        self.by_length, self.epoch = by_length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = epoch_order(self.lengths, self.seed, self.epoch, self.step_rows, self.by_length)
        return iter(order)


def step_plan(lengths: list[int], seed: int, micro: int, accum: int, steps: int, by_length: bool):
    """Yield ``(epoch, micro_batches)`` per optimizer step: lists of row indices into the
    training rows, in the order the Trainer visits them with ``SeededOrder``; ``epoch``
    is the Trainer's ``state.epoch`` after the step."""
    n = len(lengths)
    per_epoch = math.ceil(n / micro)
    done, e = 0, 0
    while done < steps:
        perm = epoch_order(lengths, seed, e, micro * accum, by_length)
        batches = [perm[i : i + micro] for i in range(0, n, micro)]
        for j in range(0, per_epoch, accum):
            chunk = batches[j : j + accum]
            yield e + (j + len(chunk)) / per_epoch, chunk
            done += 1
            if done == steps:
                return
        e += 1


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """The share of the positions of ``batches`` (each padded to its longest row) that are
    padding."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - real / computed if computed else 0.0
