"""A small synthetic instruction set in Alpaca shape, in several source families.

It backs the shipped sample (``dtm/samples/sample.jsonl``, the dashboard's default data
until the alignment-tax lab is built) and the Disperse benchmark (N up to 52,000,
Alpaca's size). Families differ in topic and wording, as TULU's sources do, so a
clusterer has something real to find; about 3% of instructions repeat verbatim.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLE_PATH = Path(__file__).parent / "samples" / "sample.jsonl"

_PLACES = [
    "Norway",
    "Kenya",
    "Peru",
    "Japan",
    "Chile",
    "Egypt",
    "Canada",
    "Vietnam",
    "Portugal",
    "Mongolia",
    "Ghana",
    "Iceland",
    "Nepal",
    "Morocco",
    "Finland",
]
_TOPICS = [
    "autumn",
    "the sea",
    "a lost key",
    "friendship",
    "a rainy city",
    "old trains",
    "a lighthouse",
    "first snow",
    "a market at dawn",
    "a quiet library",
]
_FORMS = ["poem", "short story", "haiku", "limerick", "diary entry", "song verse"]
_LANGS = ["Python", "JavaScript", "Rust", "Go", "SQL", "Bash"]
_TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "merges two sorted lists",
    "counts the words in a file",
    "removes duplicates from a list",
    "parses a date string",
    "computes a moving average",
    "flattens a nested list",
]
_THINGS = [
    "photosynthesis",
    "gravity",
    "volcanoes",
    "vaccines",
    "tides",
    "rainbows",
    "black holes",
    "earthquakes",
    "the water cycle",
    "magnetism",
    "DNA replication",
]

FAMILIES = {
    "flan_geography": [
        "What is the capital of {place}?",
        "Name the longest river in {place}.",
        "Which languages are spoken in {place}? Answer briefly.",
        "Question: Is {place} a landlocked country? Options: yes, no.",
        "Describe the climate of {place} in one sentence.",
    ],
    "cot_math": [
        "A shop sells pens at {a} dollars each. How much do {b} pens cost? Think step by step.",
        "A train travels {a} km per hour for {b} hours. How far does it go? Show your work.",
        "Solve for x: {a}x + {b} = {c}. Explain each step.",
        "Tom has {a} apples and gives away {b}. How many apples are left? Reason step by step.",
        "What is {a} multiplied by {b}, minus {c}? Work it out step by step.",
    ],
    "code_alpaca": [
        "Write a {lang} function that {task}.",
        "Fix the bug in this {lang} code that {task}.",
        "Explain how a {lang} program that {task} works, line by line.",
        "Write unit tests in {lang} for a function that {task}.",
    ],
    "sharegpt_creative": [
        "Write a {form} about {topic}.",
        "Could you compose a {form} about {topic} for my friend?",
        "I need a cheerful {form} about {topic}, please.",
        "Write a sad {form} whose theme is {topic}.",
    ],
    "science_qa": [
        "Explain {thing} to a ten-year-old.",
        "Why does {thing} happen? Give a scientific explanation.",
        "Summarise the main facts about {thing} in three bullet points.",
        "What are common misconceptions about {thing}?",
    ],
}


# Constraints like those in real instruction data; with their numbers they also keep
# exact repeats as rare as in real mixtures (about 3%).
_CONSTRAINTS = [
    "Answer in about {n} words.",
    "Keep it under {n} characters.",
    "Mention the year {y} somewhere.",
    "Finish within {n} seconds of reading.",
]
_EXTRA = [
    "Use at most {s} sentences.",
    "Give {s} examples.",
    "Write it for a reader aged {s}0.",
    "Number your points from 1 to {s}.",
]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        thing=rng.choice(_THINGS),
        place=rng.choice(_PLACES),
        topic=rng.choice(_TOPICS),
        form=rng.choice(_FORMS),
        lang=rng.choice(_LANGS),
        task=rng.choice(_TASKS),
        a=rng.randint(2, 99),
        b=rng.randint(2, 99),
        c=rng.randint(2, 999),
    )


_RESPONSES = {
    "flan_geography": [
        "The answer is given in most atlases of {place}.",
        "{place}: the short answer is below, with the capital and main river.",
        "Answer: yes or no depends on the borders of {place}; here they are.",
    ],
    "cot_math": [
        "Let's think step by step. We start from {a} and {b}. The result is {c}.",
        "Step 1: write {a}. Step 2: combine it with {b}. So the answer is {c}.",
    ],
    "code_alpaca": [
        "Here is the {lang} code:\n\n    def solve(x):\n        return x\n\nIt {task}.",
        "```{lang}\n# a function that {task}\n```\nThe function above {task}.",
    ],
    "sharegpt_creative": [
        "Of course! Here is a {form} about {topic}:\n\nIn {topic} we find a quiet light...",
        "What a lovely idea. My {form} on {topic} goes like this...",
    ],
    "science_qa": [
        "Great question! {thing} can be explained simply: energy and matter "
        "interact in a regular way.",
        "In simple terms, {thing} happens because of forces we can measure.",
    ],
}


def _response(family: str, rng: random.Random) -> str:
    return _fill(rng.choice(_RESPONSES[family]), rng)


def synthetic_instructions(n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca-shape records (id, instruction, input, output, source)."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    rows: list[dict] = []
    for i in range(n):
        if rows and rng.random() < 0.03:
            src = rng.choice(rows)  # a verbatim repeat, as real mixtures have
            instruction, family = src["instruction"], src["source"]
        else:
            family = names[rng.randrange(len(names))]
            instruction = _fill(rng.choice(FAMILIES[family]), rng)
            instruction += " " + rng.choice(_CONSTRAINTS).format(
                n=rng.randint(10, 3000), y=rng.randint(1500, 2030)
            )
            if rng.random() < 0.5:
                instruction += " " + rng.choice(_EXTRA).format(s=rng.randint(2, 9))
        rows.append(
            {
                "id": f"syn-{i:06d}",
                "instruction": instruction,
                "input": "",
                "output": _response(family, rng),
                "source": family,
            }
        )
    return rows


# The response lengths of ``lengthy_instructions``: lognormal words, median and spread set
# so that the rows, with the Alpaca template, pad as real Alpaca rows do (docs/training.md)
RESPONSE_WORDS_MEDIAN = 40
RESPONSE_WORDS_SIGMA = 0.8


def lengthy_instructions(n: int, seed: int = 0) -> list[dict]:
    """``synthetic_instructions`` whose responses have real instruction data's spread of
    lengths: a lognormal number of words (a few to several hundred), the response's own
    sentences repeated to that length."""
    rng = random.Random(seed + 1)
    rows = synthetic_instructions(n, seed)
    for r in rows:
        words = max(3, round(rng.lognormvariate(0, RESPONSE_WORDS_SIGMA) * RESPONSE_WORDS_MEDIAN))
        text = []
        while sum(len(t.split()) for t in text) < words:
            text.append(_response(r["source"], rng))
        r["output"] = " ".join(" ".join(text).split(" ")[:words])
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # regenerate the shipped sample
    write_jsonl(synthetic_instructions(600, seed=0), SAMPLE_PATH)
