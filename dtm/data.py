"""Load and validate instruction data into one normalised table.

Accepted files: JSONL, JSON (an array of objects), CSV and Parquet, or a Hugging Face
dataset id (only when the user names one). Accepted row shapes:

- Alpaca: ``instruction``, ``input`` (optional), ``output``;
- ShareGPT: ``conversations`` of ``{from, value}``;
- chat messages: ``messages`` of ``{role, content}`` (TULU-v2-mix). As in the paper, the
  first user turn and the assistant turn after it are taken; a system message is kept.

The table has one row per usable example and the columns of ``COLUMNS``:
``id`` (str, unique), ``instruction``, ``input``, ``response``, ``system``, ``source``
(the row's sub-source when the data says, from ``source`` or ``dataset``; else "") and
``n_tokens`` (WordPiece tokens of prompt + response under the default embedding model's
tokenizer: a model-independent size; training counts again with the base model's own).

Bad rows are dropped with a reason and their line (or record) number; nothing is
silently coerced. A file with no usable row raises ``DataError``.

Length: one reader per file format and row shape, with the check of every field each
one needs; they share the drop-with-a-reason report, so they stay together.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dtm.embed import default_tokenizer, prompt_text
from dtm.errors import DataError

COLUMNS = ["id", "instruction", "input", "response", "system", "source", "n_tokens"]
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
LOADER_VERSION = 1  # bump when normalisation changes: it is part of every dataset key
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}
_SHAPE_HINT = (
    "expected Alpaca (instruction, output), ShareGPT (conversations) or chat messages (messages)"
)


@dataclass
class DroppedRow:
    line: int
    reason: str


@dataclass
class LoadReport:
    """What a load kept and dropped. ``unit`` says what ``line`` numbers count."""

    source: str
    unit: str = "line"
    n_read: int = 0
    n_kept: int = 0
    dropped: list[DroppedRow] = field(default_factory=list)
    renamed_ids: list[tuple[str, str]] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)

    def reasons(self) -> Counter:
        """Drop counts by reason category (the text before the first colon)."""
        return Counter(d.reason.split(":")[0] for d in self.dropped)

    def summary(self, max_examples: int = 10) -> str:
        lines = [
            f"{self.source}: {self.n_kept} kept, {len(self.dropped)} dropped "
            f"of {self.n_read} {self.unit}s read"
        ]
        if self.shapes:
            lines.append("shapes: " + ", ".join(f"{k} {v}" for k, v in self.shapes.most_common()))
        for reason, n in self.reasons().most_common():
            lines.append(f"  dropped {n}: {reason}")
        for d in self.dropped[:max_examples]:
            lines.append(f"    {self.unit} {d.line}: {d.reason}")
        if len(self.dropped) > max_examples:
            lines.append(f"    ... and {len(self.dropped) - max_examples} more")
        if self.renamed_ids:
            lines.append(
                f"duplicate ids made unique: {len(self.renamed_ids)} "
                f"(e.g. {self.renamed_ids[0][0]!r} -> {self.renamed_ids[0][1]!r})"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "unit": self.unit,
            "n_read": self.n_read,
            "n_kept": self.n_kept,
            "shapes": dict(self.shapes),
            "dropped": [[d.line, d.reason] for d in self.dropped],
            "renamed_ids": self.renamed_ids,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadReport:
        return cls(
            d["source"],
            d["unit"],
            d["n_read"],
            d["n_kept"],
            [DroppedRow(a, b) for a, b in d["dropped"]],
            [tuple(x) for x in d["renamed_ids"]],
            Counter(d["shapes"]),
        )


class RowError(ValueError):
    """One row that cannot be used; its message is the drop reason."""


# ---------------------------------------------------------------- row shapes


def _text(rec: dict, key: str, *, required: bool, what: str | None = None) -> str:
    what = what or key
    value = rec.get(key)
    if value is None:
        if required:
            raise RowError(f"missing {what}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__}, not text")
    if required and not value.strip():
        raise RowError(f"empty {what}")
    return value


def _turns(rec: dict, key: str, role_key: str, text_key: str) -> tuple[str, str, str]:
    """(system, first user turn, the assistant turn after it) of a conversation."""
    turns = rec[key]
    if not isinstance(turns, list):
        raise RowError(f"{key} is {type(turns).__name__}, not a list of turns")
    system, user, assistant = "", None, None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RowError(f"{key}[{i}] is not a {{{role_key}, {text_key}}} turn")
        role, text = turn[role_key], turn[text_key]
        if not isinstance(text, str):
            raise RowError(f"{key}[{i}].{text_key} is {type(text).__name__}, not text")
        role = str(role).lower()
        if role == "system" and user is None and not system:
            system = text
        elif role in _USER_ROLES and user is None:
            user = text
        elif role in _ASSISTANT_ROLES and user is not None:
            assistant = text
            break
    if user is None:
        raise RowError(f"no user turn in {key}")
    if assistant is None:
        raise RowError(f"no assistant turn after the first user turn in {key}")
    if not user.strip():
        raise RowError("empty instruction (first user turn)")
    if not assistant.strip():
        raise RowError("empty response (first assistant turn)")
    return system, user, assistant


def normalise_record(rec: Any) -> tuple[str, dict[str, str]]:
    """(shape, fields) of one record, or ``RowError`` with the reason it is unusable."""
    if not isinstance(rec, dict):
        raise RowError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        shape = "messages"
        system, instruction, response = _turns(rec, "messages", "role", "content")
        inp = ""
    elif "conversations" in rec:
        shape = "sharegpt"
        system, instruction, response = _turns(rec, "conversations", "from", "value")
        inp = ""
    elif "instruction" in rec or "output" in rec:
        shape = "alpaca"
        instruction = _text(rec, "instruction", required=True)
        inp = _text(rec, "input", required=False)
        response = _text(rec, "output", required=True, what="response (output)")
        system = _text(rec, "system", required=False)
    else:
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise RowError(f"shape not recognised: keys [{keys}]; {_SHAPE_HINT}")
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int, type(None))):
        raise RowError(f"id is {type(rid).__name__}, not text or an integer")
    source = rec.get("source", rec.get("dataset"))
    if source is not None and not isinstance(source, str):
        raise RowError(f"source is {type(source).__name__}, not text")
    return shape, {
        "id": "" if rid is None else str(rid),
        "instruction": instruction,
        "input": inp,
        "response": response,
        "system": system,
        "source": source or "",
    }


# ---------------------------------------------------------------- file formats


def _jsonl_records(raw: bytes):
    """(line number, record or RowError) for each non-blank line."""
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, RowError(f"undecodable bytes: not UTF-8 at byte {e.start} of the line")
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            yield n, RowError(f"not JSON: {e.msg} at column {e.colno}")


def _json_records(raw: bytes, path: str):
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start}).") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: really JSON Lines
            yield from _jsonl_records(raw)
            return
        raise DataError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}."
        ) from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got a {type(data).__name__}.")
    yield from enumerate(data, start=1)


def _csv_records(raw: bytes, path: str):
    # surrogateescape keeps undecodable bytes visible per row, so only those rows drop
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV (no header row).")
    cols = set(reader.fieldnames)
    if not ({"instruction", "output"} <= cols or "messages" in cols or "conversations" in cols):
        raise DataError(
            f"{path}: CSV columns [{', '.join(reader.fieldnames)}] do not "
            f"hold instruction data; {_SHAPE_HINT}."
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield reader.line_num, RowError(f"malformed CSV: {e}")
            continue
        n = reader.line_num
        if None in row:
            yield n, RowError("more fields than the header has")
            continue
        if any(isinstance(v, str) and re.search("[\udc80-\udcff]", v) for v in row.values()):
            yield n, RowError("undecodable bytes: not UTF-8")
            continue
        rec: dict[str, Any] = {k: v for k, v in row.items() if v is not None}
        try:
            for key in ("messages", "conversations"):
                if key in rec and rec[key] != "":
                    rec[key] = json.loads(rec[key])  # a CSV cell holds a conversation as JSON
        except json.JSONDecodeError as e:
            yield n, RowError(f"{key} cell is not JSON: {e.msg}")
            continue
        yield n, rec


def _parquet_records(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from e
    yield from enumerate(table.to_pylist(), start=1)


def _hub_records(dataset_id: str, split: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a pinned requirement
        raise DataError("Loading a hub dataset needs the `datasets` package.") from e
    try:
        ds = datasets.load_dataset(dataset_id.removeprefix("hf://"), split=split)
    except Exception as e:
        raise DataError(
            f"Cannot load the hub dataset {dataset_id!r} (split {split!r}): "
            f"{type(e).__name__}: {e}. Offline? Download it first or give a "
            "local file."
        ) from e
    yield from enumerate(ds, start=1)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


# ---------------------------------------------------------------- the loader


@dataclass
class LoadResult:
    table: pd.DataFrame
    report: LoadReport


def load_instructions(
    source: str | Path,
    *,
    split: str = "train",
    count_tokens: bool = True,
    keep: tuple[str, ...] = (),
) -> LoadResult:
    """Load instruction data from a file or a named hub dataset into the normalised
    table (columns ``COLUMNS``, then each field named in ``keep`` as it is in the row,
    None where a row lacks it). Raises ``DataError`` when nothing is usable."""
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        raise DataError(f"{src}: is a folder, not a data file.")
    if path.exists():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{src}: unknown file type {path.suffix!r}; use one of "
                f"{', '.join(sorted(FORMATS))}."
            )
        if fmt == "parquet":
            records, unit = _parquet_records(str(path)), "record"
        else:
            raw = path.read_bytes()
            if not raw.strip():
                raise DataError(f"{src}: the file is empty.")
            if fmt == "jsonl":
                records, unit = _jsonl_records(raw), "line"
            elif fmt == "json":
                records = _json_records(raw, src)
                unit = "record" if raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[" else "line"
            else:
                records, unit = _csv_records(raw, src), "line"
    elif is_hub_id(src):
        records, unit = _hub_records(src, split), "record"
    else:
        raise DataError(f"{src}: no such file (nor a hub dataset id like 'owner/name').")

    report = LoadReport(source=src, unit=unit)
    rows, lines = [], []
    for n, rec in records:
        report.n_read += 1
        try:
            if isinstance(rec, RowError):
                raise rec
            shape, fields_ = normalise_record(rec)
        except RowError as e:
            report.dropped.append(DroppedRow(n, str(e)))
            continue
        report.shapes[shape] += 1
        for name in keep:
            if name not in COLUMNS:
                fields_[name] = rec.get(name)
        rows.append(fields_)
        lines.append(n)
    if not rows:
        first = "; ".join(f"{unit} {d.line}: {d.reason}" for d in report.dropped[:3])
        raise DataError(
            f"{src}: no usable row in {report.n_read} {unit}s read"
            + (f" (first problems: {first})" if first else "")
            + "."
        )
    table = pd.DataFrame(rows)
    table["id"] = _unique_ids(table["id"].tolist(), lines, report)
    table["n_tokens"] = token_counts(table) if count_tokens else 0
    report.n_kept = len(table)
    return LoadResult(table[COLUMNS + [k for k in keep if k not in COLUMNS]], report)


def _unique_ids(ids: list[str], lines: list[int], report: LoadReport) -> list[str]:
    """Give rows without an id their line number, and make duplicates unique (reported)."""
    ids = [i if i else str(n) for i, n in zip(ids, lines, strict=True)]
    if len(set(ids)) == len(ids):
        return ids
    out: list[str] = []
    used: set[str] = set()
    for i in ids:
        new, k = i, 1
        while new in used:
            k += 1
            new = f"{i}#{k}"
        if new != i:
            report.renamed_ids.append((i, new))
        used.add(new)
        out.append(new)
    return out


def token_counts(table: pd.DataFrame) -> list[int]:
    """Tokens of each row's prompt and response, by the embedding model's tokenizer."""

    tok = default_tokenizer()
    texts = (prompt_text(table) + "\n" + table["response"]).tolist()
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
