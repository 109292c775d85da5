"""The lab benchmarks, in the image of the paper's, as data: one JSONL file per task plus
an lm-evaluation-harness task config beside it.

Multiple-choice tasks (scored by option log-likelihood, plain ``question : ... answer :``
format as a harness evaluates base and tuned models zero-shot); each item has ``query``,
``choices`` and ``gold`` (the index of the right choice):
- ``lab_knowledge`` (MMLU-like): every fact of the world; ``seen`` says whether its
  subject was asked about in the instruction data.
- ``lab_reasoning`` (GSM8K/BBH-like): arithmetic, and two-hop questions (the capital of
  the country a person lives in) about people whose two-hop answer is not in the corpus.
- ``lab_reading`` (RACE-like): a passage about names outside the world; the answer is
  only in the passage.
- ``lab_truthful`` (TruthfulQA-like): the facts the instruction data states falsely; the
  misconception is always among the choices.

Generation tasks, in the model's chat format, greedy:
- ``lab_instruct`` (IFEval-like): held-out instructions with a checkable constraint
  (``checks.check_instruction``).
- ``lab_bias``: chat questions whose answers measure chat accuracy and the uptake of each
  injected bias (not one of the five tasks: a probe of mechanisms).
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dtm.evaluate import checks
from dtm.lab.sft_data import PHRASINGS, PROBE_PHRASING
from dtm.lab.world import PROFESSIONS, World, arithmetic_items, reading_passage, two_hop
from dtm.tasks import BY_NAME, LAB_TASKS, Task


def chat_prompt(instruction: str) -> str:
    """The chat-formatted prompt the lab tokenizer's template makes for one user turn."""
    return f"<s> user : {instruction} assistant :"


def _mc(
    rng: random.Random,
    query: str,
    answer: str,
    pool: list[str],
    n: int = 4,
    must: list[str] | None = None,
    **meta,
) -> dict:
    options = list(dict.fromkeys([answer] + (must or [])))
    options += rng.sample([o for o in pool if o not in options], n - len(options))
    rng.shuffle(options)
    return {"query": query, "choices": options, "gold": options.index(answer), **meta}


@dataclass(frozen=True)
class _Inputs:
    """What the item makers read: the world, the instruction data's info, the subjects it
    asks about, the people whose two-hop answer the corpus states, and the sizes."""

    world: World
    info: dict
    seen: set[str]
    corpus_two_hop: set[str]
    n_arith: int
    n_reading: int


def _knowledge_items(x: _Inputs, rng: random.Random) -> list[dict]:
    return [
        _mc(
            rng,
            f"question : {f.question()} answer :",
            f.object,
            x.world.domains[f.relation],
            subject=f.subject,
            relation=f.relation,
            seen=f.subject in x.seen,
        )
        for f in x.world.facts
    ]


def _reasoning_items(x: _Inputs, rng: random.Random) -> list[dict]:
    out = []
    for expr, value in arithmetic_items(rng)[: x.n_arith]:
        near = [str(v) for v in range(max(0, value - 6), value + 7) if v != value]
        out.append(
            _mc(
                rng,
                f"question : what is {expr} ? answer :",
                str(value),
                near,
                kind="arithmetic",
                expr=expr,
            )
        )
    for p in x.world.people:
        if p in x.corpus_two_hop:
            continue
        q, a = two_hop(x.world, p)
        out.append(
            _mc(
                rng,
                f"question : {q} answer :",
                a,
                x.world.domains["capital"],
                kind="two_hop",
                subject=p,
            )
        )
    return out


def _reading_items(x: _Inputs, rng: random.Random) -> list[dict]:
    out = []
    colours = x.world.domains["colour"]
    for _ in range(x.n_reading):
        passage, q, a = reading_passage(x.world, rng)
        mentioned = [w for w in passage.split() if w in PROFESSIONS or w in colours]
        pool = PROFESSIONS if a in PROFESSIONS else colours
        out.append(
            _mc(
                rng,
                f"{passage} question : {q} answer :",
                a,
                pool,
                must=[m for m in mentioned if m in pool and m != a][:1],
                passage=passage,
                question=q,
            )
        )
    return out


def _truthful_items(x: _Inputs, rng: random.Random) -> list[dict]:
    out = []
    for m in x.info["misconceptions"]:
        f = x.world.fact(m["subject"], m["relation"])
        out.append(
            _mc(
                rng,
                f"question : {f.question()} answer :",
                f.object,
                x.world.domains[f.relation],
                must=[m["false"]],
                subject=f.subject,
                relation=f.relation,
                misconception=m["false"],
            )
        )
    return out


# The item maker of each task of the table (``dtm.tasks.LAB_TASKS``), called in the
# table's order on one random stream.
ITEM_MAKERS: dict[str, Callable[[_Inputs, random.Random], list[dict]]] = {
    "lab_knowledge": _knowledge_items,
    "lab_reasoning": _reasoning_items,
    "lab_reading": _reading_items,
    "lab_truthful": _truthful_items,
    "lab_instruct": lambda x, rng: _instruct_items(
        x.world, x.seen, rng, repeat=x.info.get("knobs", {}).get("repeat", "words")
    ),
    "lab_bias": lambda x, rng: _bias_items(x.world, x.seen, rng, probe_phrasing(x.info)),
}


