"""User tasks made from a lab, for the benchmarks: lm-evaluation-harness task YAMLs in a
folder (``dataset_path: json``, data beside them), scored through ``--tasks-dir`` as a
user's own tasks are, one per output type:

- ``user_knowledge``, ``user_reading`` (multiple_choice): the lab's items, under a
  template of their own (``Question: ... Answer:``);
- ``user_corpus`` (loglikelihood_rolling): the first lines of the lab's pretraining text;
- ``user_chat`` (generate_until, exact_match after a regex filter): the bias probe's chat
  questions, the answer read out of ``the answer is X``.
"""

from __future__ import annotations

import json
from pathlib import Path

NAMES = ("user_knowledge", "user_reading", "user_corpus", "user_chat")


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_user_tasks(lab: Path, folder: Path, corpus_lines: int = 200) -> Path:
    lab, folder = Path(lab), Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    bench = lab / "benchmarks"

    def items(task):
        return [json.loads(x) for x in (bench / f"{task}.jsonl").read_text().splitlines()]

    for name, task in (("knowledge", "lab_knowledge"), ("reading", "lab_reading")):
        _jsonl(
            folder / "data" / f"{name}.jsonl",
            [
                {"q": it["query"], "options": it["choices"], "label": it["gold"]}
                for it in items(task)
            ],
        )
    lines = (lab / "data" / "corpus.txt").read_text().splitlines()[:corpus_lines]
    _jsonl(folder / "data" / "corpus.jsonl", [{"text": t} for t in lines if t.strip()])
    _jsonl(
        folder / "data" / "chat.jsonl",
        [{"prompt": it["prompt"], "answer": it["answer"]} for it in items("lab_bias")],
    )
    head = (
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/{f}.jsonl\n"
        "test_split: test\n"
    )
    for name in ("knowledge", "reading"):
        (folder / f"user_{name}.yaml").write_text(
            f"task: user_{name}\n" + head.format(f=name) + "output_type: multiple_choice\n"
            'doc_to_text: "Question: {{q}}"\ndoc_to_choice: "{{options}}"\n'
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
        )
    (folder / "user_corpus.yaml").write_text(
        "task: user_corpus\n" + head.format(f="corpus") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "user_chat.yaml").write_text(
        "task: user_chat\n" + head.format(f="chat") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["</s>"]\n  max_gen_toks: 24\n  do_sample: false\n'
        "filter_list:\n  - name: answer\n    filter:\n"
        '      - function: regex\n        regex_pattern: "the answer is (\\\\w+)"\n'
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder
