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
from pathlib import Path

from dtm.lab import checks
from dtm.lab.sft_data import PHRASINGS, PROBE_PHRASING
from dtm.lab.world import PROFESSIONS, World, arithmetic_items, reading_passage, two_hop
from dtm.tasks import MC_TASKS, PROBES, TASKS  # noqa: E402  (the task table)


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


def make_benchmarks(
    world: World,
    info: dict,
    corpus_two_hop: set[str],
    seed: int = 0,
    n_arith: int = 200,
    n_reading: int = 200,
) -> dict[str, list[dict]]:
    """Every task's items. ``info`` is ``make_sft_data``'s; ``corpus_two_hop`` the people
    whose two-hop answer the pretraining corpus states."""
    # Length: one block per task, each a few lines; the task list reads as one table.
    rng = random.Random(f"bench-{seed}")
    seen = set(info["seen"])
    out: dict[str, list[dict]] = {t: [] for t in TASKS + PROBES}
    for f in world.facts:
        out["lab_knowledge"].append(
            _mc(
                rng,
                f"question : {f.question()} answer :",
                f.object,
                world.domains[f.relation],
                subject=f.subject,
                relation=f.relation,
                seen=f.subject in seen,
            )
        )
    for expr, value in arithmetic_items(rng)[:n_arith]:
        near = [str(v) for v in range(max(0, value - 6), value + 7) if v != value]
        out["lab_reasoning"].append(
            _mc(
                rng,
                f"question : what is {expr} ? answer :",
                str(value),
                near,
                kind="arithmetic",
                expr=expr,
            )
        )
    for p in world.people:
        if p in corpus_two_hop:
            continue
        q, a = two_hop(world, p)
        out["lab_reasoning"].append(
            _mc(
                rng,
                f"question : {q} answer :",
                a,
                world.domains["capital"],
                kind="two_hop",
                subject=p,
            )
        )
    for _ in range(n_reading):
        passage, q, a = reading_passage(world, rng)
        mentioned = [w for w in passage.split() if w in PROFESSIONS or w in world.domains["colour"]]
        pool = PROFESSIONS if a in PROFESSIONS else world.domains["colour"]
        out["lab_reading"].append(
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
    for m in info["misconceptions"]:
        f = world.fact(m["subject"], m["relation"])
        out["lab_truthful"].append(
            _mc(
                rng,
                f"question : {f.question()} answer :",
                f.object,
                world.domains[f.relation],
                must=[m["false"]],
                subject=f.subject,
                relation=f.relation,
                misconception=m["false"],
            )
        )
    repeat = info.get("knobs", {}).get("repeat", "words")
    out["lab_instruct"] = _instruct_items(world, seen, rng, repeat=repeat)
    out["lab_bias"] = _bias_items(world, seen, rng, probe_phrasing(info))
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


def _yaml(task: str, data_file: Path) -> str:
    head = (
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data_file.resolve()))}\ntest_split: test\n"
    )
    if task in MC_TASKS:
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
        if task in TASKS:
            (folder / f"{task}.yaml").write_text(_yaml(task, final / path.name))
    (folder / "utils.py").write_text(inspect.getsource(checks))
    return written
