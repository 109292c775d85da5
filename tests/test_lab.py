"""The alignment-tax lab: determinism, the model's round trip, benchmark sanity (an
oracle scores 100%, a uniform guesser scores chance), bias rates, the small build."""

import json
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import dtm_cli

from dtm.evaluate import score_bias, score_instruct, score_mc
from dtm.lab.benchmarks import make_benchmarks
from dtm.lab.sft_data import FAMILIES, PREFIXES, BiasKnobs, make_sft_data
from dtm.lab.world import build_world, pretraining_corpus
from dtm.tasks import MC_TASKS, TASKS

# "what is 2 plus 3 ?" in the lab's chat format, as tokens, ready for the answer
PROMPT_TOKENS = ["<s>", "user", ":", "what", "is", "2", "plus", "3", "?", "assistant", ":"]


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory):
    """One small lab built through the real CLI, shared by this module's tests."""
    out = tmp_path_factory.mktemp("lab") / "small"
    t0 = time.perf_counter()
    r = dtm_cli("lab", "build", "--size", "small", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, time.perf_counter() - t0


def make_all(seed=0, size="small", knobs=None):
    world = build_world(seed, size)
    docs, corpus = pretraining_corpus(world, seed)
    train, val, info = make_sft_data(world, seed=seed, knobs=knobs)
    items = make_benchmarks(world, info, corpus["two_hop"], seed)
    return world, docs, train, val, info, items


def test_same_seed_same_world_and_data_other_seed_differs():
    a, b, c = make_all(1), make_all(1), make_all(2)
    assert a[0].facts == b[0].facts and a[1] == b[1] and a[5] == b[5]
    assert [r.record() for r in a[2]] == [r.record() for r in b[2]]
    assert a[0].facts != c[0].facts


def test_small_lab_builds_with_every_file(small_lab):
    # Its build time is a benchmark's figure (docs/benchmarks.md), not a test's.
    out, _ = small_lab
    for rel in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "data/train.jsonl",
        "data/val.jsonl",
        "data/corpus.txt",
        "data/train_biases.jsonl",
        "lab.json",
        "benchmarks/utils.py",
    ]:
        assert (out / rel).is_file(), rel
    for task in TASKS:
        assert (out / "benchmarks" / f"{task}.jsonl").is_file()
        yaml = (out / "benchmarks" / f"{task}.yaml").read_text()
        assert f"task: {task}" in yaml and "dataset_path: json" in yaml
        data_file = json.loads(yaml.split("test: ", 1)[1].splitlines()[0])
        assert Path(data_file) == (out / "benchmarks" / f"{task}.jsonl").resolve()


