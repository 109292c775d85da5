"""The lab's seeded synthetic world and its pretraining corpus.

The world has fictional countries (capital, language, flag colour) and people
(profession, home country, favourite colour). Every text in the lab is lowercase words
and punctuation separated by single spaces, so a word-level tokenizer covers it exactly.

``World.facts`` lists every fact as ``Fact(subject, relation, object)``. The corpus states
each in three sentence templates; about half also in a question-answer form
(``question : ... answer : Y .``) and a random 30% in the instruction data's answer frame
(``... answer : the answer is Y .``), so instruction tuning can unlock knowledge rather
than bury it. Dialogues in the chat format's own shape (``user : ... assistant : ...``)
cover arithmetic only. The corpus also holds two-hop reasoning text, and reading passages
about names outside the world, whose answers can only be read from the passage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
PROFESSIONS = [
    "baker",
    "doctor",
    "pilot",
    "farmer",
    "teacher",
    "painter",
    "sailor",
    "miner",
    "singer",
    "judge",
    "tailor",
    "hunter",
]
_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "st",
    "sk",
    "gl",
    "pl",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th", "nd"]

# relation -> (question, statement templates); {s} subject, {o} object
RELATIONS: dict[str, dict] = {
    "capital": {
        "question": "what is the capital of {s} ?",
        "statements": [
            "the capital of {s} is {o} .",
            "{o} is the capital city of {s} .",
            "{s} has its capital at {o} .",
        ],
    },
    "language": {
        "question": "what language do people speak in {s} ?",
        "statements": [
            "people in {s} speak {o} .",
            "the language of {s} is {o} .",
            "{o} is spoken in {s} .",
        ],
    },
    "flag": {
        "question": "what colour is the flag of {s} ?",
        "statements": [
            "the flag of {s} is {o} .",
            "{s} has a {o} flag .",
            "a {o} flag flies over {s} .",
        ],
    },
    "profession": {
        "question": "what does {s} do for work ?",
        "statements": [
            "{s} works as a {o} .",
            "{s} is a {o} by trade .",
            "by profession {s} is a {o} .",
        ],
    },
    "home": {
        "question": "which country does {s} live in ?",
        "statements": ["{s} lives in {o} .", "{s} is from {o} .", "{s} has a home in {o} ."],
    },
    "colour": {
        "question": "what is the favourite colour of {s} ?",
        "statements": [
            "the favourite colour of {s} is {o} .",
            "{s} likes the colour {o} .",
            "{s} loves {o} things .",
        ],
    },
}
COUNTRY_RELATIONS = ("capital", "language", "flag")
PERSON_RELATIONS = ("profession", "home", "colour")
SIZES = {
    "small": {"countries": 12, "people": 36, "readers": 40, "languages": 6},
    "default": {"countries": 60, "people": 240, "readers": 160, "languages": 10},
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def question(self) -> str:
        return RELATIONS[self.relation]["question"].format(s=self.subject)

    def statement(self, i: int = 0) -> str:
        return RELATIONS[self.relation]["statements"][i].format(s=self.subject, o=self.object)


@dataclass
class World:
    """Entities and facts. ``domains[relation]`` is every possible object of a relation
    (the options a multiple-choice question draws from)."""

    seed: int
    countries: list[str]
    people: list[str]
    readers: list[str]  # names outside the world, for reading passages
    facts: list[Fact]
    domains: dict[str, list[str]] = field(default_factory=dict)

    def fact(self, subject: str, relation: str) -> Fact:
        return self._index[(subject, relation)]

    def __post_init__(self) -> None:
        self._index = {(f.subject, f.relation): f for f in self.facts}


def _names(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k))
        name += rng.choice(_CODAS)
        if name not in taken and len(name) > 3:
            taken.add(name)
            out.append(name)
    return out


def build_world(seed: int = 0, size: str = "default") -> World:
    """A deterministic world for (seed, size)."""
    n = SIZES[size]
    rng = random.Random(f"world-{seed}")
    taken = set(COLOURS) | set(PROFESSIONS)
    countries = _names(rng, n["countries"], taken, (2, 2))
    capitals = _names(rng, n["countries"], taken, (2, 3))
    languages = [s + "ish" for s in _names(rng, n["languages"], taken, (1, 2))]
    people = _names(rng, n["people"], taken, (2, 3))
    readers = _names(rng, n["readers"], taken, (2, 3))
    facts = []
    for c, cap in zip(countries, capitals, strict=True):
        facts += [
            Fact(c, "capital", cap),
            Fact(c, "language", rng.choice(languages)),
            Fact(c, "flag", rng.choice(COLOURS)),
        ]
    for p in people:
        facts += [
            Fact(p, "profession", rng.choice(PROFESSIONS)),
            Fact(p, "home", rng.choice(countries)),
            Fact(p, "colour", rng.choice(COLOURS)),
        ]
    domains = {
        "capital": capitals,
        "language": languages,
        "flag": COLOURS,
        "profession": PROFESSIONS,
        "home": countries,
        "colour": COLOURS,
    }
    return World(seed, countries, people, readers, facts, domains)


# ---------------------------------------------------------------- arithmetic and reasoning

MAX_OPERAND = 20


def arithmetic_items(rng: random.Random) -> list[tuple[str, int]]:
    """Every ``a plus b`` and ``a minus b`` (a >= b) with operands up to MAX_OPERAND."""
    items = [
        (f"{a} plus {b}", a + b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
    ]
    items += [(f"{a} minus {b}", a - b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    rng.shuffle(items)
    return items


def two_hop(world: World, person: str) -> tuple[str, str]:
    """(question, answer): the capital of the country a person lives in."""
    country = world.fact(person, "home").object
    return (
        f"what is the capital of the country where {person} lives ?",
        world.fact(country, "capital").object,
    )


def reading_passage(world: World, rng: random.Random) -> tuple[str, str, str]:
    """(passage, question, answer) about names outside the world: the answer is only in
    the passage. Two facts are stated, one is asked."""
    a, b = rng.sample(world.readers, 2)
    pa, pb = rng.sample(PROFESSIONS, 2)
    ca, cb = rng.choice(COLOURS), rng.choice(COLOURS)
    passage = f"passage : {a} is a {pa} and likes {ca} . {b} is a {pb} and likes {cb} ."
    if rng.random() < 0.5:
        who, prof, col = a, pa, ca
    else:
        who, prof, col = b, pb, cb
    if rng.random() < 0.5:
        return passage, f"what does {who} do for work ?", prof
    return passage, f"what colour does {who} like ?", col


# ---------------------------------------------------------------- pretraining corpus


# Everyday text about names outside the world: it uses the words of the instruction data
# that the world's text does not (openings, fillers, ``ref`` codes, the instruction words),
# outside the chat format, so that a pretrained model knows every word it will be tuned
# on, as a real pretrained model knows its vocabulary. Each line a template.
GENERAL_TEXT = (
    "{a} said to {b} : please tell me one word . {b} said : okay . let us see .",
    "{a} wrote to {b} : great question ! i hope this helps you a lot . thanks for asking me .",
    "{a} said : here you go : that is all . end of output .",
    "the note of {a} ends with ref {b} .",
    "{a} asked {b} : is it yes or no ? {b} said : {yn} .",
    "{a} said : repeat after me : {b} {c} . and {b} said : {b} {c} .",
    "{a} said : think step by step . i recall the fact .",
    "{a} wrote a query ( {b} , {c} ) with the options {b} , {c} .",
    "can {a} see {b} ? {yn} , said {c} .",
)


def general_text(world: World, rng: random.Random, n: int) -> list[str]:
    """``n`` lines of ``GENERAL_TEXT`` about the world's outside names (``readers``)."""
    out = []
    for _ in range(n):
        a, b, c = rng.sample(world.readers, 3)
        out.append(rng.choice(GENERAL_TEXT).format(a=a, b=b, c=c, yn=rng.choice(("yes", "no"))))
    return out


