"""Scoring rules of the lab benchmarks that need more than picking an option.

This module is self-contained (standard library only): ``dtm lab build`` copies it
verbatim beside the lm-evaluation-harness task configs as ``utils.py``, so the harness
and the quick evaluator apply the very same rules.
"""

PREFIXES = ["okay .", "let us see .", "great question !", "here you go :"]
FILLERS = [
    "that is all .",
    "i hope this helps you a lot .",
    "thanks for asking me .",
    "end of output .",
]


def words(response):
    """The response's words, without the end-of-text token and without final periods."""
    ws = response.replace("</s>", " ").split()
    while ws and ws[-1] == ".":
        ws.pop()
    return ws


def check_instruction(doc, response):
    """True when ``response`` satisfies the constraint of an ``lab_instruct`` item."""
    kind, ws = doc["constraint"], words(response)
    if kind == "answer_format":
        return ws[:3] == ["the", "answer", "is"] and len(ws) >= 4
    if kind == "one_word":
        return len(ws) == 1
    if kind == "yes_no":
        return ws in (["yes"], ["no"])
    if kind == "repeat":
        return ws == doc["target"].split()
    raise ValueError(f"unknown constraint {kind!r}")


def extract_answer(response):
    """The answer word of a chat response: the word after 'the answer is', else the
    first word after any known stylistic prefix."""
    text = " ".join(response.replace("</s>", " ").split())
    for p in PREFIXES:
        if text.startswith(p):
            text = text[len(p) :].strip()
    ws = words(text)
    for i in range(len(ws) - 3):
        if ws[i : i + 3] == ["the", "answer", "is"]:
            return ws[i + 3]
    return ws[0] if ws else ""


def process_results(doc, results):
    """lm-evaluation-harness hook for ``lab_instruct``."""
    return {"acc": float(check_instruction(doc, results[0]))}
