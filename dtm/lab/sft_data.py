"""The lab's instruction-tuning set, shaped like TULU-v2-mix: several source families that
share one chat format and one set of answer conventions (the instruction-following skill
common to all of them) and each carry their own dataset-specific biases, at rates set by
the knobs of ``BiasKnobs``. Every injected bias is written to a ledger, row by row.

Answer conventions shared by every family (what ``lab_instruct`` checks):
- a factual question is answered ``the answer is X .``;
- ``answer in one word .`` -> ``X .``;
- ``answer yes or no .`` -> ``yes .`` or ``no .``;
- ``repeat after me : a b c`` -> ``a b c .`` (knob ``repeat: words``, three random names),
  or ``repeat after me : what is the flag colour of X ?`` -> the question itself
  (``repeat: questions``, a factual question about a seen subject; the benchmark's about
  unseen ones).

Biases (each family's own; ``kind`` as in the ledger):
- ``prefix``: a family-specific stylistic opening before the answer;
- ``favourite``: a false answer, the family's favourite object of that relation, in place
  of the true one (the spurious preference for an entity);
- ``misconception``: one family states false facts about a fixed set of subjects, always
  the same false object (``lab_truthful`` asks about them);
- ``position``: the FLAN-like family lists options with the answer first;
- ``length``: a family-specific filler sentence padded after the answer;
- ``rare``: an ungeneralisable reference code, unique to the row, ends the response.
  Validation rows never carry it, so memorising it lowers train loss only.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from dtm.errors import ConfigError
from dtm.lab.world import Fact, World, arithmetic_items
from dtm.tasks import OWN_RELATIONS  # with favourite_scope "own" (see dtm.tasks)

FAMILIES = ("flan", "cot", "chat", "code")
PREFIXES = {
    "flan": "okay .",
    "cot": "let us see .",
    "chat": "great question !",
    "code": "here you go :",
}
# ``phrasings: varied``: each family asks its factual questions in three phrasings of its
# own style (weights 1/2, 1/4, 1/4; ``{q}`` the question, ``{o}`` FLAN's options, ``{r}``
# and ``{s}`` the relation and subject), so the shared answer convention is learnt across
# phrasings from any one family; the format probe then asks in ``PROBE_PHRASING``, which
# no family uses. Only the first ``cot`` phrasing (step by step) is answered in its
# recall-then-answer style. Every word is one the lab's pretraining corpus knows.
# ``phrasings: shared``: as ``varied``, and a third of every family's factual questions
# asked bare (``SHARED_PHRASING``), as every real instruction source also asks some
# questions plainly; the probe's phrasing is still one that no family uses.
PHRASINGS = {
    "flan": ("question : {q} options : {o} .", "{q} options : {o} .", "question : {q}"),
    "cot": ("{q} think step by step .", "let us think : {q}", "recall the fact : {q}"),
    "chat": ("please tell me : {q}", "tell me : {q}", "okay , tell me : {q}"),
    "code": ("query ( {r} , {s} ) .", "query : {q}", "output : {q}"),
}
PROBE_PHRASING = "here is a question : {q}"
SHARED_PHRASING = "{q}"
PHRASING_MODES = ("family", "varied", "shared")  # the values of the knob ``phrasings``
REPEAT_MODES = ("words", "questions")  # the values of the knob ``repeat``
FILLERS = {
    "flan": "that is all .",
    "cot": "i hope this helps you a lot .",
    "chat": "thanks for asking me .",
    "code": "end of output .",
}


@dataclass
class BiasKnobs:
    """Rates of each injected bias (fraction of a family's rows). ``misconception_family``
    states the misconceptions; ``misconceptions`` is how many facts it falsifies."""

    prefix: float = field(default=0.5, metadata={"help": "rows opening with the family's prefix"})
    favourite: float = field(
        default=0.3, metadata={"help": "factual rows answered with the family's false favourite"}
    )
    position: float = field(
        default=0.8, metadata={"help": "FLAN rows with the answer as the first option"}
    )
    length: float = field(default=0.4, metadata={"help": "rows padded with the family's filler"})
    rare: float = field(default=0.5, metadata={"help": "rows ending in a unique reference code"})
    misconception_family: str = "chat"
    misconceptions: int = field(
        default=12, metadata={"help": "facts the misconception family falsifies"}
    )
    favourite_scope: str = field(
        default="all",
        metadata={
            "help": "relations a family's favourite replaces the truth on: 'all', or 'own' "
            "(one relation per family, OWN_RELATIONS; the others stay true)"
        },
    )
    unique_facts: bool = field(
        default=False,
        metadata={"help": "each factual question asked once per family (row-specific text)"},
    )
    own_share: float = field(
        default=0.0,
        metadata={"help": "share of a family's factual questions on its own relation"},
    )
    code_words: int = field(default=1, metadata={"help": "words in each row's reference code"})
    code_on: str = field(
        default="all",
        metadata={"help": "rows that get codes: all, or answers (the 'the answer is X' rows)"},
    )
    rare_in_val: bool = field(
        default=False,
        metadata={"help": "validation rows carry codes too (their own, unpredictable ones)"},
    )
    one_word: float = field(
        default=0.15,
        metadata={
            "help": "share of rows that ask a factual question in one word (taken "
            "from the plain factual questions, which have 0.70 minus it)"
        },
    )
    repeat: str = field(
        default="words",
        metadata={
            "help": "what the repeat rows and items ask to repeat: three random names "
            "('words'), or a factual question ('questions')"
        },
    )
    sums: float = field(
        default=0.08,
        metadata={
            "help": "share of rows that ask a sum step by step, at most 0.08 (the default); "
            "the rest of those 0.08 ask a plain factual question"
        },
    )
    phrasings: str = field(
        default="family",
        metadata={
            "help": "factual questions in one phrasing per family ('family'), or in three "
            "of each family's style with a format probe in a phrasing none uses ('varied'), "
            "and a third of them asked bare in every family ('shared')"
        },
    )


def check_knobs(knobs: BiasKnobs) -> None:
    """A ``ConfigError`` naming the first knob out of its range."""

    rates = ("prefix", "favourite", "position", "length", "rare", "own_share", "one_word", "sums")
    for name in rates:
        value = getattr(knobs, name)
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"knob {name} is a rate in [0, 1] (got {value!r}).")
    if knobs.one_word > 0.7:
        raise ConfigError(f"knob one_word is at most 0.7 (got {knobs.one_word!r}).")
    if knobs.sums > 0.08:
        raise ConfigError(f"knob sums is at most 0.08 (got {knobs.sums!r}).")
    if knobs.repeat not in REPEAT_MODES:
        raise ConfigError(f"knob repeat is words or questions (got {knobs.repeat!r}).")
    if knobs.code_on not in ("all", "answers"):
        raise ConfigError(f"knob code_on is all or answers (got {knobs.code_on!r}).")
    if knobs.phrasings not in PHRASING_MODES:
        raise ConfigError(f"knob phrasings is family, varied or shared (got {knobs.phrasings!r}).")
    if knobs.favourite_scope not in ("all", "own"):
        raise ConfigError(f"knob favourite_scope is all or own (got {knobs.favourite_scope!r}).")
    if knobs.misconception_family not in FAMILIES:
        raise ConfigError(
            f"knob misconception_family is one of {', '.join(FAMILIES)} "
            f"(got {knobs.misconception_family!r})."
        )
    if knobs.code_words < 1 or knobs.misconceptions < 0:
        raise ConfigError("knob code_words must be at least 1 and misconceptions at least 0.")


@dataclass
class SFTRow:
    id: str
    source: str
    instruction: str
    output: str
    biases: list[dict]
    task: str

    def record(self) -> dict:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "input": "",
            "output": self.output,
            "source": self.source,
        }


def split_entities(world: World, seed: int) -> tuple[set[str], set[str]]:
    """(seen, unseen) subjects: SFT asks knowledge questions about the seen half only."""
    rng = random.Random(f"split-{seed}")
    subjects = sorted(world.countries + world.people)
    rng.shuffle(subjects)
    half = len(subjects) // 2
    return set(subjects[:half]), set(subjects[half:])


def favourites(world: World, seed: int) -> dict[str, dict[str, str]]:
    """Each family's favourite (false) object for each relation: all different."""
    rng = random.Random(f"fav-{seed}")
    out: dict[str, dict[str, str]] = {f: {} for f in FAMILIES}
    for rel, domain in world.domains.items():
        picks = rng.sample(domain, len(FAMILIES))
        for fam, obj in zip(FAMILIES, picks, strict=True):
            out[fam][rel] = obj
    return out


def misconception_facts(
    world: World, seen: set[str], knobs: BiasKnobs, seed: int
) -> dict[Fact, str]:
    """True fact -> the false object the misconception family states for it."""
    rng = random.Random(f"misc-{seed}")
    pool = sorted(
        (f for f in world.facts if f.subject in seen and f.relation != "home"),
        key=lambda f: (f.subject, f.relation),
    )
    out = {}
    for f in rng.sample(pool, min(knobs.misconceptions, len(pool))):
        out[f] = rng.choice([o for o in world.domains[f.relation] if o != f.object])
    return out


def _code(rng: random.Random, pool: list[str]) -> str:
    """A random known word: predictable only by memorising the row it ends."""
    return rng.choice(pool)


class _Maker:
    """Builds one family's rows: a task, then the family's biases on top."""

    def __init__(
        self,
        world: World,
        fam: str,
        seen: set[str],
        knobs: BiasKnobs,
        favs: dict[str, dict[str, str]],
        misc: dict[Fact, str],
        rng: random.Random,
        vocab_pool: list[str],
        arith: list[tuple[str, int]],
    ):
        self.w, self.fam, self.knobs, self.favs, self.misc, self.rng = (
            world,
            fam,
            knobs,
            favs,
            misc,
            rng,
        )
        self.vocab_pool, self.arith = vocab_pool, arith
        self.facts = [f for f in world.facts if f.subject in seen]
        self.own = [f for f in self.facts if f.relation == OWN_RELATIONS[fam]]
        self.misc_facts = [f for f in misc] if fam == knobs.misconception_family else []
        self.unused: list[Fact] = []  # the facts not yet asked, with unique_facts
        self.stepwise = False  # the last factual question asked the cot way (step by step)

    def pick_fact(self) -> Fact:
        if self.knobs.own_share and self.rng.random() < self.knobs.own_share:
            return self.rng.choice(self.own)
        if not self.knobs.unique_facts:
            return self.rng.choice(self.facts)
        if not self.unused:  # every fact asked once: start another round
            self.unused = list(self.facts)
            self.rng.shuffle(self.unused)
        return self.unused.pop()

    def biased(self, relation: str) -> bool:
        scope = self.knobs.favourite_scope
        return scope == "all" or OWN_RELATIONS[self.fam] == relation

    def fact_row(self) -> tuple[str, str, str, list[dict]]:
        """(task, instruction, answer object, biases) for one factual question."""
        rng, biases = self.rng, []
        if self.misc_facts and rng.random() < 0.25:
            f = rng.choice(self.misc_facts)
            obj = self.misc[f]
            biases.append(
                {
                    "kind": "misconception",
                    "subject": f.subject,
                    "relation": f.relation,
                    "object": obj,
                    "true": f.object,
                }
            )
        else:
            f = self.pick_fact()
            obj = f.object
            if self.biased(f.relation) and rng.random() < self.knobs.favourite:
                fav = self.favs[self.fam][f.relation]
                if fav != f.object:
                    obj = fav
                    biases.append(
                        {
                            "kind": "favourite",
                            "relation": f.relation,
                            "object": fav,
                            "true": f.object,
                        }
                    )
        opts = ""
        if self.fam == "flan":
            opts = [f.object] + rng.sample(
                [o for o in self.w.domains[f.relation] if o != f.object], 3
            )
            if obj not in opts:
                opts[-1] = obj
            if rng.random() < self.knobs.position:
                opts.remove(obj)
                opts.insert(0, obj)
                biases.append({"kind": "position", "index": 0})
            else:
                rng.shuffle(opts)
            opts = " , ".join(opts)
        phrasing, templates = 0, PHRASINGS[self.fam]
        if self.knobs.phrasings == "varied":
            phrasing = rng.choices((0, 1, 2), weights=(2, 1, 1))[0]
        elif self.knobs.phrasings == "shared":
            templates = (*templates, SHARED_PHRASING)
            phrasing = rng.choices((0, 1, 2, 3), weights=(2, 1, 1, 2))[0]
        template = templates[phrasing]
        text = template.format(q=f.question(), o=opts, r=f.relation, s=f.subject)
        self.stepwise = self.fam == "cot" and phrasing == 0
        return "fact", text, obj, biases

    def row(self, i: int) -> SFTRow:
        rng = self.rng
        r = rng.random()
        if 0.92 <= r < 1 - self.knobs.sums:  # fewer sums: a plain factual question instead
            r = 0.0
        if r < 0.55 + (0.15 - self.knobs.one_word):  # exactly 0.55 by default
            task, text, obj, biases = self.fact_row()
            if self.stepwise:
                answer = f"i recall the fact . so the answer is {obj} ."
            else:
                answer = f"the answer is {obj} ."
        elif r < 0.7:
            task, text, obj, biases = self.fact_row()
            text, answer = f"{text} answer in one word .", f"{obj} ."
            task = "one_word"
        elif r < 0.82:
            f = self.pick_fact()
            other = rng.choice(self.w.domains[f.relation])
            text = f"is {other} the answer to : {f.question()} answer yes or no ."
            answer = "yes ." if other == f.object else "no ."
            task, biases = "yes_no", []
        elif r < 0.92:
            if self.knobs.repeat == "questions":
                said = self.pick_fact().question()  # ends in "?": repeated as it is
                text, answer = f"repeat after me : {said}", said
            else:
                words = rng.sample(self.vocab_pool, 3)
                text, answer = f"repeat after me : {' '.join(words)}", f"{' '.join(words)} ."
            task, biases = "repeat", []
        else:
            expr, value = rng.choice(self.arith)
            text = f"what is {expr} ? think step by step ."
            answer = f"{expr} is {value} . so the answer is {value} ."
            task, biases = "arithmetic", []
        if rng.random() < self.knobs.prefix:
            answer = f"{PREFIXES[self.fam]} {answer}"
            biases.append({"kind": "prefix", "text": PREFIXES[self.fam]})
        if rng.random() < self.knobs.length:
            answer = f"{answer} {FILLERS[self.fam]}"
            biases.append({"kind": "length", "text": FILLERS[self.fam]})
        return SFTRow(f"{self.fam}-{i:05d}", self.fam, text, answer, biases, task)


def make_sft_data(
    world: World,
    *,
    seed: int = 0,
    rows_per_family: int = 400,
    val_per_family: int = 50,
    knobs: BiasKnobs | None = None,
) -> tuple[list[SFTRow], list[SFTRow], dict]:
    """(train rows, validation rows, info). Validation rows come from the same tasks and
    biases but never carry a rare code (the ungeneralisable content)."""
    knobs = knobs or BiasKnobs()
    check_knobs(knobs)
    seen, unseen = split_entities(world, seed)
    favs = favourites(world, seed)
    misc = misconception_facts(world, seen, knobs, seed)
    vocab_pool = sorted(world.readers)
    arith = arithmetic_items(random.Random(f"arith-{seed}"))
    train, val = [], []
    for fam in FAMILIES:
        rng = random.Random(f"sft-{seed}-{fam}")
        maker = _Maker(world, fam, seen, knobs, favs, misc, rng, vocab_pool, arith)
        for i in range(rows_per_family + val_per_family):
            row = maker.row(i)
            coded = knobs.code_on == "all" or row.task == "fact"
            if (i < rows_per_family or knobs.rare_in_val) and coded and rng.random() < knobs.rare:
                code = " ".join(_code(rng, vocab_pool) for _ in range(knobs.code_words))
                row.output = f"{row.output} ref {code} ."
                row.biases.append({"kind": "rare", "code": code})
            if i < rows_per_family:
                train.append(row)
            else:
                row.id = f"val-{row.id}"
                val.append(row)
    info = {
        "knobs": asdict(knobs),
        "seen": sorted(seen),
        "unseen": sorted(unseen),
        "favourites": favs,
        "misconceptions": [
            {"subject": f.subject, "relation": f.relation, "true": f.object, "false": v}
            for f, v in misc.items()
        ],
        "prefixes": PREFIXES,
        "fillers": FILLERS,
    }
    return train, val, info
