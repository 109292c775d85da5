"""Security: the server listens on loopback only; no code from a model folder, a pickle or
a benchmark runs without the user's explicit opt-in; no shell; names that become paths stay
inside the cache; uploads are size-limited."""

from __future__ import annotations

import ast
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, dtm_cli

pytestmark = pytest.mark.security
SOURCES = [
    p
    for d in ("dtm", "views", "bench", "studies", "tests")
    for p in (ROOT / d).rglob("*.py")
    if "__pycache__" not in p.parts
] + [ROOT / "app.py"]


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_the_server_binds_to_loopback_by_default(cache, tmp_path):
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    readme = (ROOT / "README.md").read_text()
    assert "--server.address 0.0.0.0" in readme  # how to expose it on purpose
    from browser import Dashboard

    app = Dashboard(cache, tmp_path / "streamlit.log").start()
    try:
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            if not os.path.exists(table):
                continue
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == app.port:  # 0A: LISTEN
                    listening.add(addr)
    finally:
        app.stop()
    assert listening == {"0100007F"}, listening  # 127.0.0.1 and nothing else


def test_no_shell_anywhere():
    found = []
    for path in SOURCES:
        for node in calls(path):
            name = dotted(node.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "commands.getoutput"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} shell=")
    assert not found, found


def test_every_torch_load_is_weights_only_and_no_pickle_is_read():
    found = []
    for path in SOURCES:
        for node in calls(path):
            name = dotted(node.func)
            if name.endswith("torch.load"):
                ok = any(
                    kw.arg == "weights_only"
                    and isinstance(kw.value, ast.Constant)
                    and kw.value.value is True
                    for kw in node.keywords
                )
                if not ok:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
            if name in ("pickle.load", "pickle.loads", "joblib.load", "numpy.load", "np.load"):
                allow = [kw for kw in node.keywords if kw.arg == "allow_pickle"]
                if (
                    name.startswith("pickle")
                    or name.startswith("joblib")
                    or any(
                        not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in allow
                    )
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, found


def custom_code_model(lab0: Path, folder: Path) -> Path:
    """A copy of the lab model whose config asks for its own Python code: the code writes
    the file $DTM_MARKER when it is imported."""
    shutil.copytree(lab0 / "model", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "dtm-custom"
    cfg["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['DTM_MARKER']).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'dtm-custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder


def test_remote_code_runs_only_when_the_user_turns_it_on(lab0, cache, tmp_path, monkeypatch):
    from dtm.train import TrainConfig

    assert TrainConfig(base="", data="", out="").trust_remote_code is False
    model = custom_code_model(lab0, tmp_path / "custom")
    marker = tmp_path / "marker"
    monkeypatch.setenv("DTM_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    args = ["eval", "--model", model, "--lab", lab0, "--tasks", "lab_knowledge", "--limit", 2]
    off = dtm_cli(*args, "--out", tmp_path / "off.json", cache=cache)
    assert off.returncode == 2 and "trust_remote_code" in off.stderr, off.stderr
    assert not marker.exists() and not (tmp_path / "off.json").exists()
    on = dtm_cli(*args, "--trust-remote-code", "--out", tmp_path / "on.json", cache=cache)
    assert marker.read_text() == "ran", on.stderr  # the switch is what lets it run


def test_a_pickle_that_runs_code_is_refused_even_when_pickle_weights_are_allowed(
    lab0, cache, tmp_path, monkeypatch
):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(lab0 / "model", model, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    weights = load_file(lab0 / "model" / "model.safetensors")
    torch.save({**weights, "evil": Payload()}, model / "pytorch_model.bin")
    args = ["eval", "--model", model, "--lab", lab0, "--tasks", "lab_knowledge", "--limit", 2]
    refused = dtm_cli(*args, "--out", tmp_path / "a.json", cache=cache)
    assert refused.returncode == 2 and "--allow-pickle-weights" in refused.stderr
    allowed = dtm_cli(*args, "--allow-pickle-weights", "--out", tmp_path / "b.json", cache=cache)
    assert allowed.returncode == 2 and "more than tensors" in allowed.stderr, allowed.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    ["../../outside", "/etc/passwd", "a/../../b", "..", ".", "", "~root/x", "x\0y", "é/ü" * 60],
)
def test_names_that_become_paths_stay_inside_the_cache(cache, name):
    from dtm.experiment import experiment_dir
    from dtm.store import save_upload

    root = cache.resolve()
    up = save_upload(name, b'{"instruction": "a", "output": "b"}\n').resolve()
    assert up.is_relative_to(root / "uploads") and up.exists()
    assert experiment_dir(name).resolve().parent == root / "experiments"
    assert sorted(p.name for p in cache.iterdir()) == ["uploads"]


def test_uploads_are_size_limited_on_the_server_and_in_the_library(cache):
    from dtm.errors import DTMError
    from dtm.store import save_upload

    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    limit_mb = cfg["server"]["maxUploadSize"]
    assert 0 < limit_mb <= 1024
    assert save_upload.__defaults__[0] == limit_mb << 20  # one limit, two places
    with pytest.raises(DTMError, match="over the upload limit of 1 MiB"):
        save_upload("big.jsonl", b"x" * (2 << 20), max_bytes=1 << 20)
    assert not (cache / "uploads").exists()


def test_code_executing_benchmarks_need_the_opt_in(lab0, cache, tmp_path):
    from dtm.evaluate.harness import CODE_TASKS, check_code_opt_in

    assert {"humaneval", "mbpp"} <= set(CODE_TASKS)
    r = dtm_cli(
        "eval", "--model", lab0 / "model", "--tasks", "humaneval", "--engine", "full",
        "--out", tmp_path / "r.json", cache=cache,
    )  # fmt: skip
    assert r.returncode == 2 and "--allow-code-execution" in r.stderr
    assert not (tmp_path / "r.json").exists()
    check_code_opt_in(["humaneval"], allow_code=True)  # the opt-in is what lets it through
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
