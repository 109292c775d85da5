"""``build_lab``: the whole alignment-tax lab from one seed, into one folder.

DIR/model/                    the pretrained tiny Llama and its tokenizer (HF format)
DIR/data/train.jsonl          instruction data (Alpaca shape, ``source`` = family)
DIR/data/val.jsonl            held-out split of the same tasks, without rare codes
DIR/data/train_biases.jsonl   the ledger: each train row's injected biases
DIR/data/corpus.txt           the pretraining corpus (the replay/EWC reference)
DIR/benchmarks/<task>.jsonl   items, beside <task>.yaml (lm-eval config) and utils.py
DIR/lab.json                  preset, seed, size, knobs, the preset's SFT recipe, the
                              seen/unseen split, favourites, misconceptions, pretraining log

With ``shipped`` (a record from ``dtm.lab.shipped``), the pretraining is not run: the
weights the project ships for this preset, size and seed are loaded instead, once their
hash, the tokenizer the code builds and the model's shapes all match the record; anything
else pretrains from scratch and says why in ``lab.json``.

A preset (``dtm.lab.presets``) chooses the instruction data's knobs, its size and the SFT
recipe; the world, the corpus and the pretraining are the same for every preset.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from dtm.errors import ConfigError
from dtm.lab import LAB_VERSION
from dtm.lab.benchmarks import make_benchmarks, write_benchmarks
from dtm.lab.model import build_model, build_tokenizer, pretrain
from dtm.lab.presets import DEFAULT_PRESET
from dtm.lab.presets import preset as get_preset
from dtm.lab.sft_data import BiasKnobs, make_sft_data
from dtm.lab.world import DIALOGUES, SIZES, build_world, pretraining_corpus
from dtm.store import file_digest, publish_dir

PRETRAIN_STEPS = {"small": 400, "default": 2400}


def load_shipped(record: dict, model, model_dir: Path) -> str | None:
    """Load a shipped record's weights into ``model`` (the freshly built one) when they are
    what the code builds the rest around: their file's hash, the tokenizer the code wrote
    to ``model_dir`` and every tensor's shape. None when loaded, else why not."""
    import torch  # lazy: the lab's data needs no torch
    from safetensors.torch import load_file

    weights = Path(record["path"])
    if not weights.is_file():
        return f"{weights} is missing"
    if file_digest(weights) != record["sha256"]:
        return f"{weights.name}'s hash is not its record's (a damaged or changed file)"
    if file_digest(model_dir / "tokenizer.json") != record["tokenizer_sha256"]:
        return "the tokenizer this code builds is not the one the weights were trained with"
    state = load_file(weights)
    own = model.state_dict()
    own.pop("lm_head.weight", None)  # tied to the embeddings: not in a saved file
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in state):
        return "the model this code builds has other tensors or shapes than the shipped one"
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    model.config.use_cache = False  # as the Trainer leaves it: the same config.json
    return None


