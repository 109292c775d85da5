"""Data curation (``dtm.curate``): the score-first, diversity-aware walk on hand-made
embeddings, IFD against a plain forward pass, and ``dtm curate`` / ``dtm train --kind
curate`` through the CLI with non-default budgets and thresholds."""

import json

import numpy as np
import pytest
import torch
from archs import instruction_rows, make_model
from conftest import dtm_cli, write_jsonl

from dtm.curate import ifd_scores, select


def _unit(deg):
    return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


def test_the_walk_keeps_by_score_and_skips_near_duplicates():
    emb = np.stack([_unit(a) for a in (0, 5, 90, 92, 180, 45)])
    scores = np.array([0.9, 0.95, 0.5, 0.4, 0.1, 0.3])
    # cos(5°) = 0.996, cos(2°) = 0.999, cos(45°) = 0.707: at 0.99 the near twins are skipped
    assert select(scores, emb, 4, 0.99).tolist() == [1, 2, 5, 4]
    assert select(scores, emb, 2, 0.99).tolist() == [1, 2]
    # at 0.5, 45° is too close to 0° and 90° as well; only three rows are far enough apart
    assert select(scores, emb, 6, 0.5).tolist() == [1, 2, 4]


def test_ifd_is_the_conditioned_over_the_unconditioned_response_loss(tmp_path):
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_model("qwen2", tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = instruction_rows(3)
    table = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "instruction": [r["instruction"] for r in rows],
            "input": [""] * 3,
            "response": [r["output"] for r in rows],
            "system": [""] * 3,
        }
    )
    got = ifd_scores(model, tok, table, max_length=64, batch_size=2)
    for i, r in enumerate(rows):  # by hand, one row at a time, with the chat template
        msgs = [{"role": "user", "content": r["instruction"]}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(
            msgs + [{"role": "assistant", "content": r["output"]}], tokenize=True
        )
        prompt, full = (list(getattr(x, "input_ids", x)) for x in (prompt, full))
        resp = full[len(prompt) :]

        def mean_nll(ids, first):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            return -np.mean([float(lp[t - 1, ids[t]]) for t in range(first, len(ids))])

        cond = mean_nll(full, len(prompt))
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        alone = mean_nll(head + resp, max(1, len(head)))
        assert got[i] == pytest.approx(cond / alone, rel=1e-4)


def _data(tmp_path, n=12):
    rows = instruction_rows(n)
    for i, r in enumerate(rows):
        r["quality"] = (i * 7) % n  # unequal, not in row order
    return write_jsonl(tmp_path / "data.jsonl", rows), rows


def test_curate_command_keeps_the_budget_by_the_column(tmp_path):
    data, rows = _data(tmp_path)
    out = tmp_path / "sel"
    r = dtm_cli(
        "curate", "--data", data, "--curate-budget", "0.25", "--curate-score", "column:quality",
        "--curate-threshold", "1.0", "--out", out, cache=tmp_path / "cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = (out / "selection.csv").read_text().splitlines()
    assert lines[0] == "id,score,kept"
    kept = {x.split(",")[0] for x in lines[1:] if x.endswith(",1")}
    best = sorted(rows, key=lambda r: -r["quality"])[:3]  # 0.25 of 12 rows, all distinct
    assert kept == {r["id"] for r in best}


def test_train_kind_curate_trains_on_the_kept_rows(tmp_path):
    base = make_model("qwen2", tmp_path / "q")
    data, _ = _data(tmp_path, 16)
    run = tmp_path / "run"
    r = dtm_cli(
        "train", "--kind", "curate", "--base", base, "--data", data, "--curate-budget", "5",
        "--curate-threshold", "0.97", "--steps", "2", "--batch-size", "2",
        "--micro-batch-size", "2", "--max-length", "64", "--log-every", "1",
        "--val-fraction", "0.25", "--out", run, cache=tmp_path / "cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sel = (run / "selection.csv").read_text().splitlines()
    assert len(sel) == 1 + 12  # every training row (16 less the 4 held out)
    kept = sum(x.endswith(",1") for x in sel[1:])
    assert 1 <= kept <= 5
    assert json.loads((run / "config.json").read_text())["train_rows"] == kept
    assert (run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--curate-budget", "50", "--curate-score", "column:quality"], "larger than the data"),
        (["--curate-budget", "0.5", "--curate-threshold", "0"], "in (0, 1]"),
        (["--curate-budget", "0.5", "--curate-threshold", "1.5"], "in (0, 1]"),
        (["--curate-budget", "0.5", "--curate-score", "column:nope"], "no field 'nope'"),
        (["--curate-budget", "0.5", "--curate-score", "deita:/no/such,/no/such"], "cannot be"),
    ],
)
def test_bad_curate_parameters_exit_2_naming_them(tmp_path, extra, message):
    data, _ = _data(tmp_path)
    r = dtm_cli("curate", "--data", data, *extra, "--out", tmp_path / "o", cache=tmp_path / "c")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