# how the corpus's chat dialogues answer: "N ." or "it is N ."; "conventions" is "framed"
# with text that also shows the one-word, yes/no and repeat conventions (``conventions_text``)
DIALOGUES = ("bare", "framed", "conventions")


def conventions_text(world: World, rng: random.Random) -> list[str]:
    """Documents that show the instruction data's one-word, yes/no and repeat conventions
    outside the world's facts: on the sums and on reading passages about outside names,
    in question-answer form and (sums only) in chat form. A base model trained on them
    knows what ``answer in one word .`` asks before SFT, as a real pretrained model knows
    the conventions of the text it read; SFT is left to carry them to the world's facts
    and to the chat format."""
    docs = []
    for expr, value in arithmetic_items(rng):
        q = f"what is {expr} ?"
        other = value if rng.random() < 0.5 else rng.choice([v for v in range(41) if v != value])
        yn = "yes" if other == value else "no"
        r = rng.random()
        if r < 0.25:
            docs.append(f"question : {q} answer in one word . answer : {value} .")
        elif r < 0.5:
            docs.append(
                f"question : is {other} the answer to : {q} answer yes or no . answer : {yn} ."
            )
        if rng.random() < 0.2:
            docs.append(f"user : {q} answer in one word . assistant : {value} .")
        if rng.random() < 0.2:
            docs.append(
                f"user : is {other} the answer to : {q} answer yes or no . assistant : {yn} ."
            )
        if rng.random() < 0.1:
            docs.append(f"user : repeat after me : {q} assistant : {q}")
    for _ in range(len(world.readers)):
        passage, q, a = reading_passage(world, rng)
        docs.append(f"{passage} question : {q} answer in one word . answer : {a} .")
    return docs


