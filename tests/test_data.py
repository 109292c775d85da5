"""The data layer: every accepted shape and format, every bad-row case, file errors."""

import csv
import json

import pandas as pd
import pytest
from conftest import alpaca, write_jsonl

from dtm.data import COLUMNS, load_instructions
from dtm.errors import DataError

GOOD = alpaca(1)
# (case name, raw JSONL line, the drop reason it must give); row 1 is always good.
BAD_ROWS = [
    ("truncated json", b'{"instruction": "x", "output": "y"', "not JSON"),
    ("undecodable bytes", b'{"instruction": "caf\xe9", "output": "y"}', "undecodable bytes"),
    ("missing instruction", b'{"output": "y"}', "missing instruction"),
    ("empty instruction", b'{"instruction": "  ", "output": "y"}', "empty instruction"),
    ("missing response", b'{"instruction": "x"}', "missing response (output)"),
    ("empty response", b'{"instruction": "x", "output": ""}', "empty response (output)"),
    ("number instruction", b'{"instruction": 5, "output": "y"}', "instruction is int, not text"),
    ("list not object", b"[1, 2]", "expected a JSON object, got list"),
    (
        "unknown shape",
        b'{"prompt": "x", "answer": "y"}',
        "shape not recognised: keys [answer, prompt]",
    ),
    (
        "sharegpt no assistant",
        b'{"conversations": [{"from": "human", "value": "hi"}]}',
        "no assistant turn after the first user turn in conversations",
    ),
    (
        "messages no user",
        b'{"messages": [{"role": "assistant", "content": "hi"}]}',
        "no user turn in messages",
    ),
    ("messages not list", b'{"messages": "hello"}', "messages is str, not a list of turns"),
    (
        "bad turn",
        b'{"messages": [{"speaker": "user"}]}',
        "messages[0] is not a {role, content} turn",
    ),
    (
        "content parts",
        b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
        "messages[0].content is list, not text",
    ),
    (
        "empty assistant",
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
        "empty response (first assistant turn)",
    ),
    ("bad source", b'{"instruction": "x", "output": "y", "source": 3}', "source is int, not text"),
    (
        "bad id",
        b'{"instruction": "x", "output": "y", "id": [1]}',
        "id is list, not text or an integer",
    ),
]


@pytest.mark.parametrize("name,line,reason", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_dropped_with_reason_and_line(tmp_path, name, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    res = load_instructions(path, count_tokens=False)
    assert len(res.table) == 1
    [dropped] = res.report.dropped
    assert dropped.line == 2 and dropped.reason.startswith(reason), dropped
    assert res.report.n_read == 2 and res.report.n_kept == 1


def test_alpaca_jsonl_normalised(tmp_path):
    rows = [
        {"id": "x", "instruction": "Add", "input": "2 and 3", "output": "5", "source": "math"},
        {"instruction": "Hi", "output": "Hello", "dataset": "chat"},
    ]
    res = load_instructions(write_jsonl(tmp_path / "a.jsonl", rows))
    t = res.table
    assert list(t.columns) == COLUMNS
    assert t["id"].tolist() == ["x", "2"]  # a row without an id gets its line number
    assert t["input"].tolist() == ["2 and 3", ""]
    assert t["response"].tolist() == ["5", "Hello"]
    assert t["source"].tolist() == ["math", "chat"]
    assert (t["n_tokens"] > 0).all()
    assert res.report.shapes == {"alpaca": 2}


def test_sharegpt_takes_first_user_assistant_turn(tmp_path):
    rec = {
        "id": "s1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "First question"},
            {"from": "gpt", "value": "First answer"},
            {"from": "human", "value": "Second question"},
            {"from": "gpt", "value": "Second answer"},
        ],
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps([rec]))
    t = load_instructions(path).table
    assert t.loc[0, ["instruction", "response", "system"]].tolist() == [
        "First question",
        "First answer",
        "Be brief.",
    ]


def test_messages_tulu_shape_with_system(tmp_path):
    rec = {
        "dataset": "flan_v2",
        "id": "flan_v2_1",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Translate: chat"},
            {"role": "assistant", "content": "cat"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "no"},
        ],
    }
    res = load_instructions(write_jsonl(tmp_path / "m.jsonl", [rec]))
    row = res.table.iloc[0]
    assert (row["id"], row["source"], row["system"], row["instruction"], row["response"]) == (
        "flan_v2_1",
        "flan_v2",
        "You are helpful.",
        "Translate: chat",
        "cat",
    )
    assert res.report.shapes == {"messages": 1}


def test_csv_alpaca_and_messages_cells(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Multi\nline instruction", "", "ok"])
        w.writerow(["", "", "no instruction"])
    res = load_instructions(path)
    assert res.table["instruction"].tolist() == ["Multi\nline instruction"]
    assert [(d.line, d.reason) for d in res.report.dropped] == [(4, "empty instruction")]

    path2 = tmp_path / "m.csv"
    msgs = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    pd.DataFrame({"messages": [msgs, "{not json"]}).to_csv(path2, index=False)
    res2 = load_instructions(path2)
    assert res2.table["response"].tolist() == ["a"]
    assert res2.report.dropped[0].reason.startswith("messages cell is not JSON")


def test_parquet_with_nested_messages(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame(
        {"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}
    ).to_parquet(path)
    assert load_instructions(path).table["instruction"].tolist() == ["q"]


def test_bom_and_crlf_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(alpaca(1)).encode()
        + b"\r\n"
        + json.dumps(alpaca(2)).encode()
        + b"\r\n"
    )
    res = load_instructions(path)
    assert res.table["id"].tolist() == ["a1", "a2"] and not res.report.dropped


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [alpaca(1), alpaca(2)])
    assert len(load_instructions(path).table) == 2


def test_duplicate_ids_made_unique_and_reported(tmp_path):
    rows = [alpaca(1), alpaca(1), alpaca(1), alpaca(2)]
    res = load_instructions(write_jsonl(tmp_path / "d.jsonl", rows))
    assert res.table["id"].tolist() == ["a1", "a1#2", "a1#3", "a2"]
    assert res.report.renamed_ids == [("a1", "a1#2"), ("a1", "a1#3")]
    assert "duplicate ids made unique: 2" in res.report.summary()


FILE_ERRORS = [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n \n", "the file is empty"),
    (
        "allbad.jsonl",
        b'{"a": 1}\nnot json\n',
        "no usable row in 2 lines read (first problems: line 1: shape not recognised",
    ),
    (
        "cols.csv",
        b"prompt,answer\nx,y\n",
        "CSV columns [prompt, answer] do not hold instruction data",
    ),
    ("empty.csv", b"\n", "the file is empty"),
    ("obj.json", b'{"instruction": "x"}', "expected a JSON array of records, got a dict"),
    ("broken.json", b'[{"instruction": "x",', "not valid JSON"),
    ("latin.json", b'[{"instruction": "caf\xe9"}]', "not UTF-8 text"),
    ("data.txt", b"hello", "unknown file type '.txt'"),
    ("bad.parquet", b"PAR1 not really", "not a readable Parquet file"),
]


@pytest.mark.parametrize("name,content,message", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_file_level_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_instructions(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_instructions(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        load_instructions(tmp_path)


def test_hub_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        DataError, match=r"Cannot load the hub dataset 'nobody/no-such-set'.*Offline\?"
    ):
        load_instructions("nobody/no-such-set")
