"""The lab regimes tried on the way to the ``bias`` preset, each re-run and printed.

A regime is a set of bias knobs, a row count and an SFT recipe, tried on the base model of
a built lab (its world and pretraining corpus): the instruction data and the benchmarks
are regenerated from the lab's seed with the regime's knobs, then SFT runs with every lab
benchmark scored every ``eval_every`` steps (``--seed``: the training and clustering seed,
as an experiment's seeds). Printed per regime:

- (b): the step at which SFT's format first reaches 90% of its gain, and the share of
  the final knowledge and reasoning drops that had happened by then;
- (b), by the ledger: the knowledge items the base answers right and SFT wrong, and how
  many of them a favourite or a misconception touches (``lab_story.ledger``);
- (c): the loss-reduction ratio per quarter of the steps (``dtm.analysis.ratio_windows``:
  the train probe against validation, 95% Fieller intervals; ``-`` where the validation
  loss moves less than its noise);
- with ``--subs``, (a): each named family's rows trained alone for a quarter of the steps
  (the K=4 epochs budget), its format and instruct as shares of SFT's, and each instruct
  kind's score beside SFT's;
- with ``--clusters kmeans,random``, (a) as the story measures it: the regime's rows
  dispersed into K=4 clusters by ``python -m dtm disperse``, each cluster trained alone
  for its share of the steps (the epochs budget; with ``--sub-budget steps`` for all of
  SFT's steps), its format and instruct against SFT's;
- with ``--samples N``, each model's greedy answers to the first N format-probe items and
  the first N repeat items;
- the final scores (knowledge, reasoning, instruct, format, favourite uptake in the
  knowledge questions, chat accuracy) and the SFT seconds.

The ``interference`` regimes need a lab built with ``--preset interference`` (its corpus
has no everyday text, so the instruction data's other words are new to the model); the
``framed`` ones (J, K, M, O, P) a ``--preset bias`` lab (its dialogues are framed since lab v4);
the ``conventions`` ones (L, N) a ``--preset bias --dialogues conventions`` lab; the others a
``--preset bias --dialogues bare`` lab. Knowledge is also printed in the
statement frame (``the capital of X is``, the corpus's own sentences, with the same
options): the share of SFT's knowledge tax that is the question-answer frame's own.

    .venv/bin/python -m studies.lab_regimes --lab LAB --regimes B2,B3 [--seed 0] [--subs flan,chat]
        [--clusters kmeans,random] [--sub-budget epochs|steps]
    .venv/bin/python -m studies.lab_regimes --list
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from studies.lab_story import ledger

ROOT = Path(__file__).resolve().parents[1]

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OWN = {"favourite_scope": "own", "favourite": 0.6, "own_share": 0.5, "unique_facts": True}
CODES = {"rare": 1.0, "rare_in_val": True}
B3_CODES = {"code_on": "answers", "code_words": 2}
B3 = {**OWN, **CODES, **B3_CODES, "prefix": 0.15, "length": 0.15}  # the bias preset's knobs
D1 = {**B3, "phrasings": "varied"}
G = {**D1, "phrasings": "shared"}
# name: (corpus, rows per family, knobs over the interference knobs, recipe over the lab's)
REGIMES = {
    "v1": ("interference", 200, {**OWN, "favourite": 0.5, "rare": 1.0, "code_words": 2}, {}),
    "v2": (
        "interference",
        100,
        {**OWN, "favourite": 0.5, "rare": 1.0},
        {"lora_r": 32, "lora_alpha": 32, "lr": 2e-3, "target_modules": ATTN},
    ),
    "v4": (
        "interference",
        100,
        {**OWN, "favourite": 0.5, **CODES},
        {"lora_r": 32, "lora_alpha": 32, "target_modules": ATTN},
    ),
    "v6": (
        "interference",
        100,
        {**OWN, **CODES},
        {"steps": 900, "lora_r": 32, "lora_alpha": 32, "lr": 5e-4, "target_modules": ATTN},
    ),
    "r1": ("interference", 100, {**OWN, **CODES}, {"steps": 900}),
    "A1": ("bias", 100, {**OWN, **CODES}, {"steps": 900}),
    "A2": (
        "bias",
        100,
        {**OWN, **CODES},
        {"steps": 900, "lora_r": 32, "lora_alpha": 32, "lr": 5e-4, "target_modules": ATTN},
    ),
    "B1": ("bias", 100, {**OWN, **CODES, "prefix": 0.3, "code_on": "answers"}, {}),
    "B2": (
        "bias",
        100,
        {**OWN, **CODES, "prefix": 0.15, "length": 0.15, "code_on": "answers"},
        {},
    ),
    "B3": ("bias", 100, B3, {}),  # the bias preset
    # C: a format learnt fast (rarer openings and fillers, a higher rate), and favourites
    # on every relation, learnt from a rarer signal than the format
    "C1": (
        "bias",
        100,
        {**CODES, **B3_CODES, "prefix": 0.05, "length": 0.05, "favourite": 0.3},
        {"lr": 2e-3},
    ),
    "C2": (
        "bias",
        100,
        {**OWN, **CODES, **B3_CODES, "prefix": 0.05, "length": 0.05},
        {"lr": 2e-3},
    ),
    "C3": (
        "bias",
        100,
        {**CODES, **B3_CODES, "prefix": 0.05, "length": 0.05, "favourite": 0.15},
        {"lr": 2e-3},
    ),
    # D: the bias preset with every family asking in three phrasings of its own style and
    # the format probe in a phrasing no family uses, so the convention can be learnt from
    # any one family (goal (a))
    "D1": ("bias", 100, D1, {}),
    # E: D1 with the learning rate held after warm-up, so the format is learnt in the
    # first steps and the late steps still move the weights (the biases, the codes)
    "E1": ("bias", 100, D1, {"scheduler": "constant_with_warmup"}),
    "E2": ("bias", 100, D1, {"scheduler": "constant_with_warmup", "lr": 2e-3}),
    "E3": ("bias", 100, D1, {"lr": 2e-3}),
    "E4": ("bias", 200, D1, {"scheduler": "constant_with_warmup", "lr": 2e-3}),
    # F: D1 with more rows per family at the same steps (fewer passes over more varied
    # rows), so one family's rows carry the convention to a phrasing none of them uses
    "F1": ("bias", 200, D1, {}),
    "F2": ("bias", 400, D1, {}),
    "F3": ("bias", 200, D1, {"scheduler": "constant_with_warmup"}),
    # G: every family also asks a third of its factual questions bare (phrasings=shared)
    "G1": ("bias", 100, G, {}),
    "G2": ("bias", 400, G, {}),
    "G3": ("bias", 200, G, {}),
    # H: G with twice the steps, so a sub-model's quarter is as long as half of G's SFT
    "H1": ("bias", 200, G, {"steps": 1200}),
    "H2": ("bias", 100, G, {"steps": 1200}),
    "H3": ("bias", 400, G, {"steps": 1200}),
    # I: G and D1 with LoRA on attention too (does copying, as the repeat items ask, need it?)
    "I1": ("bias", 200, G, {"target_modules": ATTN}),
    "I2": ("bias", 400, G, {"target_modules": ATTN}),
    "I3": ("bias", 100, D1, {"target_modules": ATTN}),
    # X: B3 with one bias taken out: how much of SFT's tax each one brings
    "X1": ("bias", 100, {**B3, "favourite": 0.0}, {}),
    "X2": ("bias", 100, {**B3, "rare": 0.0}, {}),
    # J: a base model whose pretraining dialogues answer framed ("it is 7 ."), so a chat
    # answer opens the same way for every question (a lab built with --dialogues framed)
    "J1": ("framed", 100, B3, {}),
    "J2": ("framed", 100, D1, {}),
    "J3": ("framed", 100, G, {}),
    "J4": ("framed", 100, G, {"lr": 2e-3}),
    "J5": ("framed", 100, D1, {"lr": 2e-3}),
    "J6": ("framed", 100, G, {"scheduler": "constant_with_warmup"}),
    "J7": ("framed", 100, D1, {"scheduler": "constant_with_warmup"}),
    "J8": ("framed", 100, G, {"steps": 1200}),  # a sub-model then gets 300 steps
    "J9": ("framed", 100, G, {"lr": 1.5e-3}),
    # K: J3 (the v4 preset) with the repeat rows and items asking to repeat a factual
    # question, not three random names (no model copied those, and their rows formed a
    # k-means cluster of their own), and with more one-word rows
    "K1": ("framed", 100, {**G, "repeat": "questions"}, {}),
    "K2": ("framed", 100, {**G, "repeat": "questions", "one_word": 0.25}, {}),
    # L: J3 and K1 on a base model whose corpus also shows the one-word, yes/no and
    # repeat conventions on sums and passages (a lab built with --dialogues conventions),
    # so SFT only carries them to the world's facts and the chat format
    "L1": ("conventions", 100, G, {}),
    "L2": ("conventions", 100, {**G, "repeat": "questions"}, {}),
    # M: K1 with twice the rows per family and twice the steps (the same 24 epochs), so
    # each K=4 cluster has as many rows as a family (200) and as many steps as v4's
    # families alone had with J8
    "M1": ("framed", 200, {**G, "repeat": "questions"}, {"steps": 1200}),
    "M2": ("framed", 200, {**G, "repeat": "questions"}, {}),  # 12 epochs
    "M3": ("framed", 200, {**G, "repeat": "questions"}, {"steps": 900}),  # 18 epochs: v5
    # N: M3 (the v5 preset) on the conventions corpus (L's base), where the one-word
    # items that held (a) back in M3 are partly known to the base; N2 with more of them
    "N1": ("conventions", 200, {**G, "repeat": "questions"}, {"steps": 900}),
    "N2": ("conventions", 200, {**G, "repeat": "questions", "one_word": 0.25}, {"steps": 900}),
    # O: M3 with more rows per family at the same 18 passes, so each K=4 sub-model gets
    # more steps (the one-word convention came to SFT only after ~300 steps)
    "O1": ("framed", 400, {**G, "repeat": "questions"}, {"steps": 1800}),
    "O2": ("framed", 300, {**G, "repeat": "questions"}, {"steps": 1350}),
    # P: M3 (v5) with LoRA on attention too: does a k-means (topic) cluster's format reach
    # the other topics' questions when the adapter can also change what is attended to?
    "P1": ("framed", 200, {**G, "repeat": "questions"}, {"steps": 900, "target_modules": ATTN}),
    # M3 without the step-by-step sums (k-means put them alone in a cluster of seed 2,
    # where no row shows the format): plain factual questions in their place
    "P2": ("framed", 200, {**G, "repeat": "questions", "sums": 0.0}, {"steps": 900}),
    "P3": (  # both
        "framed",
        200,
        {**G, "repeat": "questions", "sums": 0.0},
        {"steps": 900, "target_modules": ATTN},
    ),
}


def base_recipe() -> dict:
    """The bias preset's SFT recipe as it was up to lab v4 (the lab's LoRA values, 600
    steps, probe 200): the regimes' recipes are written over it."""
    from dtm.lab.presets import PRESETS

    return {**PRESETS["bias"].sft, "steps": 600, "log_every": 20}


