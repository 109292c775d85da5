"""The lab's presets: one world and base model, two instruction sets and SFT recipes.

- ``bias`` (the default): the paper's premise by construction. The shared conventions
  are in every family's rows, so any single cluster teaches them; each family's false
  favourite sits on its own relation (half of its factual questions) and is a rarer
  signal; every factual answer ends in a two-word code unique to its row (in validation
  too, where it cannot be predicted), so late training lowers the train loss on rows the
  model has memorised while the validation loss stops moving. Its pretraining corpus
  also has everyday text with every word the instruction data uses, so no token is new
  to the model when SFT starts, and its chat dialogues answer with a fixed opening (``it
  is 7 .``), so SFT's answer convention replaces one opening with another and is learnt
  early, before the biases. Every family asks in three phrasings of its own and a third
  of its questions bare; the format probe asks in a phrasing none uses. Its repeat rows
  ask to repeat a factual question. Since lab v5 it has 200 rows per family and SFT runs
  900 steps (18 passes), so each of K=4 clusters has a family's worth of rows and a
  quarter of the steps (regime M3 of ``python -m studies.lab_regimes``).
- ``interference``: the first lab. Its tax comes early, with the format, from the
  interference of learning the format itself; its loss ratio stays near 1.15.

``PRESETS[name]`` holds the knobs, the rows per family by size, and the SFT recipe (the
``TrainConfig`` values) that the preset's measurements and ``experiments/`` files use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dtm.errors import ConfigError
from dtm.lab.sft_data import BiasKnobs


@dataclass(frozen=True)
class Preset:
    name: str
    about: str  # two sentences: what the preset is for
    knobs: BiasKnobs
    rows: dict[str, tuple[int, int]]  # size -> (train rows, validation rows) per family
    sft: dict = field(default_factory=dict)  # TrainConfig values of the preset's SFT
    general_text: bool = False  # pretraining also has everyday text with SFT's other words
    dialogues: str = "bare"  # how pretraining's chat dialogues answer (world.DIALOGUES)


_LAB_SFT = {
    "lr": 1e-3,
    "lora_r": 16,
    "lora_alpha": 16,
    "batch_size": 16,
    "micro_batch_size": 16,
    "max_length": 128,
}

PRESETS: dict[str, Preset] = {
    "bias": Preset(
        "bias",
        "Built for the paper's premise: the shared answer convention is learnt in the "
        "first steps, while each family's favourite and the codes unique to each row are "
        "rarer signals, learnt later, and the codes can be memorised, so the train loss "
        "pulls away from the validation loss. Use it to watch that happen, and to measure "
        "whether DTM removes the biases better than shrinking the SFT weights does.",
        BiasKnobs(
            prefix=0.15,
            length=0.15,
            favourite=0.6,
            favourite_scope="own",
            own_share=0.5,
            unique_facts=True,
            rare=1.0,
            code_on="answers",
            code_words=2,
            rare_in_val=True,
            phrasings="shared",
            repeat="questions",
        ),
        {"small": (100, 20), "default": (200, 50)},
        {**_LAB_SFT, "steps": 900, "probe_size": 200},
        general_text=True,
        dialogues="framed",
    ),
    "interference": Preset(
        "interference",
        "The first lab: its tax comes early, together with the format, from learning the "
        "format itself, and the loss ratio stays near 1. Use it to show that DTM can sit at "
        "another point of the shrinkage trade-off without removing any bias.",
        BiasKnobs(),
        {"small": (100, 20), "default": (400, 50)},
        {**_LAB_SFT, "steps": 400},
    ),
}
DEFAULT_PRESET = "bias"


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)} (got {name!r}).")
    return PRESETS[name]
