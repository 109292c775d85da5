"""A user's own evaluation sets (lm-evaluation-harness task YAMLs in a folder) and
held-out losses, on model folders that are not the lab's."""

import json
import re

import pytest
import torch
from archs import ARCHS, make_model, write_tasks
from conftest import dtm_cli, write_jsonl

NAMES = ["my_mc", "my_ll", "my_roll", "my_gen"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("usertasks")
    model_dir = make_model("llama", root / "llama")
    tasks = write_tasks(root / "tasks")
    return root, model_dir, tasks


def _greedy_words(model_dir, tasks):
    """The model's greedy first word on each my_gen item, computed here with plain
    ``generate`` (the harness's stop strings and regex filter applied by hand)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(x) for x in (tasks / "data" / "gen.jsonl").read_text().splitlines()]
    words = []
    for r in rows:
        ids = tok(f"Q: {r['question']}\nA:", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        text = text.split("\n")[0].split(".")[0]
        m = re.search(r"([a-z]+)", text)
        words.append(m.group(1) if m else None)
    return rows, words


def test_quick_engine_matches_the_harness_on_every_output_type(world):
    from dtm.evaluate import evaluate
    from dtm.models import load_model

    root, model_dir, tasks = world
    # my_gen: the even items' answers are the model's own greedy word, the odd ones a word
    # it never writes, so exact match has a known value that both engines must reach
    rows, words = _greedy_words(model_dir, tasks)
    for i, r in enumerate(rows):
        r["answer"] = words[i] if i % 2 == 0 and words[i] else "zzzz"
    write_jsonl(tasks / "data" / "gen.jsonl", rows)
    expected = sum(1 for i, w in enumerate(words) if i % 2 == 0 and w) / len(rows)
    assert expected > 0

    model, tok = load_model(str(model_dir), [])
    quick = evaluate(model, tok, NAMES, engine="quick", tasks_dir=tasks)
    full = evaluate(model, tok, NAMES, engine="full", tasks_dir=tasks)
    for name in ("my_mc", "my_ll"):
        assert quick[name]["acc"] == full[name]["acc"], name
        assert quick[name]["n"] == full[name]["n"] == 12
    assert quick["my_mc"]["acc_norm"] == full["my_mc"]["acc_norm"]
    assert quick["my_ll"]["perplexity"] == pytest.approx(full["my_ll"]["perplexity"], rel=1e-5)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert quick["my_roll"][metric] == pytest.approx(full["my_roll"][metric], rel=1e-5)
    assert quick["my_gen"]["exact_match"] == full["my_gen"]["exact_match"] == expected
    # the headline is under acc for multiple choice, exact_match for generate_until
    assert quick["my_gen"]["acc"] == expected
    assert 0 <= quick["my_mc"]["acc"] <= 1


def test_shared_context_scores_equal_full_sequence_scores(world):
    """The quick engine's key/value-cache scoring against one full forward per pair."""
    from dtm.evaluate.scoring import _full_sequence_scores, continuation_scores
    from dtm.models import load_model

    _, model_dir, _ = world
    model, tok = load_model(str(model_dir), [])
    texts = ["the cat sat on a mat", "a red bird", "the dog ran under the green tree log"]
    pairs = []
    for t in texts:
        ctx = tok(t)["input_ids"]
        for c in (" is", " the blue tree", " over a log"):
            pairs.append((ctx, tok(c, add_special_tokens=False)["input_ids"]))
    fast = continuation_scores(model, pairs, pad_id=0, batch_size=4)
    ref = _full_sequence_scores(model, pairs, pad_id=0, batch_size=1)
    for (a, ga), (b, gb) in zip(fast, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_quick_matches_full_multiple_choice_on_other_architectures(arch, tmp_path):
    from dtm.evaluate import evaluate
    from dtm.models import load_model

    model_dir = make_model(arch, tmp_path / arch)
    tasks = write_tasks(tmp_path / "tasks")
    model, tok = load_model(str(model_dir), [])
    q = evaluate(model, tok, ["my_mc", "my_roll"], engine="quick", tasks_dir=tasks)
    f = evaluate(model, tok, ["my_mc", "my_roll"], engine="full", tasks_dir=tasks)
    assert q["my_mc"]["acc"] == f["my_mc"]["acc"]
    assert q["my_roll"]["bits_per_byte"] == pytest.approx(f["my_roll"]["bits_per_byte"], rel=1e-5)


def test_eval_cli_on_a_tasks_folder_and_held_out_rows(world, tmp_path):
    root, model_dir, tasks = world
    listed = dtm_cli("eval", "--list-tasks", "--tasks-dir", tasks)
    assert listed.returncode == 0, listed.stderr
    assert set(NAMES) <= set(listed.stdout.split())
    held = write_jsonl(
        tmp_path / "val_rows.jsonl",
        [
            {"instruction": "the cat sat", "output": "on a red mat"},
            {"instruction": "a bird flew", "output": "over the green tree"},
        ],
    )
    out = tmp_path / "results.json"
    r = dtm_cli(
        "eval",
        "--model",
        model_dir,
        "--tasks",
        "my_mc,my_gen",
        "--tasks-dir",
        tasks,
        "--heldout",
        held,
        "--out",
        out,
        cache=tmp_path / "cache",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"my_mc", "my_gen", "heldout:val_rows"}
    assert 0 <= res["my_mc"]["acc"] <= 1 and "exact_match" in res["my_gen"]
    # the reference: the mean response-token loss computed here with the model's own loss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtm.train.rows import ALPACA_PROMPT

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for prompt, resp in (("the cat sat", "on a red mat"), ("a bird flew", "over the green tree")):
        p = tok(ALPACA_PROMPT.format(instruction=prompt))["input_ids"]
        full = p + tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = [-100] * len(p) + full[len(p) :]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss
        n = len(full) - len(p)
        total += float(loss) * n
        count += n
    assert res["heldout:val_rows"]["tokens"] == count
    assert res["heldout:val_rows"]["loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s.replace('doc_to_choice: "{{choices}}"\n', ""), "doc_to_choice"),
        (
            lambda s: s.replace("output_type: multiple_choice", "output_type: ranking"),
            "output_type",
        ),
        (lambda s: s.replace("data/mc.jsonl", "data/nope.jsonl"), "dataset_kwargs.data_files.test"),
        (lambda s: s.replace("task: my_mc\n", ""), "task"),
        (lambda s: s + "  - [oops\n", None),
    ],
)
def test_a_malformed_task_file_exits_2_naming_file_and_field(world, tmp_path, edit, field):
    import shutil

    _, model_dir, tasks = world
    mine = tmp_path / "tasks"
    shutil.copytree(tasks, mine)
    path = mine / "my_mc.yaml"
    path.write_text(edit(path.read_text()))
    r = dtm_cli(
        "eval",
        "--model",
        model_dir,
        "--tasks",
        "my_ll",
        "--tasks-dir",
        mine,
        "--out",
        tmp_path / "r.json",
        cache=tmp_path / "cache",
    )
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr
    if field:
        assert f"field {field!r}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.json").exists()
