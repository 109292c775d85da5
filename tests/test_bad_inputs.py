"""The bad-input corpus: one table of bad inputs across every surface of the tool (data
files, disperse, train, merge, eval, experiment files, jobs, the lab, the registry), each
with the message it must produce.

Each case makes its input under a private folder and gives the ``python -m dtm`` command
that meets it. The command runs in-process (``dtm.__main__.main``): a refused input must
exit 2 with ``error: ...`` on stderr naming what is wrong and where (file, line, field or
flag), never a traceback; a *handled* input (a byte-order mark, CRLF line ends, a torn
last line, a 10 MB row) exits 0 and its report line says what was read. Nothing is lost:
every file that existed before the command (the input itself, an existing output, the
registry, the models and adapters it read) is byte-identical after it. Cases with a page
input are also met on the page (Streamlit's AppTest), which must show the same message
and keep working; a few run through a real ``python -m dtm`` process as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from conftest import ROOT, alpaca, dtm_cli, round_robin_assignment, write_jsonl

from dtm.store import SCHEMA_VERSION

pytestmark = pytest.mark.bad_input

PAGES = ROOT / "views"
TEN_MB = 10 << 20


# ---------------------------------------------------------------- the case record


class Env:
    """One case's world: a private folder (``tmp``), a private cache, and on demand the
    session's lab and this module's models (whose files are then watched too)."""

    def __init__(self, request, tmp: Path, cache: Path) -> None:
        self.request, self.tmp, self.cache = request, tmp, cache
        self.watched: list[Path] = [tmp, cache]

    @property
    def lab(self) -> Path:
        lab = self.request.getfixturevalue("lab0")
        for sub in ("model", "data"):
            if lab / sub not in self.watched:
                self.watched.append(lab / sub)
        return lab

    @property
    def models(self) -> Path:
        root = self.request.getfixturevalue("bad_models")
        if root not in self.watched:
            self.watched.append(root)
        return root

    def fmt(self, text: str) -> str:
        """``{tmp}``, ``{cache}``, ``{lab}`` and ``{models}`` in ``text`` made real."""
        for key in ("tmp", "cache", "lab", "models"):
            if "{" + key + "}" in text:
                text = text.replace("{" + key + "}", str(getattr(self, key)))
        return text

    def write(self, name: str, content: bytes | str, *, under: Path | None = None) -> Path:
        path = (under or self.tmp) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    def snapshot(self) -> dict[Path, str]:
        """sha256 of every file under the watched folders (SQLite's -wal/-shm aside)."""
        out = {}
        for root in self.watched:
            for p in sorted(root.rglob("*")):
                if p.is_file() and not p.name.endswith(("-wal", "-shm")):
                    out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # data, disperse, train, merge, eval, run, registry, jobs, lab
    argv: str  # the command after `python -m dtm` ({tmp}, {lab}, {models}, {cache})
    message: tuple[str, ...]  # what the message must hold (placeholders filled in)
    setup: Callable[[Env], object] | None = None  # makes the input under {tmp}
    code: int = 2  # 0: handled (the message is the report on stdout)
    absent: tuple[str, ...] = ()  # outputs (under {tmp}) a refused command must not create
    check: Callable[[Env], None] | None = None  # more checks after the command
    during: Callable[[Env], contextlib.AbstractContextManager] | None = None
    page: Callable[[Env], object] | None = None  # the same input on a page -> AppTest
    page_message: tuple[str, ...] | None = None  # when the page words it otherwise
    kept: int | None = None  # a handled input on the page: the rows it must keep


def rows(n: int = 3) -> list[dict]:
    return [alpaca(i) for i in range(n)]


def lines(*items) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in items)


def good(env: Env, name: str = "d.jsonl", n: int = 3) -> Path:
    return write_jsonl(env.tmp / name, rows(n))


def loaded(env: Env, name: str, ids: list[str], **cols) -> None:
    """The library reads every good row of ``name``, exactly."""
    from dtm.data import load_instructions

    table = load_instructions(env.tmp / name, count_tokens=False).table
    assert table["id"].tolist() == ids
    for col, values in cols.items():
        assert table[col].tolist() == values


# ---------------------------------------------------------------- page drivers


