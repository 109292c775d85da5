import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["DTM_LAB_AUTOBUILD"] = "0"  # tests build labs explicitly, never in the background
# Every test writes into a cache of its own: the session's (set in ``pytest_configure``,
# not on import: a test's subprocess that imports this module keeps the cache it was
# given), unless a test sets its own (the ``cache`` fixture). Never the checkout's cache/
# and its registry (checked below).
CHECKOUT_CACHE = ROOT / "cache"
SESSION_CACHE: list[str] = []


def cache_listing(root: Path = CHECKOUT_CACHE) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (ns)."""
    out = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def changed_files(before: dict, after: dict) -> list[str]:
    """The files added, removed or changed between two ``cache_listing``s."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="session", autouse=True)
def checkout_cache_untouched():
    """The suite never writes into the checkout's cache/ (its registry, runs, merges):
    the session fails at its end when a file there was added, removed or changed."""
    before = cache_listing()
    yield
    for folder in SESSION_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
    changed = changed_files(before, cache_listing())
    assert not changed, (
        f"the tests wrote into the checkout's cache ({CHECKOUT_CACHE}): {changed[:10]}; a "
        "test must use the `cache` fixture or the session's DTM_CACHE"
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty DTM_CACHE for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DTM_CACHE", str(root))
    return root


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def alpaca(i: int, text: str | None = None) -> dict:
    return {
        "id": f"a{i}",
        "instruction": text or f"Instruction number {i}",
        "input": "",
        "output": f"Response {i}",
    }


def dtm_cli(*args, cache: Path | None = None, timeout: int = 600):
    """Run ``python -m dtm ARGS`` as a real subprocess (offline, optionally in ``cache``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["DTM_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "dtm", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_composition_sentence(sentence: str, ref: list, noun: str, top: int = 10) -> None:
    """``cluster.composition_sentence`` checked against ``ref`` (a Counter of values per
    cluster, counted apart from the code): each cluster's largest value with its rows and
    size, and, for a cluster of at most ``top`` values, exactly the values it lacks of
    those named in any cluster's top ``top``."""
    import re

    assert sentence.startswith(f"By {noun}: "), sentence
    named = set()
    for counts in ref:
        named |= {v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]}
    for c, counts in enumerate(ref):
        n = sum(counts.values())
        if len(counts) == 1:
            [v] = counts
            assert f"cluster {c} holds {n} {v} rows and nothing else" in sentence, sentence
        else:
            m = re.search(rf"cluster {c} is \d+% (\S+) \((\d+) of (\d+)\)", sentence)
            assert m, (c, sentence)
            assert counts[m[1]] == max(counts.values()) == int(m[2]) and int(m[3]) == n
    said = {}
    for m in re.finditer(r"clusters? ([\d, and]+?) ha(?:s|ve) no (.+?) row", sentence):
        for c in re.findall(r"\d+", m[1]):
            said[int(c)] = set(re.split(r", | or ", m[2]))
    lacking = {c: named - set(counts) for c, counts in enumerate(ref) if len(counts) <= top}
    assert said == {c: v for c, v in lacking.items() if v}, sentence


@pytest.fixture(scope="session")
def lab0(tmp_path_factory):
    """One small lab (seed 0) for the whole session: a real tiny Llama, data, benchmarks."""
    from dtm.lab.build import build_lab

    out = tmp_path_factory.mktemp("lab0") / "lab"
    build_lab(out, seed=0, size="small")
    return out


def round_robin_assignment(lab: Path, path: Path, k: int = 2) -> Path:
    """An assignments.csv putting the lab's training rows into k clusters in turn."""
    ids = [json.loads(x)["id"] for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
    path.write_text("id,cluster\n" + "".join(f"{i},{n % k}\n" for n, i in enumerate(ids)))
    return path


def tiny_train(lab: Path, out, **kw):
    """A TrainConfig of a few steps on the lab, fast on a CPU."""
    from dtm.train import TrainConfig

    values = {
        "base": str(lab / "model"),
        "data": str(lab / "data" / "train.jsonl"),
        "val_data": str(lab / "data" / "val.jsonl"),
        "out": str(out),
        "steps": 4,
        "log_every": 2,
        "lr": 1e-3,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_length": 96,
        "probe_size": 16,
        "fisher_size": 8,
        "reference_size": 16,
        "members": 2,
    }
    values.update(kw)
    return TrainConfig(**values)


# --- The reliability summary: bad inputs tried and handled, faults injected and survived ---
# Tests carry one of these marks; the end of the run prints how many ran and passed.
TALLIED = {
    "bad_input": "bad inputs tried {n}, handled {ok}",
    "fault": "faults injected {n}, survived {ok}",
    "security": "security checks {n}, passed {ok}",
}
_tally: dict[str, dict[str, bool]] = {k: {} for k in TALLIED}


def pytest_configure(config):
    SESSION_CACHE.append(tempfile.mkdtemp(prefix="dtm-test-cache-"))
    os.environ["DTM_CACHE"] = SESSION_CACHE[-1]
    config.addinivalue_line("markers", "bad_input: one case of the bad-input corpus")
    config.addinivalue_line("markers", "fault: an injected fault the tool must survive")
    config.addinivalue_line("markers", "security: one security property")
    config.addinivalue_line("markers", "browser: drives the dashboard in headless Chromium")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.user_properties.extend(
            ("tally", k) for k in TALLIED if item.get_closest_marker(k) is not None
        )


def pytest_runtest_logreport(report):
    kinds = [v for k, v in report.user_properties if k == "tally"]
    if not kinds or (report.when != "call" and report.passed):
        return
    for kind in kinds:
        if report.skipped:  # not tried here (e.g. no Chromium): not counted either way
            _tally[kind].pop(report.nodeid, None)
        else:
            _tally[kind][report.nodeid] = report.passed and _tally[kind].get(report.nodeid, True)


def pytest_terminal_summary(terminalreporter):
    if not any(_tally.values()):
        return
    parts = [TALLIED[k].format(n=len(v), ok=sum(v.values())) for k, v in _tally.items() if v]
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line("; ".join(parts))