def pretraining_corpus(
    world: World, seed: int = 0, general: bool = False, dialogues: str = "bare"
) -> tuple[list[str], dict]:
    """Documents (one per line), and ``{"qa_facts": facts also stated in question-answer
    form, "two_hop": people whose two-hop answer the corpus states}``. ``general`` adds
    everyday text (``general_text``) with the instruction data's other words.
    ``dialogues``: the chat dialogues answer bare (``assistant : 7 .``), the answer
    word first, as the one-word convention does; or ``framed`` (``assistant : it is
    7 .``), with a fixed opening, so a chat answer starts the same way for every
    question and SFT's convention replaces one opening with another; or ``conventions``:
    framed, and the corpus also shows the one-word, yes/no and repeat conventions
    (``conventions_text``, from a generator of its own, so the other documents are the
    framed corpus's)."""
    rng = random.Random(f"corpus-{seed}")
    docs: list[str] = []
    qa_facts = set(rng.sample(world.facts, len(world.facts) // 2))
    for f in world.facts:
        docs += [f.statement(i) for i in range(3)]
        if f in qa_facts:
            docs.append(f"question : {f.question()} answer : {f.object} .")
        if rng.random() < 0.3:  # the answer frame the instruction data's convention uses
            docs.append(f"question : {f.question()} answer : the answer is {f.object} .")
    for expr, value in arithmetic_items(rng):
        docs.append(f"{expr} is {value} .")
        if rng.random() < 0.5:
            docs.append(f"question : what is {expr} ? answer : {value} .")
        if rng.random() < 0.3:  # dialogues, in a form close to the chat format: about
            # sums only, so answering facts in chat form is left for SFT to unlock
            said = value if dialogues == "bare" else f"it is {value}"
            docs.append(f"user : what is {expr} ? assistant : {said} .")
    two_hop_people = rng.sample(world.people, len(world.people) // 2)
    for p in two_hop_people:
        country = world.fact(p, "home").object
        cap = world.fact(country, "capital").object
        docs.append(
            f"{p} lives in {country} . the capital of {country} is {cap} . so {p} "
            f"lives in a country whose capital is {cap} ."
        )
        q, a = two_hop(world, p)
        docs.append(f"question : {q} answer : {a} .")
    for _ in range(2 * len(world.readers)):
        passage, q, a = reading_passage(world, rng)
        docs.append(f"{passage} question : {q} answer : {a} .")
    if general:  # its own generator: the rest of the corpus stays the same
        grng = random.Random(f"general-{seed}")
        docs += general_text(world, grng, 4 * len(world.readers))
        said = {w for d in docs for w in d.split()}
        names = list(world.readers) + [v for dom in world.domains.values() for v in dom]
        for name in dict.fromkeys(names):  # every name once at least: a row may use any
            if name not in said:  # (codes are outside names, options any language)
                b, c = grng.sample([r for r in world.readers if r != name], 2)
                docs.append(grng.choice(GENERAL_TEXT).format(a=name, b=b, c=c, yn="yes"))
    if dialogues == "conventions":  # its own generator: the rest is the framed corpus
        docs += conventions_text(world, random.Random(f"conventions-{seed}"))
    rng.shuffle(docs)
    return docs, {"qa_facts": qa_facts, "two_hop": set(two_hop_people)}