def disperse_page(env: Env, path: Path, k: int = 4):
    """The Disperse page with a local data path and K, and the Disperse button pressed."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / "disperse.py"), default_timeout=120)
    at.session_state["ds_kind"] = "Local path"
    at.session_state["ds_path"] = str(path)
    at.session_state["k"] = k
    at.run()
    assert at.radio(key="ds_kind").value == "Local path"
    at.button(key="go").click().run()
    return at


def page_for_data(name: str, k: int = 4):
    return lambda env: disperse_page(env, env.tmp / name, k)


def fake_jobs(env: Env, adapters: list[Path], group: str = "g") -> None:
    """Finished ``sub`` jobs in the registry, one per adapter (as the Train page leaves
    them), so the Merge page offers them."""
    from dtm.jobs import Job, JobStore
    from dtm.store import Registry
    from dtm.train import TrainConfig

    store = JobStore(Registry(env.cache))
    now = time.time()
    for c, adapter in enumerate(adapters):
        run_dir = env.tmp / "runs" / f"sub{c}"
        shutil.copytree(adapter, run_dir / "adapter")
        cfg = TrainConfig(
            base=str(env.lab / "model"),
            data=str(env.lab / "data" / "train.jsonl"),
            out=str(run_dir),
            kind="sub",
            cluster=c,
            assignments=str(env.tmp / "asg.csv"),
            eval_lab=str(env.lab),
        )
        store.add(
            Job(
                id=f"job{c}",
                kind="sub",
                name=f"sub {c}",
                group=group,
                config=asdict(cfg),
                state="done",
                backend="local",
                ref=None,
                pid=None,
                proc_start=None,
                gpu=None,
                run_dir=run_dir,
                resume=False,
                step=4,
                first_step=0,
                total_steps=4,
                attempts=0,
                error=None,
                created=now + c,
                started=now,
                updated=now,
                ended=now,
            )
        )


def merge_page(env: Env, adapters: list[Path], weights: list[float] | None = None):
    from streamlit.testing.v1 import AppTest

    fake_jobs(env, adapters)
    at = AppTest.from_file(str(PAGES / "merge.py"), default_timeout=120)
    if weights is not None:  # as weights picked on the landscape are set
        at.session_state["m_picked_weights"] = weights
    return at.run()


def train_page(env: Env, base: str):
    """The Train page with a saved K=2 assignment, a base model path typed in, and the
    launch button pressed."""
    from streamlit.testing.v1 import AppTest

    from dtm.disperse import DisperseConfig, run_disperse
    from dtm.store import Registry

    reg = Registry(env.cache)
    data = write_jsonl(env.tmp / "page-data.jsonl", rows(6))
    res = run_disperse(DisperseConfig(data=str(data), k=2, method="random"), reg, project=False)
    reg.set_name("assignment", res.artifacts["assignment"].key, "random K=2")
    at = AppTest.from_file(str(PAGES / "train.py"), default_timeout=120)
    at.session_state["train_base_path"] = base
    at.run()
    assert at.radio(key="train_base_kind").value == "Model folder or hub id"
    at.button(key="launch_dtm").click().run()
    return at


def home_page(env: Env):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


# ---------------------------------------------------------------- inputs that need work


@pytest.fixture(scope="module")
def bad_models(lab0, tmp_path_factory):
    """Models and adapters to get wrong: the lab model with pickle weights only, a
    pickle that is not only tensors, a tiny Llama of another shape (another base), and
    random LoRA adapters of each base. No training: a few seconds."""
    import pickle

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("bad_models")
    src = lab0 / "model"
    aux = [p for p in src.iterdir() if not p.name.endswith(".safetensors")]

    pk = root / "pickle"
    pk.mkdir()
    for p in aux:
        shutil.copy(p, pk)
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), pk / "pytorch_model.bin")

    evil = root / "evil"
    shutil.copytree(pk, evil)
    with open(evil / "pytorch_model.bin", "wb") as f:  # unpickling it would create a file
        pickle.dump({"w": _Touch(str(root / "PWNED"))}, f)

    cfg = LlamaConfig.from_pretrained(src)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 32, 48, 8
    torch.manual_seed(0)
    other = root / "other"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    for p in aux:
        if p.name != "config.json":
            shutil.copy(p, other)

    def adapter(base: Path, out: Path, seed: int) -> None:
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(
                r=4,
                lora_alpha=4,
                target_modules=["gate_proj", "up_proj", "down_proj"],
                init_lora_weights=False,
            ),
        )
        model.save_pretrained(out)
        conf = json.loads((out / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = str(base)
        (out / "adapter_config.json").write_text(json.dumps(conf, indent=2))

    for i in range(2):
        adapter(src, root / f"a{i}", i)
        adapter(other, root / f"oa{i}", 10 + i)
    return root


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def add_job(env: Env, state: str) -> str:
    from dtm.jobs import Job, JobStore
    from dtm.store import Registry
    from dtm.train import TrainConfig

    cfg = TrainConfig(base="b", data="d", out=str(env.tmp / "run"))
    now = time.time()
    JobStore(Registry(env.cache)).add(
        Job("deadbeef0123", "sft", "sft", None, asdict(cfg), state, "local", None, None, None,
            None, env.tmp / "run", False, 4, 0, 4, 0, None, now, now, now, now)
    )  # fmt: skip
    return "deadbeef"


@contextlib.contextmanager
def exclusive_lock(env: Env):
    """Another connection holds the registry's EXCLUSIVE lock while the command runs."""
    from dtm.store import Registry

    Registry(env.cache)
    holder = sqlite3.connect(env.cache / "registry.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def corrupt_registry(env: Env) -> None:
    env.cache.mkdir(parents=True, exist_ok=True)
    env.write("registry.sqlite", b"my notes, not a database\n" * 400, under=env.cache)


def truncated_registry(env: Env) -> None:
    from dtm.store import Registry

    reg = Registry(env.cache)
    for i in range(50):
        reg.produce("thing", {"i": i, "pad": "x" * 500}, lambda folder: {})
    db = env.cache / "registry.sqlite"
    db.write_bytes(db.read_bytes()[:6000])


def status_file(env: Env, text: str) -> Path:
    """A hand-edited status.json of the experiment ``lab`` (the Home page's story)."""
    return env.write("experiments/lab/status.json", text, under=env.cache)


def experiment(env: Env, extra: str = "") -> Path:
    """An experiment file named ``lab`` (as the Home page's story) on a small data file,
    valid but for what a case adds: its base folder has the files a model folder needs
    (it is never loaded: every case stops before any work) and it names its tasks."""
    data = good(env, "exp-data.jsonl", 6)
    env.write("base/config.json", "{}")
    env.write("base/model.safetensors", "")
    return env.write(
        "exp.yaml",
        f"name: lab\nbase: {env.tmp}/base\ndata: {data}\nevaluate: {{tasks: [lab_knowledge]}}\n"
        f"{extra}",
    )


@contextlib.contextmanager
def env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def trained_with_pickle(run: Path) -> None:
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["allow_pickle"] is True


def pickle_did_not_run(env: Env) -> None:
    assert not (env.models / "PWNED").exists(), "unpickling ran code"


def merged(out: Path) -> None:
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "average" and recipe["weights"] == [0.5, 0.5]


def with_page_error(at) -> str:
    return "\n".join(e.value for e in at.error)


# ---------------------------------------------------------------- the corpus


def put(name: str, content: bytes | str):
    """A setup writing one file under the case's folder."""
    return lambda env: env.write(name, content)


def both(*setups):
    return lambda env: [f(env) for f in setups]


def data(n: int = 3, name: str = "d.jsonl"):
    return lambda env: good(env, name, n)


TRUNCATED = b'{"id": "a3", "instruction": "Instruction number 3", "outp'
BOM = b"\xef\xbb\xbf"
NO_ASSISTANT = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "hi"}]}  # fmt: skip
LAB_BASE = "--base {lab}/model"
TRAIN = "train --data {tmp}/d.jsonl --out {tmp}/run"
SUB = f"train {LAB_BASE} --data {{tmp}}/d.jsonl --kind sub --cluster 0 --out {{tmp}}/run"
MERGE = f"merge {LAB_BASE} --out {{tmp}}/m --adapters"
ADAPTERS = "{models}/a0 {models}/a1"
EVAL = "eval --tasks lab_knowledge --out {tmp}/r.json"
ANOTHER_BASE = (
    "layer base_model.model.model.layers.0.mlp.down_proj has shape (32, 48), the base "
    "model's is (64, 128) (an adapter of another base? it was trained on {models}/other)"
)
NOT_SQLITE = "The registry {cache}/registry.sqlite is not a readable SQLite database"
LOCKED = "The registry {cache}/registry.sqlite is locked by another process"

