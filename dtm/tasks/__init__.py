"""The task table: every lab task as data, read by the quick engine, the landscape, the
charts, the results tables and the pages (as lm-evaluation-harness's task YAMLs are).

A ``Task`` has its ``name`` (``lab_knowledge``), the ``short`` label tables and widgets
show (``knowledge``), its ``output`` type (``multiple_choice`` or ``generate_until``),
the quick engine's ``scorer`` (a name in ``dtm.evaluate.lab.SCORERS``), its ``headline``
metrics as ``(metric, heading)`` pairs in the order the results table shows them, and
whether it is a ``probe`` (a measure of mechanisms, not one of the paper's benchmarks)
or in the Merge page's default live score (``quick``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    short: str
    output: str  # "multiple_choice" | "generate_until"
    scorer: str  # the quick engine's: "mc" | "mc_favourite" | "instruct" | "bias"
    headline: tuple[tuple[str, str], ...]
    probe: bool = False
    quick: bool = False
    extra: tuple[str, ...] = ()  # more metrics the lab's own report shows


LAB_TASKS: tuple[Task, ...] = (
    Task(
        "lab_knowledge",
        "knowledge",
        "multiple_choice",
        "mc_favourite",
        (("acc", "knowledge"), ("acc_unseen", "knowledge (unseen)")),
        quick=True,
    ),
    Task(
        "lab_reasoning", "reasoning", "multiple_choice", "mc", (("acc", "reasoning"),), quick=True
    ),
    Task("lab_reading", "reading", "multiple_choice", "mc", (("acc", "reading"),)),
    Task(
        "lab_truthful",
        "truthful",
        "multiple_choice",
        "mc",
        (("acc", "truthful"),),
        extra=("misconception_rate",),
    ),
    Task(
        "lab_instruct", "instruct", "generate_until", "instruct", (("acc", "instruct"),), quick=True
    ),
    Task(
        "lab_bias",
        "bias",
        "generate_until",
        "bias",
        (
            ("chat_acc", "chat acc"),
            ("format", "format"),
            ("favourite_rate", "favourite"),
            ("prefix_rate", "prefix"),
            ("filler_rate", "filler"),
            ("rare_code_rate", "rare code"),
        ),
        probe=True,
    ),
)
BY_NAME = {t.name: t for t in LAB_TASKS}
TASKS = tuple(t.name for t in LAB_TASKS if not t.probe)  # the five benchmarks
PROBES = tuple(t.name for t in LAB_TASKS if t.probe)
MC_TASKS = tuple(t.name for t in LAB_TASKS if t.output == "multiple_choice")
QUICK_TASKS = {t.short: t.name for t in LAB_TASKS if t.quick}  # the Merge page's default
SHORT = {t.name: t.short for t in LAB_TASKS}

# The relation each instruction family's favourite falsifies when a lab's
# ``favourite_scope`` is "own": the knowledge of the other relations is untouched by any
# favourite, a control for the ledger. The lab's data injects them; the knowledge
# scorer counts them (with the favourites in the lab's ``lab.json``).
OWN_RELATIONS = {"flan": "colour", "cot": "profession", "chat": "flag", "code": "language"}


def columns() -> list[tuple[str, str, str]]:
    """The results table's columns: ``(task, metric, heading)``."""
    return [(t.name, m, h) for t in LAB_TASKS for m, h in t.headline]


def headline_metrics(with_extra: bool = False) -> list[tuple[str, str]]:
    """``(task, metric)`` of every headline measure (and the extra ones)."""
    out = [(t, m) for t, m, _ in columns()]
    if with_extra:
        out += [(t.name, m) for t in LAB_TASKS for m in t.extra]
    return out


def short(name: str) -> str:
    """The label a table or chart shows for a task (a task not in the table: its name)."""
    return SHORT.get(name, name)