SHOWN = [
    ("lab_knowledge", "acc"),
    ("lab_knowledge", "acc_statement"),
    ("lab_reasoning", "acc"),
    ("lab_instruct", "acc"),
    ("lab_bias", "format"),
    ("lab_knowledge", "favourite_any"),
    ("lab_bias", "chat_acc"),
]


def regime_lab(lab: Path, name: str, work: Path) -> tuple[Path, dict]:
    """A lab folder holding ``lab``'s model with the regime's data and benchmarks, made
    from the lab's own seed (the world and corpus its model was pretrained on)."""
    from dtm.lab.benchmarks import make_benchmarks, write_benchmarks
    from dtm.lab.build import _jsonl
    from dtm.lab.sft_data import BiasKnobs, make_sft_data
    from dtm.lab.world import build_world, pretraining_corpus

    corpus, rows, knobs, recipe = REGIMES[name]
    info = json.loads((lab / "lab.json").read_text())
    want = ("bias", corpus) if corpus in ("framed", "conventions") else (corpus, "bare")
    have = (info.get("preset", "interference"), info.get("dialogues", "bare"))
    if have != want:
        raise SystemExit(
            f"regime {name} needs a {want[0]} lab with {want[1]} dialogues; {lab} is a "
            f"{have[0]} lab with {have[1]} dialogues."
        )
    seed = info["seed"]
    world = build_world(seed, info["size"])
    _, corpus_info = pretraining_corpus(world, seed, general=want[0] == "bias", dialogues=want[1])
    k = replace(BiasKnobs(), **knobs)
    train, val, data_info = make_sft_data(
        world, seed=seed, knobs=k, rows_per_family=rows, val_per_family=50
    )
    out = work / name
    (out / "data").mkdir(parents=True)
    _jsonl(out / "data" / "train.jsonl", [r.record() for r in train])
    _jsonl(out / "data" / "val.jsonl", [r.record() for r in val])
    write_benchmarks(
        make_benchmarks(world, data_info, corpus_info["two_hop"], seed), out / "benchmarks"
    )
    (out / "model").symlink_to((lab / "model").resolve())
    meta = {
        **info,
        "knobs": k.__dict__,
        **{x: data_info[x] for x in ("favourites", "misconceptions")},
    }
    (out / "lab.json").write_text(json.dumps(meta))
    return out, {**base_recipe(), **recipe}