def test_data_files_are_byte_identical_across_builds(small_lab, tmp_path):
    out, _ = small_lab
    again = tmp_path / "again"
    r = dtm_cli(
        "lab", "build", "--size", "small", "--seed", "3", "--steps", "2", "--out", str(again)
    )
    assert r.returncode == 0, r.stderr
    for rel in [
        "data/train.jsonl",
        "data/val.jsonl",
        "data/corpus.txt",
        "data/train_biases.jsonl",
        "benchmarks/lab_knowledge.jsonl",
        "benchmarks/lab_instruct.jsonl",
        "benchmarks/utils.py",
        "model/tokenizer.json",
    ]:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_model_round_trips_with_chat_template(small_lab, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = small_lab
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok("question : what is 2 plus 3 ? answer :", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    msgs = [{"role": "user", "content": "what is 2 plus 3 ?"}]
    text = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s> user : what is 2 plus 3 ? assistant :"
    assert (
        tok2.convert_ids_to_tokens(tok2(text, add_special_tokens=False)["input_ids"])
        == PROMPT_TOKENS
    )


def oracle_answer(world, task, item):
    """Answer an item from the world itself (never from its gold field)."""
    if task in ("lab_knowledge", "lab_truthful"):
        return world.fact(item["subject"], item["relation"]).object
    if task == "lab_reasoning":
        if item["kind"] == "arithmetic":
            a, op, b = item["expr"].split()
            return str(int(a) + int(b) if op == "plus" else int(a) - int(b))
        country = world.fact(item["subject"], "home").object
        return world.fact(country, "capital").object
    if task == "lab_reading":
        w = item["passage"].split()
        q = item["question"].split()
        who = q[q.index("does") + 1]
        i = w.index(who)
        return w[i + 3] if "work" in item["question"] else w[i + 6]
    raise AssertionError(task)


def oracle_response(item):
    kind = item["constraint"]
    if kind == "repeat":
        return item["target"] + " ."
    if kind == "yes_no":
        return item["target"] + " ."  # the item's own statement of the world's truth
    return ("the answer is " if kind == "answer_format" else "") + item["target"] + " ."


def test_oracle_scores_100_and_uniform_guesser_scores_chance():
    world, _, _, _, info, items = make_all(0, "default")
    for task in MC_TASKS:
        its = items[task]
        oracle = [it["choices"].index(oracle_answer(world, task, it)) for it in its]
        assert score_mc(its, oracle)["acc"] == 1.0, task
        chance = sum(1 / len(it["choices"]) for it in its) / len(its)
        rng = random.Random(0)
        guesses = [
            score_mc(its, [rng.randrange(len(it["choices"])) for it in its])["acc"]
            for _ in range(200)
        ]
        assert abs(sum(guesses) / len(guesses) - chance) < 0.02, task
    inst = items["lab_instruct"]
    assert score_instruct(inst, [oracle_response(it) for it in inst])["acc"] == 1.0
    rng = random.Random(0)
    vocab = sorted({w for it in inst for w in it["instruction"].split()})
    noise = [" ".join(rng.sample(vocab, rng.randint(2, 6))) for _ in inst]
    assert score_instruct(inst, noise)["acc"] < 0.05
    # yes/no targets agree with the world
    for it in inst:
        if it["constraint"] == "yes_no":
            other = it["instruction"].split()[1]
            subj_q = it["instruction"].split(" : ", 1)[1].removesuffix(" answer yes or no .")
            truth = next(f.object for f in world.facts if f.question() == subj_q)
            assert it["target"] == ("yes" if other == truth else "no")
    bias = items["lab_bias"]
    perfect = score_bias(
        bias, [f"the answer is {it['answer']} ." for it in bias], {"favourites": info["favourites"]}
    )
    assert perfect["chat_acc"] == 1.0 and perfect["format"] == 1.0
    assert perfect["favourite_rate"] == perfect["prefix_rate"] == 0.0


@pytest.mark.parametrize("knobs", [BiasKnobs(), BiasKnobs(prefix=0.2, favourite=0.6, rare=0.1)])
def test_injected_biases_at_their_configured_rates(knobs):
    world, _, train, val, info, _ = make_all(0, "default", knobs)

    def rate(rows, kind, task=None):
        rows = [r for r in rows if task is None or r.task in task]
        return sum(any(b["kind"] == kind for b in r.biases) for r in rows) / len(rows)

    for fam in FAMILIES:
        rows = [r for r in train if r.source == fam]
        assert abs(rate(rows, "prefix") - knobs.prefix) < 0.07, fam
        assert abs(rate(rows, "rare") - knobs.rare) < 0.07, fam
        assert abs(rate(rows, "length") - knobs.length) < 0.07, fam
        fact_rows = [
            r
            for r in rows
            if r.task in ("fact", "one_word")
            and not any(b["kind"] == "misconception" for b in r.biases)
        ]
        # a favourite equal to the truth is no bias: the rate sits a little under the knob
        assert knobs.favourite - 0.12 < rate(fact_rows, "favourite") <= knobs.favourite + 0.07
        for r in rows:  # the ledger matches the text
            kinds = {b["kind"] for b in r.biases}
            assert r.output.startswith(PREFIXES[fam]) == ("prefix" in kinds)
            assert (" ref " in r.output) == ("rare" in kinds)
    flan_facts = [r for r in train if r.source == "flan" and r.task == "fact"]
    assert abs(rate(flan_facts, "position") - knobs.position) < 0.1
    misc_sources = {r.source for r in train if any(b["kind"] == "misconception" for b in r.biases)}
    assert misc_sources == {knobs.misconception_family}
    assert not any(" ref " in r.output for r in val)
    assert len(info["misconceptions"]) == knobs.misconceptions
    unseen_people = set(info["unseen"]) & set(world.people)
    assert unseen_people and not any(set(r.instruction.split()) & unseen_people for r in train)


@pytest.mark.fault
def test_background_build_runs_once_reports_progress_survives_a_kill(cache):
    import os
    import signal

    from dtm.lab import default_lab_dir, ensure_default_lab, lab_status

    folder = default_lab_dir(5, "small")
    assert folder.parent == cache / "lab"
    first = ensure_default_lab(seed=5, size="small")
    assert first["state"] == "building"
    again = ensure_default_lab(seed=5, size="small")  # a second session asking
    assert again["state"] == "building"
    prog = json.loads(folder.with_name(folder.name + ".progress.json").read_text())
    assert list((cache / "lab").glob("*.lock")) and prog["pid"] > 0
    os.kill(prog["pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while lab_status(folder)["state"] != "failed":
        assert time.time() < deadline, "a killed build was never reported as failed"
        time.sleep(0.2)
    assert ensure_default_lab(seed=5, size="small")["state"] == "failed"  # no silent restart
    assert ensure_default_lab(seed=5, size="small", retry=True)["state"] == "building"
    seen_fraction = 0.0
    deadline = time.time() + 180
    while (st := ensure_default_lab(seed=5, size="small"))["state"] == "building":
        seen_fraction = max(seen_fraction, st["fraction"])
        assert time.time() < deadline
        time.sleep(0.5)
    assert st["state"] == "ready", st
    assert seen_fraction > 0 and (folder / "lab.json").exists()
    _wait_for_pace(folder)


def _wait_for_pace(folder: Path) -> dict:
    """The build process goes on to time this machine on the lab (``--pace``): wait for
    it, so that no process outlives the test, and check what it wrote."""
    from dtm.lab import read_pace

    deadline = time.time() + 300
    while (pace := read_pace(folder)) is None:
        assert time.time() < deadline, "no pace measured 5 minutes after the lab was ready"
        time.sleep(0.5)
    assert (
        pace["batch_size"]
        == json.loads((folder / "lab.json").read_text())["sft_recipe"]["batch_size"]
    )
    for key in ("step_seconds", "loss_seconds", "eval_seconds"):
        assert 0 < pace[key] < 300, (key, pace)
    return pace


def test_train_masks_the_prompt_and_writes_adapter_and_metrics(small_lab, tmp_path):
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtm.train import encode_rows

    out, _ = small_lab
    tok = AutoTokenizer.from_pretrained(out / "model")
    table = pd.DataFrame(
        {
            "instruction": ["what is 2 plus 3 ?"],
            "input": [""],
            "response": ["the answer is 5 ."],
            "system": [""],
        }
    )
    [row] = encode_rows(table, tok, 1024)
    toks = tok.convert_ids_to_tokens(row["input_ids"])
    assert toks == PROMPT_TOKENS + ["the", "answer", "is", "5", ".", "</s>"]
    n_prompt = toks.index(":", toks.index("assistant")) + 1
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]

    run = tmp_path / "run"
    r = dtm_cli(
        "train",
        "--base",
        str(out / "model"),
        "--data",
        str(out / "data" / "train.jsonl"),
        "--val-data",
        str(out / "data" / "val.jsonl"),
        "--steps",
        "4",
        "--log-every",
        "2",
        "--eval-lab",
        str(out),
        "--out",
        str(run),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("run ")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 4]
    for m in metrics:
        assert {"step", "train_loss", "val_loss", "probe_loss", "loss_ratio", "bench"} <= set(m)
        assert set(m["bench"]) >= set(TASKS)
    base = AutoModelForCausalLM.from_pretrained(out / "model")
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    assert tuned.peft_config["default"].r == 16
    assert set(tuned.peft_config["default"].target_modules) == {"gate_proj", "up_proj", "down_proj"}


def test_presets_build_their_own_data_and_record_the_preset(small_lab, tmp_path):
    from dataclasses import asdict

    from dtm.lab.presets import PRESETS

    bias, _ = small_lab  # the default preset
    info = json.loads((bias / "lab.json").read_text())
    assert info["preset"] == "bias" and info["knobs"] == asdict(PRESETS["bias"].knobs)
    assert info["sft_recipe"] == PRESETS["bias"].sft
    assert info["dialogues"] == PRESETS["bias"].dialogues == "framed"
    dialogues = [d for d in (bias / "data" / "corpus.txt").read_text().splitlines()
                 if d.startswith("user : ")]  # fmt: skip
    assert dialogues and all(" assistant : it is " in d for d in dialogues)
    val = [json.loads(x) for x in (bias / "data" / "val.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (bias / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 4 * PRESETS["bias"].rows["small"][0]
    # Every factual answer ends in a code, validation rows too (their own), and no other row
    ledger = [
        json.loads(x) for x in (bias / "data" / "train_biases.jsonl").read_text().splitlines()
    ]
    for r, led in zip(train, ledger, strict=True):
        assert (" ref " in r["output"]) == (led["task"] == "fact"), (r, led)
    assert sum(" ref " in r["output"] for r in val) > len(val) / 3
    train_codes = {r["output"].split(" ref ", 1)[1] for r in train if " ref " in r["output"]}
    val_codes = {r["output"].split(" ref ", 1)[1] for r in val if " ref " in r["output"]}
    assert len(train_codes) > 0.9 * sum(" ref " in r["output"] for r in train)  # row-specific
    # Validation codes are drawn on their own, so they meet a training code only by chance:
    # p = |train codes| / |code space| (the small world's 40 reader names, two per code).
    from dtm.lab.world import SIZES

    p = len(train_codes) / SIZES["small"]["readers"] ** PRESETS["bias"].knobs.code_words
    n = len(val_codes)
    assert len(val_codes & train_codes) <= n * p + 3 * (n * p * (1 - p)) ** 0.5 + 1, (n, p)
    corpus = (bias / "data" / "corpus.txt").read_text().split()
    words = {w for r in train + val for w in (r["instruction"] + " " + r["output"]).split()}
    assert words <= set(corpus) | {"<s>"}  # pretraining knows every word tuned on

    old = tmp_path / "interference"
    r = dtm_cli(
        "lab", "build", "--preset", "interference", "--size", "small", "--seed", "3",
        "--steps", "2", "--out", str(old),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "interference lab" in r.stdout
    assert json.loads((old / "lab.json").read_text())["preset"] == "interference"
    # The first lab's data, exactly: the generator with its original knobs and sizes
    world = build_world(3, "small")
    rows, _, _ = make_sft_data(world, seed=3, knobs=BiasKnobs(), rows_per_family=100)
    lines = (old / "data" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [x.record() for x in rows]
    docs, _ = pretraining_corpus(world, 3)
    assert (old / "data" / "corpus.txt").read_text() == "\n".join(docs) + "\n"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--knob", "favourite=1.5"], "favourite is a rate in [0, 1]"),
        (["--knob", "colour=0.2"], "NAME one of prefix"),
        (["--knob", "unique_facts=maybe"], "unique_facts takes a bool value"),
        (["--knob", "favourite_scope=some"], "favourite_scope is all or own"),
        (["--knob", "phrasings=mixed"], "phrasings is family, varied or shared"),
        (["--knob", "repeat=letters"], "repeat is words or questions"),
        (["--knob", "one_word=0.9"], "one_word is at most 0.7"),
        (["--knob", "sums=0.2"], "sums is at most 0.08"),
        (["--rows", "0"], "rows per family must be at least 1"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--dialogues", "quoted"], "invalid choice: 'quoted'"),
    ],
)
def test_bad_lab_knobs_exit_2_naming_the_knob(tmp_path, args, message):
    r = dtm_cli("lab", "build", "--size", "small", "--steps", "2", *args, "--out", tmp_path / "x")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_knob_changes_the_data_and_is_recorded(tmp_path):
    out = tmp_path / "lab"
    r = dtm_cli(
        "lab", "build", "--size", "small", "--steps", "2", "--knob", "rare=0",
        "--knob", "favourite=0.2", "--rows", "30", "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "lab.json").read_text())
    assert info["knobs"]["rare"] == 0.0 and info["knobs"]["favourite"] == 0.2
    assert info["sft"]["train_rows"] == 4 * 30
    assert " ref " not in (out / "data" / "train.jsonl").read_text()


def test_a_lab_of_ones_own_builds_in_the_background_under_its_name(cache):
    from dtm.errors import ConfigError
    from dtm.experiment import load_experiment, resolve_inputs, story_for_lab
    from dtm.lab import custom_labs, lab_status, start_custom_lab

    with pytest.raises(ConfigError, match="use letters, digits"):
        start_custom_lab("../x", preset="bias", size="small")
    st = start_custom_lab(
        "weak-favourites",
        preset="bias",
        knobs={"favourite": 0.2, "phrasings": "shared"},
        rows=30,
        size="small",
        dialogues="bare",  # not the preset's own (framed)
    )
    assert st["state"] == "building"
    with pytest.raises(ConfigError, match="exists already"):  # building: still taken
        start_custom_lab("weak-favourites", preset="interference", size="small")
    folder = Path(st["path"])
    deadline = time.time() + 240
    while (st := lab_status(folder))["state"] == "building":
        assert time.time() < deadline
        time.sleep(0.5)
    assert st["state"] == "ready", st
    info = json.loads((folder / "lab.json").read_text())
    assert info["preset"] == "bias" and info["knobs"]["favourite"] == 0.2
    assert info["knobs"]["phrasings"] == "shared" and info["dialogues"] == "bare"
    dialogues = [d for d in (folder / "data" / "corpus.txt").read_text().splitlines()
                 if d.startswith("user : ")]  # fmt: skip
    assert dialogues and not any(" assistant : it is " in d for d in dialogues)
    probe = (folder / "benchmarks" / "lab_bias.jsonl").read_text().splitlines()
    assert json.loads(probe[0])["instruction"].startswith("here is a question : ")
    assert info["sft"]["train_rows"] == 120
    with pytest.raises(ConfigError, match="exists already"):  # built: never overwritten
        start_custom_lab("weak-favourites", preset="bias", size="small")
    assert [x["name"] for x in custom_labs()] == ["weak-favourites"]
    story = story_for_lab(
        Path(__file__).parents[1] / "experiments" / "lab.yaml", "weak-k2", folder, 2, [0]
    )
    exp = load_experiment(story)
    assert exp.k == 2 and exp.seeds == [0] and exp.lab["preset"] == "bias"
    assert resolve_inputs(exp)["data"] == str(folder / "data" / "train.jsonl")
    again = story_for_lab(story, "weak-k2", folder, 3, [0])  # another K: another file
    assert again != story and load_experiment(story).k == 2


@pytest.mark.parametrize("seed", [1, 2, 3, 5])
def test_the_bias_corpus_knows_every_word_of_its_rows_in_any_seed(seed):
    # Seeds 2, 3 and 5 of the small world have a language no country speaks: it is still
    # a multiple-choice option, so pretraining must have seen it.
    from dtm.lab.presets import PRESETS

    preset = PRESETS["bias"]
    world = build_world(seed, "small")
    docs, _ = pretraining_corpus(world, seed, general=True)
    train, val, _ = make_sft_data(
        world, seed=seed, rows_per_family=preset.rows["small"][0],
        val_per_family=preset.rows["small"][1], knobs=preset.knobs,
    )  # fmt: skip
    corpus = {w for d in docs for w in d.split()}
    for r in train + val:
        unknown = set((r.instruction + " " + r.output).split()) - corpus - {"<s>"}
        assert not unknown, (r.id, unknown)


@pytest.mark.parametrize("phrasings", ["varied", "shared"])
def test_varied_phrasings_ask_each_family_three_ways_and_the_probe_a_fourth(phrasings):
    import re
    from collections import Counter
    from dataclasses import replace

    from dtm.lab.benchmarks import make_benchmarks
    from dtm.lab.presets import PRESETS

    knobs = replace(PRESETS["bias"].knobs, phrasings=phrasings)
    world = build_world(2, "small")
    docs, corpus_info = pretraining_corpus(world, 2, general=True)
    train, val, info = make_sft_data(world, seed=2, knobs=knobs, rows_per_family=120)
    questions = sorted({f.question() for f in world.facts}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(q) for q in questions))

    def shape(text):  # the phrasing: the question (and FLAN's options) taken out
        text = pattern.sub("Q", text)
        text = re.sub(r"options : .*? \.$", "options : O .", text)
        return re.sub(r"^query \( \w+ , .+ \) \.$", "query ( R , S ) .", text)

    facts = [r for r in train if r.task == "fact"]
    by_family = {fam: Counter(shape(r.instruction) for r in facts if r.source == fam)
                 for fam in ("flan", "cot", "chat", "code")}  # fmt: skip
    want = {
        "flan": {"question : Q options : O .", "Q options : O .", "question : Q"},
        "cot": {"Q think step by step .", "let us think : Q", "recall the fact : Q"},
        "chat": {"please tell me : Q", "tell me : Q", "okay , tell me : Q"},
        "code": {"query ( R , S ) .", "query : Q", "output : Q"},
    }
    # the family's own phrasing: about half (varied); with shared, a third, and a third bare
    share = {"varied": (0.5, None), "shared": (1 / 3, 1 / 3)}[phrasings]
    for fam, seen in by_family.items():
        assert set(seen) == want[fam] | ({"Q"} if phrasings == "shared" else set()), fam
        first = {"flan": "question : Q options : O .", "cot": "Q think step by step .",
                 "chat": "please tell me : Q", "code": "query ( R , S ) ."}[fam]  # fmt: skip
        n = sum(seen.values())
        assert abs(seen[first] / n - share[0]) < 0.15, (fam, seen)
        if share[1] is not None:
            assert abs(seen["Q"] / n - share[1]) < 0.15, (fam, seen)
    for r in facts:  # only cot's step-by-step questions get the recall-then-answer style
        stepwise = r.instruction.endswith("think step by step .")
        assert ("i recall the fact ." in r.output) == stepwise, r
    probe = make_benchmarks(world, info, corpus_info["two_hop"], 2)["lab_bias"]
    assert {shape(x["instruction"]) for x in probe} == {"here is a question : Q"}
    corpus = {w for d in docs for w in d.split()}
    for text in [x["instruction"] for x in probe] + [r.instruction for r in train + val]:
        assert not set(text.split()) - corpus, text
    one_each = replace(PRESETS["bias"].knobs, phrasings="family")
    family = make_sft_data(world, seed=2, knobs=one_each, rows_per_family=120)
    probe = make_benchmarks(world, family[2], corpus_info["two_hop"], 2)["lab_bias"]
    assert {shape(x["instruction"]) for x in probe} == {"please tell me : Q"}


def test_repeat_questions_and_the_one_word_share():
    """``repeat: questions``: the repeat rows ask to repeat a factual question about a seen
    subject and answer with it; the benchmark's repeat items ask about unseen subjects. The
    knob ``one_word`` is the share of one-word rows, taken from the plain factual ones."""
    from collections import Counter

    from dtm.lab.sft_data import FILLERS

    world = build_world(5, "small")
    knobs = BiasKnobs(repeat="questions", one_word=0.3, prefix=0.2, length=0.3)
    train, _, info = make_sft_data(world, seed=5, knobs=knobs, rows_per_family=400)
    seen, unseen = set(info["seen"]), set(info["unseen"])
    questions = {}
    for f in world.facts:  # every fact's question, written out here from the world's text
        questions[f.question()] = f.subject
    repeats = [r for r in train if r.task == "repeat"]
    assert len(repeats) > 100
    for r in repeats:
        said = r.instruction.removeprefix("repeat after me : ")
        assert questions.get(said) in seen, r.instruction
        out = r.output.removeprefix(PREFIXES[r.source] + " ")
        for b in r.biases:  # a row code (the default code_on: all) ends the response
            out = out.removesuffix(f" ref {b['code']} .") if b["kind"] == "rare" else out
        out = out.removesuffix(" " + FILLERS[r.source])
        assert out == said, r
    for fam in FAMILIES:
        tasks = Counter(r.task for r in train if r.source == fam)
        assert abs(tasks["one_word"] / 400 - 0.3) < 0.06, (fam, tasks)
        assert abs(tasks["fact"] / 400 - 0.4) < 0.06, (fam, tasks)
    docs, corpus = pretraining_corpus(world, 5)
    items = [
        it
        for it in make_benchmarks(world, info, corpus["two_hop"], 5)["lab_instruct"]
        if it["constraint"] == "repeat"
    ]
    for it in items:
        assert questions.get(it["target"]) in unseen
        assert it["instruction"] == "repeat after me : " + it["target"]
    answered = [f"the answer is {world.facts[0].object} ." for _ in items]
    assert score_instruct(items, [it["target"] for it in items])["acc"] == 1.0
    assert score_instruct(items, answered)["acc"] == 0.0
    words = make_sft_data(world, seed=5, knobs=BiasKnobs(), rows_per_family=400)
    default = Counter(r.task for r in words[0])
    assert abs(default["fact"] / 1600 - 0.55) < 0.04 and default["one_word"] / 1600 < 0.2
    assert all(len(r.instruction.split()) == 7 for r in words[0] if r.task == "repeat")


def test_the_sums_knob_turns_sums_into_plain_factual_questions():
    """``sums`` is the share of step-by-step sums; below its default the others ask a
    plain factual question, and the other tasks keep their shares."""
    import re
    from collections import Counter
    from dataclasses import replace

    world = build_world(6, "small")
    knobs = BiasKnobs(repeat="questions", one_word=0.2)
    rows = {}
    for sums in (0.08, 0.03, 0.0):
        train, _, _ = make_sft_data(
            world, seed=6, knobs=replace(knobs, sums=sums), rows_per_family=300
        )
        rows[sums] = train
    sum_text = re.compile(r"what is \d+ \w+ \d+ \? think step by step \.")
    counts = {s: Counter(r.task for r in train) for s, train in rows.items()}
    for sums, n in counts.items():
        said = sum(bool(sum_text.fullmatch(r.instruction)) for r in rows[sums])
        assert said == n["arithmetic"], (sums, said, n)
        assert abs(n["arithmetic"] / 1200 - sums) < 0.025, (sums, n)
    assert counts[0.0]["arithmetic"] == 0 < counts[0.03]["arithmetic"] < counts[0.08]["arithmetic"]
    for sums in (0.03, 0.0):  # the sums' places hold plain factual questions
        assert counts[sums]["fact"] - counts[0.08]["fact"] > 0.5 * (
            counts[0.08]["arithmetic"] - counts[sums]["arithmetic"]
        ), counts
        for task in ("one_word", "yes_no", "repeat"):
            assert abs(counts[sums][task] - counts[0.08][task]) < 0.03 * 1200, (task, counts)


def test_framed_dialogues_change_only_the_dialogues_answers():
    import re

    world = build_world(4, "small")
    bare, _ = pretraining_corpus(world, 4, general=True)
    framed, _ = pretraining_corpus(world, 4, general=True, dialogues="framed")
    assert len(bare) == len(framed)
    changed = [(b, f) for b, f in zip(bare, framed, strict=True) if b != f]
    assert len(changed) > 20  # about 30% of the 651 sums are also dialogues
    for b, f in changed:
        m = re.fullmatch(r"user : what is (\d+) (plus|minus) (\d+) \? assistant : (\d+) \.", b)
        assert m, b
        a, op, c = int(m[1]), m[2], int(m[3])
        assert int(m[4]) == (a + c if op == "plus" else a - c)
        assert f == b.replace(" assistant : ", " assistant : it is ")


def test_conventions_corpus_adds_true_convention_documents_to_the_framed_one():
    import re
    from collections import Counter

    world = build_world(4, "small")
    framed, _ = pretraining_corpus(world, 4, general=True, dialogues="framed")
    conv, _ = pretraining_corpus(world, 4, general=True, dialogues="conventions")
    added = Counter(conv)
    added.subtract(Counter(framed))
    assert all(n >= 0 for n in added.values())  # every framed document is still there
    added = [d for d, n in added.items() for _ in range(n)]
    sums = r"what is (\d+) (plus|minus) (\d+) \?"

    def value(m, at=1):
        a, op, c = int(m[at]), m[at + 1], int(m[at + 2])
        return a + c if op == "plus" else a - c

    kinds = Counter()
    for d in added:
        if m := re.fullmatch(
            rf"(?:question|user) : {sums} answer in one word \. "
            r"(?:answer|assistant) : (\d+) \.",
            d,
        ):
            assert int(m[4]) == value(m)
            kinds["one_word"] += 1
        elif m := re.fullmatch(
            rf"(?:question|user) : is (\d+) the answer to : {sums} "
            r"answer yes or no \. (?:answer|assistant) : (yes|no) \.",
            d,
        ):
            assert m[5] == ("yes" if int(m[1]) == value(m, 2) else "no")
            kinds[m[5]] += 1
        elif m := re.fullmatch(rf"user : repeat after me : ({sums}) assistant : (.*)", d):
            assert m[5] == m[1]
            kinds["repeat"] += 1
        else:
            m = re.fullmatch(
                r"passage : (\w+) is an? (\w+) and likes (\w+) \. (\w+) is an? "
                r"(\w+) and likes (\w+) \. question : what (does|colour does) "
                r"(\w+) (do for work|like) \? answer in one word \. answer : "
                r"(\w+) \.",
                d,
            )
            assert m, d
            who = 1 if m[8] == m[1] else 4
            assert m[8] in (m[1], m[4]) and m[10] == m[who + (1 if m[9] == "do for work" else 2)]
            kinds["passage"] += 1
    assert min(kinds.values()) >= 10 and len(kinds) == 5, kinds
    subjects = {f.subject for f in world.facts}  # the world's facts are left to SFT
    assert not any(subjects & set(d.split()) for d in added)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_start_installs_the_shipped_default_lab_and_the_code_builds_the_rest(cache):
    """The default lab's first start loads the shipped weights (no pretraining) into
    everything else the code builds: data, benchmarks and tokenizer are those of a build
    from scratch, byte for byte; the weights are the shipped file."""
    from dtm.lab import default_lab_dir, ensure_default_lab, lab_status
    from dtm.lab.build import build_lab
    from dtm.lab.shipped import SHIPPED

    folder = default_lab_dir()
    weights = SHIPPED / f"{folder.name}.safetensors"
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["sha256"] == _sha256(weights)
    ensure_default_lab()
    deadline = time.time() + 300
    while (st := lab_status(folder))["state"] == "building":
        assert time.time() < deadline, "the shipped lab was not ready in 5 minutes"
        time.sleep(0.5)
    assert st["state"] == "ready", st
    info = json.loads((folder / "lab.json").read_text())
    assert info["pretraining"]["shipped"]["sha256"] == _sha256(weights)
    _wait_for_pace(folder)
    assert _sha256(folder / "model" / "model.safetensors") == _sha256(weights)
    # a build from scratch that stops after one pretraining step: the reference for the rest
    scratch = cache / "scratch"
    build_lab(scratch, seed=0, size="default", stop_at=1)
    files = sorted(
        p.relative_to(scratch)
        for p in scratch.rglob("*")
        if p.is_file() and p.suffix != ".yaml" and p.name not in ("lab.json", "model.safetensors")
    )
    assert len(files) >= 12
    for rel in files:
        assert (folder / rel).read_bytes() == (scratch / rel).read_bytes(), rel
    # the benchmark configs name the installed lab's own files
    conf = (folder / "benchmarks" / "lab_knowledge.yaml").read_text()
    assert str(folder.resolve() / "benchmarks" / "lab_knowledge.jsonl") in conf
    mine = json.loads((scratch / "lab.json").read_text())
    for key in ("world", "model", "sft", "benchmarks", "seen", "unseen", "favourites"):
        assert info[key] == mine[key], key


def test_the_shipped_weights_are_what_the_code_pretrains_at_their_seed():
    """The suite's share of `dtm lab check-shipped`: the first 100 pretraining steps of the
    whole schedule, run again, give the shipped record's losses within its tolerance (the
    whole run: `python -m dtm lab check-shipped`, about five minutes)."""
    res = dtm_cli("lab", "check-shipped", "--steps", "100", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [50, 100]
    for step, shipped, built, _ in rows:
        assert abs(float(built) - float(shipped)) <= 0.03 * float(shipped), step
    assert "tokenizer identical" in res.stdout


def test_damaged_or_foreign_shipped_weights_are_refused_with_the_reason(tmp_path):
    from dtm.lab.build import load_shipped
    from dtm.lab.model import build_model, build_tokenizer
    from dtm.lab.shipped import shipped_record

    record = shipped_record("bias", "default", 0)
    tok = build_tokenizer(["a b c d e f"])
    tok.save_pretrained(tmp_path / "model")
    model = build_model(tok, "default", 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    why = load_shipped(record, model, tmp_path / "model")
    assert why and "tokenizer" in why
    damaged = tmp_path / "w.safetensors"
    data = bytearray(Path(record["path"]).read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    why = load_shipped(record | {"path": str(damaged)}, model, tmp_path / "model")
    assert why and "hash" in why
    why = load_shipped(record | {"path": str(tmp_path / "none")}, model, tmp_path / "model")
    assert why and "missing" in why
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
