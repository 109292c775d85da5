"""Groups that fit on one GPU: the members of a group job (SFT and the sub-models, whose
rows share one forward over one base) split by the memory estimate (``dtm.train.memory``)
into the fewest groups that each fit.

``split_members(cfgs, shape, machine)`` returns lists of member indices, in the members'
order (SFT first where it is first):

- one group, ``[[0, ..., n-1]]``, when the machine has no GPU, its memory is not known or
  the base's shape is not: the members train together as they always did (a CPU never
  splits, so the lab's runs and their ids do not change);
- else the fewest contiguous groups each fitting at ``auto``'s choices (``choose``:
  checkpointing on where a group needs it, a value set by hand kept). Taking members in
  order while the group still fits (next-fit) gives the fewest, since a part of a group
  that fits fits too; among that many groups, sizes as even as the memory allows (5
  members that fit 4 at a time train as 3 + 2, not 4 + 1: the same count, each further
  from the limit);
- a member that does not fit even alone is a group of one: its run's own out-of-memory
  handling (a smaller micro-batch) takes over there.
"""

from __future__ import annotations

from dtm.train.memory import Machine, Shape, choose, model_shape, this_machine


def split_members(cfgs: list, shape: Shape | None, machine: Machine) -> list[list[int]]:
    """The member indices of each group that fits one GPU of ``machine`` (module
    docstring); ``cfgs``: the members' ``TrainConfig``s, sharing a base of ``shape``."""
    n = len(cfgs)
    if n < 2 or not machine.gpu or machine.memory_gib is None or shape is None:
        return [list(range(n))]

    def fits(part: list[int]) -> bool:
        return len(part) == 1 or bool(choose([cfgs[i] for i in part], shape, machine).fits)

    greedy: list[list[int]] = [[0]]
    for i in range(1, n):
        if fits([*greedy[-1], i]):
            greedy[-1].append(i)
        else:
            greedy.append([i])
    g = len(greedy)
    sizes = [n // g + (k < n % g) for k in range(g)]  # the larger ones first
    starts = [sum(sizes[:k]) for k in range(g)]
    even = [list(range(s, s + size)) for s, size in zip(starts, sizes, strict=True)]
    return even if all(map(fits, even)) else greedy


def split_note(cfg, members: int, machine: Machine | None = None) -> str | None:
    """One line for the Train page when a group of ``members`` runs like ``cfg`` (SFT and
    the sub-models) would be split on ``machine`` (default: this one); None when it is
    not."""
    machine = machine or this_machine()
    parts = split_members([cfg] * members, model_shape(cfg.base), machine)
    if len(parts) == 1:
        return None
    sizes = " + ".join(str(len(p)) for p in parts)
    return (
        f"The {members} runs do not fit together on this GPU's {machine.memory_gib:.0f} GiB: "
        f"a launch trains them as {len(parts)} group jobs of {sizes} runs (in order, SFT "
        "first), one after another, or side by side on several GPUs."
    )