# fmt: off
CASES = [
    # --- data files: `dtm data check` (and the Disperse page's local path)
    Case("data-truncated-last-line", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: 3 kept, 1 dropped of 4 lines read", "line 4: not JSON"),
         setup=put("d.jsonl", lines(*rows(3)) + TRUNCATED), code=0,
         check=lambda e: loaded(e, "d.jsonl", ["a0", "a1", "a2"]),
         page=page_for_data("d.jsonl", k=2), page_message=("line 4: not JSON",), kept=3),
    Case("data-truncated-only-line", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: no usable row in 1 lines read", "line 1: not JSON"),
         setup=put("d.jsonl", TRUNCATED)),
    Case("data-undecodable-row", "data", "data check {tmp}/d.jsonl",
         ("1 kept, 1 dropped", "line 2: undecodable bytes: not UTF-8 at byte 20 of the line"),
         setup=put("d.jsonl", lines(alpaca(0), b'{"instruction": "caf\xe9", "output": "y"}')),
         code=0, check=lambda e: loaded(e, "d.jsonl", ["a0"])),
    Case("data-undecodable-json-file", "data", "data check {tmp}/d.json",
         ("{tmp}/d.json: not UTF-8 text (undecodable byte at offset 21)",),
         setup=put("d.json", b'[{"instruction": "caf\xe9", "output": "y"}]'),
         page=page_for_data("d.json")),
    Case("data-undecodable-csv-row", "data", "data check {tmp}/d.csv",
         ("1 kept, 1 dropped", "line 3: undecodable bytes: not UTF-8"),
         setup=put("d.csv", b"instruction,output\nhello,world\ncaf\xe9,y\n"), code=0,
         check=lambda e: loaded(e, "d.csv", ["2"])),
    Case("data-bom-jsonl", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: 3 kept, 0 dropped of 3 lines read",),
         setup=put("d.jsonl", BOM + lines(*rows(3))), code=0,
         check=lambda e: loaded(e, "d.jsonl", ["a0", "a1", "a2"]),
         page=page_for_data("d.jsonl", k=2), page_message=(), kept=3),
    Case("data-bom-json-array", "data", "data check {tmp}/d.json",
         ("{tmp}/d.json: 3 kept, 0 dropped of 3 records read",),
         setup=put("d.json", BOM + json.dumps(rows(3)).encode()), code=0,
         check=lambda e: loaded(e, "d.json", ["a0", "a1", "a2"])),
    Case("data-bom-csv", "data", "data check {tmp}/d.csv",
         ("{tmp}/d.csv: 2 kept, 0 dropped of 2 lines read",),
         setup=put("d.csv", BOM + b"instruction,output\nq1,r1\nq2,r2\n"), code=0,
         check=lambda e: loaded(e, "d.csv", ["2", "3"], instruction=["q1", "q2"])),
    Case("data-crlf-jsonl", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: 3 kept, 0 dropped of 3 lines read",),
         setup=put("d.jsonl", lines(*rows(3)).replace(b"\n", b"\r\n")), code=0,
         check=lambda e: loaded(e, "d.jsonl", ["a0", "a1", "a2"],
                                response=["Response 0", "Response 1", "Response 2"])),
    Case("data-crlf-csv", "data", "data check {tmp}/d.csv",
         ("{tmp}/d.csv: 2 kept, 0 dropped of 2 lines read",),
         setup=put("d.csv", b"instruction,input,output\r\nq1,,r1\r\nq2,,r2\r\n"), code=0,
         check=lambda e: loaded(e, "d.csv", ["2", "3"], response=["r1", "r2"], input=["", ""])),
    Case("data-10mb-single-row", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: 1 kept, 0 dropped of 1 lines read",),
         setup=put("d.jsonl", lines({"id": "big", "instruction": "x" * TEN_MB, "output": "y"})),
         code=0, check=lambda e: loaded(e, "d.jsonl", ["big"], instruction=["x" * TEN_MB])),
    Case("data-empty-file", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: the file is empty.",),
         setup=put("d.jsonl", b""), page=page_for_data("d.jsonl")),
    Case("data-blank-lines-only", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: the file is empty.",), setup=put("d.jsonl", b"\n  \r\n\n")),
    Case("data-csv-without-needed-columns", "data", "data check {tmp}/d.csv",
         ("{tmp}/d.csv: CSV columns [prompt, answer] do not hold instruction data",
          "expected Alpaca (instruction, output)"),
         setup=put("d.csv", b"prompt,answer\nx,y\n"), page=page_for_data("d.csv")),
    Case("data-csv-header-only", "data", "data check {tmp}/d.csv",
         ("{tmp}/d.csv: no usable row in 0 lines read",),
         setup=put("d.csv", b"instruction,output\n")),
    Case("data-sharegpt-no-assistant-turn", "data", "data check {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: no usable row in 1 lines read",
          "line 1: no assistant turn after the first user turn in conversations"),
         setup=put("d.jsonl", lines(NO_ASSISTANT)), page=page_for_data("d.jsonl")),
    Case("data-messages-no-user-turn", "data", "data check {tmp}/d.jsonl",
         ("1 kept, 1 dropped", "line 2: no user turn in messages"),
         setup=put("d.jsonl", lines(alpaca(0),
                                    {"messages": [{"role": "assistant", "content": "hi"}]})),
         code=0),
    Case("data-json-object-not-array", "data", "data check {tmp}/d.json",
         ("{tmp}/d.json: expected a JSON array of records, got a dict.",),
         setup=put("d.json", json.dumps(alpaca(0)))),
    Case("data-json-broken", "data", "data check {tmp}/d.json",
         ("{tmp}/d.json: not valid JSON: Expecting value at line 2 column 13.",),
         setup=put("d.json", b'[{"instruction": "x",\n  "output": }]')),
    Case("data-unknown-file-type", "data", "data check {tmp}/d.txt",
         ("{tmp}/d.txt: unknown file type '.txt'; use one of",), setup=put("d.txt", "hello")),
    Case("data-parquet-not-parquet", "data", "data check {tmp}/d.parquet",
         ("{tmp}/d.parquet: not a readable Parquet file",),
         setup=put("d.parquet", b"PAR1 but not really")),
    Case("data-missing-file", "data", "data check {tmp}/missing.jsonl",
         ("{tmp}/missing.jsonl: no such file",), page=page_for_data("missing.jsonl")),
    Case("data-folder-not-file", "data", "data check {tmp}",
         ("{tmp}: is a folder, not a data file.",)),
    Case("data-unknown-row-shape", "data", "data check {tmp}/d.jsonl",
         ("line 1: shape not recognised: keys [answer, prompt]",),
         setup=put("d.jsonl", lines({"prompt": "x", "answer": "y"}))),
    Case("data-field-wrong-type", "data", "data check {tmp}/d.jsonl",
         ("line 1: instruction is int, not text",),
         setup=put("d.jsonl", lines({"instruction": 5, "output": "y"}))),
    # --- disperse
    Case("disperse-k-zero", "disperse", "disperse --data {tmp}/d.jsonl --k 0 --out {tmp}/o",
         ("K must be at least 1 (got 0).",), setup=data(), absent=("o",)),
    Case("disperse-k-negative", "disperse", "disperse --data {tmp}/d.jsonl --k -2 --out {tmp}/o",
         ("K must be at least 1 (got -2).",), setup=data(), absent=("o",)),
    Case("disperse-k-larger-than-data", "disperse",
         "disperse --data {tmp}/d.jsonl --k 5 --out {tmp}/o",
         ("K=5 is larger than the number of usable rows (3).",), setup=data(), absent=("o",),
         page=page_for_data("d.jsonl", k=5)),
    Case("disperse-k-not-a-number", "disperse",
         "disperse --data {tmp}/d.jsonl --k four --out {tmp}/o",
         ("argument --k: invalid int value: 'four'",), setup=data(), absent=("o",)),
    Case("disperse-unknown-method", "disperse",
         "disperse --data {tmp}/d.jsonl --k 2 --method dbscan --out {tmp}/o",
         ("argument --method: invalid choice: 'dbscan'",), setup=data(), absent=("o",)),
    Case("disperse-out-has-results", "disperse",
         "disperse --data {tmp}/d.jsonl --k 2 --no-map --out {tmp}/out",
         ("{tmp}/out/assignments.csv already exists: choose another --out, or add --force",),
         setup=both(data(), put("out/assignments.csv", "id,cluster\nmine,0\n"))),
    Case("disperse-out-is-a-file", "disperse",
         "disperse --data {tmp}/d.jsonl --k 2 --no-map --out {tmp}/out",
         ("--out {tmp}/out: exists and is not a folder.",),
         setup=both(data(), put("out", "my file"))),
    Case("disperse-model-not-a-model", "disperse",
         "disperse --data {tmp}/d.jsonl --k 2 --no-map --model {tmp}/notmodel --out {tmp}/o",
         ("{tmp}/notmodel: folder is not a sentence-transformers or transformers model",),
         setup=both(data(), put("notmodel/readme.txt", "hi")), absent=("o",)),
    # --- train
    Case("train-base-not-a-model", "train", TRAIN + " --base {tmp}/notmodel",
         ("{tmp}/notmodel: not a model folder (no config.json).",),
         setup=both(data(), put("notmodel/weights.txt", "hi")), absent=("run",),
         page=lambda e: train_page(e, str(e.tmp / "notmodel"))),
    Case("train-base-missing", "train", TRAIN + " --base {tmp}/nope",
         ("{tmp}/nope: no such model folder.",), setup=data(), absent=("run",)),
    Case("train-base-is-a-data-file", "train", TRAIN + " --base {tmp}/d.jsonl",
         ("{tmp}/d.jsonl: not a model folder (a file, not a folder with config.json).",),
         setup=data(), absent=("run",)),
    Case("train-base-pickle-only-refused", "train", TRAIN + " --base {models}/pickle",
         ("{models}/pickle: no *.safetensors weights, only pickle weights (pytorch_model.bin)",
          "not loaded unless you allow it", "--allow-pickle-weights"),
         setup=data(), absent=("run",),
         page=lambda e: train_page(e, str(e.models / "pickle"))),
    Case("train-base-pickle-only-allowed", "train",
         "train --base {models}/pickle --allow-pickle-weights --data {lab}/data/train.jsonl "
         "--val-data {lab}/data/val.jsonl --steps 1 --log-every 1 --batch-size 8 "
         "--micro-batch-size 8 --max-length 64 --out {tmp}/run",
         ("run ", "2 logged steps", "wrote {tmp}/run/adapter"), code=0,
         check=lambda e: trained_with_pickle(e.tmp / "run")),
    Case("train-base-pickle-not-only-tensors", "train",
         TRAIN + " --base {models}/evil --allow-pickle-weights",
         ("{models}/evil: its pickle weights hold more than tensors and were refused",),
         setup=data(), check=lambda e: pickle_did_not_run(e)),
    Case("train-assignment-of-another-dataset", "train", SUB + " --assignments {tmp}/asg.csv",
         ("{tmp}/asg.csv: its ids are not rows of {tmp}/d.jsonl",
          "(an assignment of another dataset?)"),
         setup=both(data(), put("asg.csv", "id,cluster\nnot-a-row,0\n"))),
    Case("train-assignment-without-columns", "train", SUB + " --assignments {tmp}/asg.csv",
         ("{tmp}/asg.csv: needs the columns id and cluster",),
         setup=both(data(), put("asg.csv", "row,group\na0,0\n"))),
    Case("train-assignment-cluster-not-a-number", "train",
         SUB + " --assignments {tmp}/asg.csv",
         ("{tmp}/asg.csv: line 3: cluster 'two' is not a cluster number",),
         setup=both(data(), put("asg.csv", "id,cluster\na0,0\na1,two\n"))),
    Case("train-cluster-out-of-range", "train",
         f"train {LAB_BASE} --data {{lab}}/data/train.jsonl --kind sub --cluster 5 "
         "--assignments {tmp}/asg.csv --out {tmp}/run",
         ("cluster 5 is out of range: the assignment has clusters 0..1.",),
         setup=lambda e: round_robin_assignment(e.lab, e.tmp / "asg.csv", k=2)),
    Case("train-sub-without-assignment", "train", TRAIN + " --base {tmp}/m --kind sub",
         ("kind 'sub' needs --assignments and --cluster.",), setup=data(), absent=("run",)),
    Case("train-config-unknown-key", "train", "train --config {tmp}/cfg.json --out {tmp}/run",
         ("--config {tmp}/cfg.json: unknown keys stpes.",), setup=put("cfg.json", '{"stpes": 2}'),
         absent=("run",)),
    Case("train-config-not-json", "train", "train --config {tmp}/cfg.json --out {tmp}/run",
         ("{tmp}/cfg.json: not valid JSON",), setup=put("cfg.json", '{"steps": 2,}'),
         absent=("run",)),
    Case("train-lr-negative", "train", TRAIN + " --base m --lr -1",
         ("lr must be a positive number, not -1.0.",), absent=("run",)),
    Case("train-steps-zero", "train", TRAIN + " --base m --steps 0",
         ("steps must be at least 1, not 0.",), absent=("run",)),
    Case("train-batch-not-multiple-of-micro", "train",
         TRAIN + " --base m --batch-size 12 --micro-batch-size 8",
         ("batch_size 12 is not a multiple of micro_batch_size 8.",), absent=("run",)),
    Case("train-out-is-a-file", "train", f"{TRAIN} {LAB_BASE}",
         ("--out {tmp}/run: exists and is not a folder",),
         setup=both(data(), put("run", "my notes"))),
    Case("train-data-empty", "train", f"{TRAIN} {LAB_BASE}",
         ("{tmp}/d.jsonl: the file is empty.",), setup=put("d.jsonl", "")),
    Case("train-missing-flags", "train", "train --base {tmp}", ("train needs --data, --out.",)),
    # --- merge
    Case("merge-weights-nan", "merge", f"{MERGE} {ADAPTERS} --weights nan,1",
         ("--weights nan,1: NaN or infinite values are not weights.",),
         absent=("m",)),
    Case("merge-weights-all-zero", "merge", f"{MERGE} {ADAPTERS} --weights 0,0",
         ("--weights 0,0: all zero; nothing would be merged.",), absent=("m",),
         page=lambda e: merge_page(e, [e.models / "a0", e.models / "a1"], weights=[0.0, 0.0]),
         page_message=("merge weights are all zero: nothing would be merged.",)),
    Case("merge-weights-wrong-count", "merge", f"{MERGE} {ADAPTERS} --weights 1",
         ("--weights 1: 1 weights for 2 adapters: give one weight each (or K per block of "
          "layers, blocks separated by ';').",), absent=("m",)),
    Case("merge-weights-not-numbers", "merge", "merge --base b --adapters x y --weights a,b "
         "--out {tmp}/m", ("--weights a,b: not numbers (K comma-separated numbers per block, "
         "blocks separated by ';').",), absent=("m",)),
    Case("merge-adapter-of-another-base", "merge", MERGE + " {models}/oa0 {models}/oa1",
         ("{models}/oa0: " + ANOTHER_BASE,), absent=("m",),
         page=lambda e: merge_page(e, [e.models / "oa0", e.models / "oa1"]),
         page_message=("{tmp}/runs/sub0/adapter: " + ANOTHER_BASE,)),
    Case("merge-adapters-of-two-bases", "merge", MERGE + " {models}/a0 {models}/oa0",
         ("{models}/oa0 was trained on {models}/other, {models}/a0 on {lab}/model: "
          "adapters of different base models cannot be merged.",), absent=("m",)),
    Case("merge-not-an-adapter", "merge", MERGE + " {models}/a0 {lab}/model",
         ("{lab}/model: not a peft adapter folder (adapter_config.json and "
          "adapter_model.safetensors expected).",), absent=("m",)),
    Case("merge-adapter-config-hand-edited", "merge", MERGE + " {models}/a0 {tmp}/a1",
         ("{tmp}/a1/adapter_config.json: not valid JSON", "it was left as it is"),
         setup=lambda e: (
             shutil.copytree(e.models / "a1", e.tmp / "a1"),
             e.write("a1/adapter_config.json", '{"peft_type": "LORA", "r": 4, # my note\n}'),
         ), absent=("m",)),
    Case("merge-out-not-empty", "merge", f"{MERGE} {ADAPTERS}",
         ("--out {tmp}/m: not empty; choose a new folder.",),
         setup=put("m/my-merge/recipe.json", '{"mine": true}')),
    Case("merge-fisher-without-fisher", "merge", f"{MERGE} {ADAPTERS} --method fisher",
         ("{models}/a0: no fisher.safetensors; the fisher merge needs the Fisher",),
         absent=("m",)),
    Case("merge-base-pickle-only-refused", "merge",
         f"merge --base {{models}}/pickle --adapters {ADAPTERS} --out {{tmp}}/m",
         ("{models}/pickle: no *.safetensors weights", "--allow-pickle-weights"),
         absent=("m",)),
    Case("merge-base-pickle-only-allowed", "merge",
         f"merge --base {{models}}/pickle --allow-pickle-weights --adapters {ADAPTERS} "
         "--out {tmp}/m",
         ("merged 2 adapters (average, weights 0.5,0.5)", "wrote {tmp}/m"), code=0,
         check=lambda e: merged(e.tmp / "m")),
    # --- eval
    Case("eval-unknown-task", "eval",
         "eval --model {tmp} --tasks lab_knowledge,nope --out {tmp}/r.json",
         ("unknown task(s) nope; `python -m dtm eval --list-tasks` prints the known ones.",),
         absent=("r.json",)),
    Case("eval-paper-task-on-quick-engine", "eval",
         "eval --model {lab}/model --tasks gsm8k --out {tmp}/r.json",
         ("the quick engine scores the lab's tasks and a --tasks-dir's only; gsm8k: run "
          "with --engine full",),
         absent=("r.json",)),
    Case("eval-task-dataset-not-downloaded", "eval",
         "eval --model {lab}/model --tasks arc_challenge --engine full --limit 2 "
         "--out {tmp}/r.json",
         ("task arc_challenge: its dataset 'allenai/ai2_arc' is not in the local Hugging Face "
          "cache",), absent=("r.json",)),
    Case("eval-model-missing", "eval", EVAL + " --model {tmp}/no/model",
         ("{tmp}/no/model: no such model folder.",), absent=("r.json",)),
    Case("eval-limit-zero", "eval", EVAL + " --model m --limit 0",
         ("--limit 0: must be at least 1.",), absent=("r.json",)),
    Case("eval-model-not-a-model", "eval", EVAL + " --model {tmp}",
         ("{tmp}: not a model folder (no config.json).",), absent=("r.json",)),
    Case("eval-adapter-of-another-base", "eval",
         EVAL + " --model {lab}/model --adapter {models}/oa0 --limit 2",
         ("{models}/oa0: " + ANOTHER_BASE,), absent=("r.json",)),
    Case("eval-adapter-not-an-adapter", "eval", EVAL + " --model {lab}/model --adapter {tmp}",
         ("{tmp}: not a peft adapter folder (no adapter_config.json).",), absent=("r.json",)),
    Case("eval-code-task-without-opt-in", "eval",
         "eval --model m --tasks humaneval --engine full --out {tmp}/r.json",
         ("humaneval", "--allow-code-execution"), absent=("r.json",)),
    Case("eval-out-is-a-folder", "eval", "eval --model m --tasks lab_knowledge --out {tmp}",
         ("--out {tmp}: is a folder; give a file name such as results.json.",)),
    Case("eval-results-file-hand-edited-not-json", "eval", EVAL + " --model {lab}/model",
         ("--out {tmp}/r.json: exists and is not a results file (not valid JSON: Expecting "
          "property name enclosed in double quotes at line 2 column 3)", "it was left as it is"),
         setup=put("r.json", '{"lab_knowledge": {"acc": 0.5},\n  my notes: base was better\n}')),
    Case("eval-results-file-hand-edited-types", "eval", EVAL + " --model {lab}/model",
         ("--out {tmp}/r.json: exists and is not a results file (lab_knowledge.acc is 'high', "
          "not a number)",),
         setup=put("r.json", '{"lab_knowledge": {"acc": "high", "n": 5}}')),
    Case("eval-base-pickle-only-refused", "eval", EVAL + " --model {models}/pickle --lab {lab}",
         ("{models}/pickle: no *.safetensors weights", "--allow-pickle-weights"),
         absent=("r.json",)),
    Case("eval-base-pickle-only-allowed", "eval",
         EVAL + " --model {models}/pickle --allow-pickle-weights --limit 2 --lab {lab}",
         ("lab_knowledge: {", "(n=2)", "wrote {tmp}/r.json"), code=0),
    # --- experiment files, and the status a run leaves (`dtm run`, the Home page)
    Case("run-experiment-not-yaml", "run", "run {tmp}/exp.yaml",
         ("{tmp}/exp.yaml: not valid YAML",), setup=put("exp.yaml", "name: x\ndisperse: {k: 4\n")),
    Case("run-experiment-unknown-key", "run", "run {tmp}/exp.yaml",
         ("{tmp}/exp.yaml: unknown keys seed;",), setup=lambda e: experiment(e, "seed: 3\n")),
    Case("run-experiment-k-zero", "run", "run {tmp}/exp.yaml",
         ("{tmp}/exp.yaml: disperse.k must be at least 1, not 0.",),
         setup=lambda e: experiment(e, "disperse: {k: 0}\n")),
    Case("run-experiment-unknown-baseline", "run", "run {tmp}/exp.yaml --dry-run",
         ("{tmp}/exp.yaml: baselines ['deita']: choose from",),
         setup=put("exp.yaml", "name: x\nlab: {}\nbaselines: [deita]\n")),
    Case("run-experiment-base-without-data", "run", "run {tmp}/exp.yaml --dry-run",
         ("{tmp}/exp.yaml: give either lab: or both base: and data:.",),
         setup=put("exp.yaml", "name: x\nbase: m\n")),
    Case("run-experiment-train-unknown-key", "run", "run {tmp}/exp.yaml --dry-run",
         ("{tmp}/exp.yaml: train: unknown keys stpes.",),
         setup=put("exp.yaml", "name: x\nlab: {}\ntrain: {stpes: 3}\n")),
    Case("run-status-hand-edited-types", "run", "run {tmp}/exp.yaml",
         ("{cache}/experiments/lab/status.json: stages must be an object",
          "it was left as it is"),
         setup=both(experiment, lambda e: status_file(
             e, '{"state": "done", "pid": 1, "stages": "all of them"}')),
         page=home_page),
    Case("run-status-hand-edited-not-json", "run", "run {tmp}/exp.yaml",
         ("{cache}/experiments/lab/status.json: not valid JSON (Expecting property name",),
         setup=both(experiment, lambda e: status_file(
             e, '{"state": "done", "stages": {"lab": {"state": "done"}}, # ok\n}'))),
    # --- the registry
    Case("registry-corrupt", "registry", "jobs list",
         (NOT_SQLITE, "It was left as it is: move it aside (or set DTM_CACHE)"),
         setup=corrupt_registry, page=lambda e: disperse_page(e, good(e), k=2)),
    Case("registry-corrupt-on-disperse", "registry",
         "disperse --data {tmp}/d.jsonl --k 2 --out {tmp}/o", (NOT_SQLITE,),
         setup=both(data(), corrupt_registry), absent=("o",)),
    Case("registry-truncated", "registry", "jobs list", (NOT_SQLITE,),
         setup=truncated_registry),
    Case("registry-locked", "registry", "jobs list", (LOCKED, "try again when it finishes"),
         during=exclusive_lock),
    Case("registry-locked-on-disperse", "registry",
         "disperse --data {tmp}/d.jsonl --k 2 --out {tmp}/o", (LOCKED,), setup=data(),
         absent=("o",), during=exclusive_lock, page=lambda e: locked_page(e)),
    Case("registry-newer-schema", "registry", "jobs list",
         ("The registry {cache}/registry.sqlite was written by a newer version of dtm "
          f"(schema 99 > {SCHEMA_VERSION})",), setup=lambda e: newer_schema(e)),
    Case("registry-timeout-not-a-number", "registry", "jobs list",
         ("DTM_REGISTRY_TIMEOUT='soon': not a number of seconds.",),
         during=lambda e: env_var("DTM_REGISTRY_TIMEOUT", "soon")),
    # --- jobs
    Case("jobs-unknown-id", "jobs", "jobs resume nope",
         ("no job 'nope' in {cache}/registry.sqlite.",)),
    Case("jobs-resume-a-done-job", "jobs", "jobs resume deadbeef",
         ("job deadbeef0123 is done; only failed, cancelled, interrupted jobs can be resumed.",),
         setup=lambda e: add_job(e, "done")),
    Case("jobs-cancel-a-done-job", "jobs", "jobs cancel deadbeef",
         ("job deadbeef0123 is already done.",), setup=lambda e: add_job(e, "done")),
    # --- the lab
    Case("lab-measure-not-a-lab", "lab", "lab measure --lab {tmp} --out {tmp}/o",
         ("--lab {tmp}: not a built lab (no lab.json).",), absent=("o",)),
    Case("lab-build-over-user-files", "lab", "lab build --size small --out {tmp}/mine",
         ("{tmp}/mine already exists and is not empty: choose another --out, or add --force",),
         setup=put("mine/notes.md", "my notes")),
    Case("lab-build-unknown-size", "lab", "lab build --size huge --out {tmp}/o",
         ("argument --size: invalid choice: 'huge'",), absent=("o",)),
]
# fmt: on