def sampled_hook(folder: Path, n: int, store: list):
    """The lab eval hook, which also scores knowledge in the statement frame
    (``lab_knowledge.acc_statement``) and keeps in ``store`` the greedy answers of the
    latest call to the first ``n`` format-probe items and the first ``n`` repeat items."""
    from dtm.evaluate import generate, mc_predictions, read_items, score_mc
    from dtm.jobs.runner import lab_eval_hook
    from dtm.lab.world import RELATIONS

    hook, bench = lab_eval_hook(folder), folder / "benchmarks"
    items = (
        read_items(bench, "lab_bias", n)
        + [x for x in read_items(bench, "lab_instruct") if x["constraint"] == "repeat"][:n]
    )
    # The knowledge items in the corpus's own statement frame ("the capital of X is"),
    # the same options: what SFT costs the facts outside the question-answer frame.
    statements = [
        {**x, "query": RELATIONS[x["relation"]]["statements"][0].split(" {o}")[0].format(
            s=x["subject"])}
        for x in read_items(bench, "lab_knowledge")
    ]  # fmt: skip

    def run(model, tok, step):
        if n:
            prompts = [x["prompt"] for x in items]
            answers = generate(model, tok, prompts, max_new_tokens=16)
            store[:] = [(x["instruction"], a) for x, a in zip(items, answers, strict=True)]
        res = hook(model, tok, step)
        frame = score_mc(statements, mc_predictions(model, tok, statements))
        res["lab_knowledge"]["acc_statement"] = frame["acc"]
        return res

    return run