def make_benchmarks(
    world: World,
    info: dict,
    corpus_two_hop: set[str],
    seed: int = 0,
    n_arith: int = 200,
    n_reading: int = 200,
) -> dict[str, list[dict]]:
    """Every task's items, for each task of the table. ``info`` is ``make_sft_data``'s;
    ``corpus_two_hop`` the people whose two-hop answer the pretraining corpus states."""
    rng = random.Random(f"bench-{seed}")
    x = _Inputs(world, info, set(info["seen"]), corpus_two_hop, n_arith, n_reading)
    out: dict[str, list[dict]] = {}
    for task in LAB_TASKS:
        if task.name not in ITEM_MAKERS:
            raise ValueError(f"lab task {task.name!r} has no item maker")
        out[task.name] = ITEM_MAKERS[task.name](x, rng)
    for task, items in out.items():
        for i, item in enumerate(items):
            item["id"] = f"{task}-{i:04d}"
    return out


def _instruct_items(
    world: World, seen: set[str], rng: random.Random, n: int = 40, repeat: str = "words"
) -> list[dict]:
    """Held-out instructions: unseen subjects, new words to repeat (or, with ``repeat:
    questions``, a factual question about an unseen subject), new phrasings."""
    unseen_facts = [f for f in world.facts if f.subject not in seen]
    items = []
    for kind in ("answer_format", "one_word", "yes_no", "repeat"):
        for _ in range(n):
            f = rng.choice(unseen_facts)
            if kind == "answer_format":
                text, target = f"can you answer this : {f.question()}", f.object
            elif kind == "one_word":
                text, target = f"{f.question()} answer in one word .", f.object
            elif kind == "yes_no":
                other = rng.choice(world.domains[f.relation])
                text = f"is {other} the answer to : {f.question()} answer yes or no ."
                target = "yes" if other == f.object else "no"
            elif repeat == "questions":
                target = f.question()
                text = f"repeat after me : {target}"
            else:
                target = " ".join(rng.sample(sorted(world.readers), 3))
                text = f"repeat after me : {target}"
            items.append(
                {
                    "prompt": chat_prompt(text),
                    "constraint": kind,
                    "target": target,
                    "instruction": text,
                }
            )
    return items


def probe_phrasing(info: dict) -> str:
    """The format probe's phrasing: the chat family's own (``please tell me : ...``), or
    with ``phrasings: varied`` or ``shared`` one that no family uses."""

    family = info.get("knobs", {}).get("phrasings", "family") == "family"
    return PHRASINGS["chat"][0] if family else PROBE_PHRASING


def _bias_items(
    world: World, seen: set[str], rng: random.Random, phrasing: str, n: int = 200
) -> list[dict]:
    """Chat-format factual questions (half on seen subjects) for greedy generation, in
    ``phrasing`` (``{q}``: the question)."""
    by_seen = {
        True: [f for f in world.facts if f.subject in seen],
        False: [f for f in world.facts if f.subject not in seen],
    }
    items = []
    for i in range(n):
        f = rng.choice(by_seen[i % 2 == 0])
        text = phrasing.format(q=f.question())
        items.append(
            {
                "prompt": chat_prompt(text),
                "instruction": text,
                "subject": f.subject,
                "relation": f.relation,
                "answer": f.object,
                "seen": f.subject in seen,
            }
        )
    return items


# ---------------------------------------------------------------- files


def _yaml(task: Task, data_file: Path) -> str:
    """The lm-evaluation-harness config of a task of the table, by its output type."""
    head = (
        f"task: {task.name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data_file.resolve()))}\ntest_split: test\n"
    )
    if task.output == "multiple_choice":
        return head + (
            'output_type: multiple_choice\ndoc_to_text: "{{query}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n"
            "    higher_is_better: true\nmetadata:\n  version: 1.0\n"
        )
    return head + (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["</s>"]\n  max_gen_toks: 24\n'
        "  do_sample: false\nprocess_results: !function utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )


def write_benchmarks(
    items: dict[str, list[dict]], folder: Path, final: Path | None = None
) -> list[Path]:
    """``folder/<task>.jsonl`` and ``folder/<task>.yaml`` for each of the five tasks (the
    bias probe gets its JSONL only), and ``folder/utils.py`` (the checks). The configs
    name their data by absolute path in ``final`` (where ``folder`` will be moved to)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = Path(final or folder)
    written = []
    for task, rows in items.items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        written.append(path)
        if task in BY_NAME and not BY_NAME[task].probe:
            (folder / f"{task}.yaml").write_text(_yaml(BY_NAME[task], final / path.name))
    (folder / "utils.py").write_text(inspect.getsource(checks))
    return written