def newer_schema(env: Env) -> None:
    from dtm.store import Registry

    Registry(env.cache)
    con = sqlite3.connect(env.cache / "registry.sqlite")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()


def locked_page(env: Env):
    with exclusive_lock(env):
        return disperse_page(env, env.tmp / "d.jsonl", k=2)


BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids are unique"


# ---------------------------------------------------------------- running a case


@pytest.fixture
def env(request, tmp_path, cache, monkeypatch):
    monkeypatch.setenv("DTM_REGISTRY_TIMEOUT", "1")  # a locked registry fails in 1 s
    work = tmp_path / "work"
    work.mkdir()
    return Env(request, work, cache)


def run_main(argv: list[str]) -> int:
    """``python -m dtm ARGV`` in this process: its exit code (argparse's too)."""
    from dtm.__main__ import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(argv)
    except SystemExit as e:  # argparse refuses a flag
        return e.code if isinstance(e.code, int) else 2
    finally:
        for s, h in handlers.items():  # `train` installs its stop handlers
            signal.signal(s, h)


def prepare(case: Case, env: Env) -> list[str]:
    """Make the case's input; its argv with the placeholders filled in."""
    if case.setup:
        case.setup(env)
    for rel in case.absent:
        assert not (env.tmp / rel).exists(), rel
    return shlex.split(env.fmt(case.argv))