def clusters(folder: Path, method: str, seed: int, rows: list[str], k: int = 4) -> list[list[str]]:
    """``rows`` (JSONL lines) split into ``k`` clusters by ``python -m dtm disperse`` as
    the story runs it (``--method`` kmeans or random, the instruction field)."""
    import csv
    import subprocess

    out = folder / f"disperse-{method}"
    cmd = [sys.executable, "-m", "dtm", "disperse", "--data", str(folder / "data" / "train.jsonl")]
    cmd += ["--k", str(k), "--method", method, "--field", "instruction", "--seed", str(seed)]
    subprocess.run([*cmd, "--no-map", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    with open(out / "assignments.csv") as fh:
        where = {r["id"]: int(r["cluster"]) for r in csv.DictReader(fh)}
    return [[x for x in rows if where[json.loads(x)["id"]] == c] for c in range(k)]


def run_regime(
    lab: Path,
    name: str,
    seed: int,
    work: Path,
    families=(),
    samples: int = 0,
    clusterings=(),
    budget: str = "epochs",
) -> dict:
    from dtm.analysis import ratio_windows
    from dtm.jobs.runner import run_training as train
    from dtm.train import TrainConfig

    folder, recipe = regime_lab(lab, name, work)
    said: dict[str, list] = {"sft": []}
    cfg = TrainConfig(
        base=str(folder / "model"),
        data=str(folder / "data" / "train.jsonl"),
        val_data=str(folder / "data" / "val.jsonl"),
        out=str(folder / "sft"),
        eval_every=50,
        seed=seed,
        **recipe,
    )
    t0 = time.perf_counter()
    recs = train(cfg, eval_hook=sampled_hook(folder, samples, said["sft"]))["metrics"]
    secs = time.perf_counter() - t0
    scored = [r for r in recs if r.get("bench")]
    fmt = [r["bench"]["lab_bias"]["format"] for r in scored]
    t90 = next(
        r["step"]
        for r, f in zip(scored, fmt, strict=True)
        if f - fmt[0] >= 0.9 * (fmt[-1] - fmt[0])
    )
    share = {}
    for task in ("lab_knowledge", "lab_reasoning"):
        v = {r["step"]: r["bench"][task]["acc"] for r in scored}
        drop = v[0] - v[scored[-1]["step"]]
        share[task] = (v[0] - v[t90]) / drop if drop > 0 else None
    windows = ratio_windows(recs)

    lost = ledger(folder, folder / "sft" / "adapter")
    rows = (folder / "data" / "train.jsonl").read_text().splitlines()
    subsets = {  # label: (rows, share of SFT's steps)
        f"{fam} rows alone, 1/4 of the steps": (  # the K=4 budget
            [x for x in rows if json.loads(x)["source"] == fam],
            1 / 4,
        )
        for fam in families
    }
    for method in clusterings:  # the story's sub-models: each its cluster's share of the
        # steps (the epochs budget), or all of them (the steps budget)
        for c, mine in enumerate(clusters(folder, method, seed, rows)):
            part = len(mine) / len(rows) if budget == "epochs" else 1.0
            subsets[f"{method} cluster {c} ({len(mine)} rows)"] = (mine, part)
    subs = {}
    for i, (label, (mine, part)) in enumerate(subsets.items()):
        (folder / "data" / f"sub-{i}.jsonl").write_text("\n".join(mine) + "\n")
        steps = max(1, round(recipe["steps"] * part))
        sub = TrainConfig(
            base=str(folder / "model"),
            data=str(folder / "data" / f"sub-{i}.jsonl"),
            val_data=str(folder / "data" / "val.jsonl"),
            out=str(folder / f"sub-{i}"),
            eval_every=steps,
            seed=seed,
            **{**recipe, "steps": steps},
        )
        said[label] = []
        hook = sampled_hook(folder, samples, said[label])
        last = [r for r in train(sub, eval_hook=hook)["metrics"] if r.get("bench")]
        final = scored[-1]["bench"]
        kinds = [k for k in final["lab_instruct"] if k.startswith("acc_") and k != "acc_stderr"]
        subs[label] = {
            m: last[-1]["bench"][t][k] / final[t][k] if final[t][k] else None
            for m, (t, k) in {
                "format": ("lab_bias", "format"),
                "instruct": ("lab_instruct", "acc"),
            }.items()
        }
        # each instruct kind: the sub-model's score against SFT's (absolute, not shares)
        subs[label]["kinds"] = {
            k[4:]: (last[-1]["bench"]["lab_instruct"][k], final["lab_instruct"][k]) for k in kinds
        }
    return {
        "subs": subs,
        "samples": {who: v for who, v in said.items() if v},
        "regime": name,
        "seconds": round(secs, 1),
        "format_90_step": t90,
        "ledger": lost,
        "drop_share_by_then": share,
        "ratio_windows": windows.to_dict("records"),
        "start": {f"{t}.{m}": scored[0]["bench"][t].get(m) for t, m in SHOWN},
        "final": {f"{t}.{m}": scored[-1]["bench"][t].get(m) for t, m in SHOWN},
        "at_90": {
            f"{t}.{m}": next(r for r in scored if r["step"] == t90)["bench"][t].get(m)
            for t, m in SHOWN
        },
    }


def show(res: dict) -> None:
    def f(x):
        return "-" if x is None or x != x else f"{x:.2f}"

    def window(r) -> str:
        span = f"{int(r['start'])}–{int(r['end'])}: "
        if r["val_moving"]:
            return span + f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
        if r["abs_low"] is not None and r["abs_low"] == r["abs_low"]:
            return span + f"|ratio| ≥ {r['abs_low']:.1f} (validation flat)"
        return span + "-"

    w = " · ".join(window(r) for r in res["ratio_windows"])
    share = res["drop_share_by_then"]
    print(
        f"{res['regime']}: SFT {res['seconds']} s; format at 90% of its gain by step "
        f"{res['format_90_step']}, knowledge drop by then {f(share['lab_knowledge'])}, "
        f"reasoning {f(share['lab_reasoning'])}"
    )
    print(f"  ratio by window: {w}")
    led = res["ledger"]
    print(
        f"  ledger: SFT lost {led['lost']} of {led['items']} knowledge items, "
        f"{led['lost_touched']} of them ({led['lost_touched'] / max(led['lost'], 1):.0%}) "
        f"touched by a favourite or a misconception (which touch "
        f"{led['touched_share_of_all']:.0%} of all items); {led['lost_to_a_favourite']} "
        "answered with a favourite"
    )
    for label, v in res.get("subs", {}).items():
        print(
            f"  (a) {label}: {f(v['format'])} of SFT's format, "
            f"{f(v['instruct'])} of its instruct ("
            + ", ".join(f"{k} {f(a)} vs {f(b)}" for k, (a, b) in v.get("kinds", {}).items())
            + ")"
        )
    print(
        f"  base → step {res['format_90_step']} → SFT: "
        + ", ".join(
            f"{k} {f(res['start'][k])} → {f(res['at_90'][k])} → {f(v)}"
            for k, v in res["final"].items()
        )
    )
    for who, pairs in res.get("samples", {}).items():
        print(f"  greedy answers of {'SFT' if who == 'sft' else who}:")
        for q, a in pairs:
            print(f"    {q} -> {a}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", type=Path)
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the training (and clustering) seed; the data come from the lab's own seed",
    )
    ap.add_argument("--list", action="store_true")
    ap.add_argument(
        "--subs", default="", help="families (e.g. flan,chat) each trained alone for (a)"
    )
    ap.add_argument(
        "--clusters",
        default="",
        help="clusterings (kmeans,random) whose K=4 sub-models are each trained on their "
        "cluster for its share of the steps (the story's epochs budget), for (a)",
    )
    ap.add_argument(
        "--sub-budget",
        choices=("epochs", "steps"),
        default="epochs",
        help="the --clusters sub-models' budget, as an experiment's sub_budget: epochs (each "
        "its cluster's share of SFT's steps) or steps (each SFT's steps)",
    )
    ap.add_argument(
        "--samples",
        type=int,
        default=0,
        help="print each model's greedy answers to this many format-probe and repeat items",
    )
    args = ap.parse_args()
    if args.list:
        for name, (corpus, rows, knobs, recipe) in REGIMES.items():
            print(f"{name}: {corpus} lab, {rows} rows/family, knobs {knobs}, recipe {recipe}")
        return
    work = Path(tempfile.mkdtemp(prefix="regimes-"))
    try:
        for name in args.regimes.split(","):
            fams = [f for f in args.subs.split(",") if f]
            methods = [m for m in args.clusters.split(",") if m]
            res = run_regime(
                args.lab,
                name.strip(),
                args.seed,
                work,
                fams,
                args.samples,
                methods,
                args.sub_budget,
            )
            print(json.dumps(res), file=sys.stderr)  # the raw figures, whatever show prints
            show(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