def _jsonl(path: Path, rows) -> None:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def build_lab(
    out: str | Path,
    *,
    seed: int = 0,
    size: str = "default",
    preset: str = DEFAULT_PRESET,
    knobs: BiasKnobs | None = None,
    rows_per_family: int | None = None,
    steps: int | None = None,
    dialogues: str | None = None,
    force: bool = False,
    progress=lambda stage, frac: None,
    shipped: dict | None = None,
    stop_at: int | None = None,
) -> dict:
    """Build the lab into ``out`` (published by one rename when complete). An existing,
    non-empty ``out`` is an error unless ``force``. ``knobs``, ``rows_per_family`` and
    ``dialogues`` (the pretraining corpus's chat answers, ``world.DIALOGUES``) replace the
    preset's. ``shipped``: use the shipped weights (module docstring); ``stop_at``: end the
    pretraining after that many steps of its schedule (``dtm lab check-shipped``)."""
    # Length: the build reads top to bottom as its stages (world, corpus, pretraining,
    # data, benchmarks, summary); splitting it would scatter one recipe.
    if size not in SIZES:
        raise ConfigError(f"size must be one of {', '.join(SIZES)} (got {size!r}).")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"{out} already exists and is not empty: choose another --out, "
            "or add --force to replace it."
        )
    chosen = get_preset(preset)
    knobs = knobs or chosen.knobs
    rows, val_rows = chosen.rows[size]
    rows = rows if rows_per_family is None else rows_per_family
    if rows < 1:
        raise ConfigError(f"rows per family must be at least 1 (got {rows}).")
    steps = steps or PRETRAIN_STEPS[size]
    dialogues = dialogues or chosen.dialogues
    if dialogues not in DIALOGUES:
        raise ConfigError(f"dialogues must be one of {', '.join(DIALOGUES)} (got {dialogues!r}).")
    t0 = time.perf_counter()
    progress("building the world and corpus", 0.0)
    world = build_world(seed, size)
    docs, corpus_info = pretraining_corpus(
        world, seed, general=chosen.general_text, dialogues=dialogues
    )
    train, val, info = make_sft_data(
        world,
        seed=seed,
        knobs=knobs,
        rows_per_family=rows,
        val_per_family=val_rows,
    )
    items = make_benchmarks(world, info, corpus_info["two_hop"], seed)
    texts = docs + [r.instruction + " " + r.output for r in train + val]
    for rows in items.values():
        for it in rows:
            texts += [
                it.get("query", ""),
                it.get("prompt", ""),
                it.get("target", ""),
                " ".join(it.get("choices", [])),
            ]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, size, seed)
    progress("building the world and corpus", 1.0)

    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {}

    def write(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp / "model")
        why = None if shipped is None else load_shipped(shipped, model, tmp / "model")
        if shipped is not None and why is None:
            history = shipped["pretraining"]["log"]
            origin = {"shipped": {k: shipped[k] for k in ("sha256", "built")}}
        else:
            if why:
                print(f"not using the shipped weights: {why}; pretraining from scratch", flush=True)
            history = pretrain(
                model,
                tokenizer,
                docs,
                steps=steps,
                seed=seed,
                workdir=tmp / "trainer",
                progress=progress,
                stop_at=stop_at,
            )
            shutil.rmtree(tmp / "trainer", ignore_errors=True)
            origin = {"shipped_refused": why} if why else {}
        model.save_pretrained(tmp / "model")
        (tmp / "data").mkdir()
        _jsonl(tmp / "data" / "train.jsonl", [r.record() for r in train])
        _jsonl(tmp / "data" / "val.jsonl", [r.record() for r in val])
        _jsonl(
            tmp / "data" / "train_biases.jsonl",
            [{"id": r.id, "source": r.source, "task": r.task, "biases": r.biases} for r in train],
        )
        (tmp / "data" / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
        write_benchmarks(items, tmp / "benchmarks", final=out.resolve() / "benchmarks")
        summary = {
            "lab_version": LAB_VERSION,
            "preset": preset,
            "seed": seed,
            "size": size,
            "knobs": asdict(knobs),
            "dialogues": dialogues,
            "sft_recipe": chosen.sft,
            "world": {
                "countries": len(world.countries),
                "people": len(world.people),
                "facts": len(world.facts),
            },
            "model": {
                "parameters": sum(p.numel() for p in model.parameters()),
                "vocab": len(tokenizer),
                **{
                    k: getattr(model.config, k)
                    for k in ("hidden_size", "num_hidden_layers", "intermediate_size")
                },
            },
            "pretraining": {
                "steps": steps,
                "documents": len(docs),
                "log": [h for h in history if "loss" in h],
                **origin,
            },
            "sft": {"train_rows": len(train), "val_rows": len(val)},
            "benchmarks": {t: len(v) for t, v in items.items()},
            **{
                k: info[k]
                for k in ("seen", "unseen", "favourites", "misconceptions", "prefixes", "fillers")
            },
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "lab.json").write_text(json.dumps(summary, indent=2) + "\n")
        result.update(summary)

    # Only an empty folder, or one replaced with force, is there to be replaced.
    publish_dir(out, write)
    summary = result
    return summary