def assert_nothing_lost(env: Env, before: dict[Path, str]) -> None:
    after = env.snapshot()
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed by a refused command: {changed}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli(case: Case, env: Env, capsys):
    argv = prepare(case, env)
    before = env.snapshot()
    capsys.readouterr()
    with case.during(env) if case.during else contextlib.nullcontext():
        t0 = time.perf_counter()
        code = run_main(argv)
        seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    text = out if case.code == 0 else err
    assert code == case.code, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err
    for part in case.message:
        assert env.fmt(part) in text, f"{env.fmt(part)!r} not in:\n{text[-3000:]}"
    if case.code:
        assert "error: " in err
        assert seconds < 30, f"took {seconds:.0f} s to refuse"
        for rel in case.absent:
            assert not (env.tmp / rel).exists(), f"{rel} was created by a refused command"
    assert_nothing_lost(env, before)
    if case.check:
        case.check(env)


PAGE_CASES = [c for c in CASES if c.page]


@pytest.mark.parametrize("case", PAGE_CASES, ids=[c.id for c in PAGE_CASES])
def test_page(case: Case, env: Env):
    """The same input on its page: the same message in an error box (a handled input: the
    rows kept and the load report), no exception, and nothing lost."""
    prepare(case, env)
    before = env.snapshot()
    at = case.page(env)
    assert not at.exception, at.exception
    message = case.message if case.page_message is None else case.page_message
    if case.code:
        shown = with_page_error(at)
        for part in message:
            assert env.fmt(part) in shown, f"{env.fmt(part)!r} not on the page:\n{shown}"
    else:
        assert not at.error, with_page_error(at)
        assert [m.value for m in at.metric if m.label == "Rows kept"] == [str(case.kept)]
        report = "\n".join(c.value for c in at.code)
        for part in message:  # the drop reasons, with their lines
            assert env.fmt(part) in report, report
    assert_nothing_lost(env, before)


REAL = ["data-csv-without-needed-columns", "train-base-pickle-only-refused", "registry-locked"]


@pytest.mark.parametrize("case_id", REAL)
def test_real_cli_prints_the_same(case_id: str, env: Env, capsys):
    """A real ``python -m dtm`` process (the lock held by this one, another process)
    exits 2 with the same message as the in-process run."""
    case = BY_ID[case_id]
    argv = prepare(case, env)
    before = env.snapshot()
    with case.during(env) if case.during else contextlib.nullcontext():
        r = dtm_cli(*argv, cache=env.cache, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "error: " in r.stderr
    for part in case.message:
        assert env.fmt(part) in r.stderr, r.stderr[-2000:]
    assert_nothing_lost(env, before)


def test_the_corpus_covers_every_surface():
    surfaces = {c.surface for c in CASES}
    assert surfaces >= {"data", "disperse", "train", "merge", "eval", "run", "registry", "jobs"}
    assert len(CASES) >= 45 and len(PAGE_CASES) >= 8
    assert all(c.message for c in CASES)
