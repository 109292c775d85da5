"""The shape of the code, checked from its source (docs/architecture.md): the package's
import graph goes one way, SQL stays in the store, files and functions stay readable,
and every module and function the architecture page names exists."""

import ast
import functools
import re
from pathlib import Path

import pytest
from conftest import ROOT

DTM = ROOT / "dtm"

# Each folder of dtm/ is one unit; lowest layer first. A unit imports only units of its
# own layer or below, and the units' graph has no cycle.
LAYERS = [
    # the bottom: errors, files and the registry, the task table, data, embeddings,
    # clusters, models and adapters, charts
    {
        "errors",
        "store",
        "threads",
        "tasks",
        "data",
        "embed",
        "cluster",
        "disperse",
        "models",
        "adapters",
        "moe",
        "baselines",
        "samples",
        "charts",
    },
    {"train"},
    {"evaluate"},
    {"merge", "jobs", "score", "score_file", "curate", "controls", "analysis", "lineup"},
    {"experiment", "story", "lab"},
    {"cli", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "lm_eval",
    "umap",
    "ray",
    "optuna",
    "plotly",
    "sentence_transformers",
    "safetensors",
    "datasets",
    "sklearn",
    "accelerate",
)


def modules():
    return _parsed(DTM, ROOT)


@functools.cache
def _parsed(dtm: Path, root: Path) -> list:
    out = []
    for path in sorted(dtm.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((path, name, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dtm" or len(parts) == 1:
        return None
    return parts[1]


def imported(path: Path, name: str, node) -> list[str]:
    """The dtm modules an import statement names (``from dtm import x`` names dtm.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = name.split(".")
            if path.name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if mod == "dtm":
            return [f"dtm.{a.name}" for a in node.names]
        return [mod]
    return []


def edges():
    """(from unit, to unit, where) for every import between dtm units, in functions too."""
    out = []
    for path, name, tree in modules():
        src = unit_of(name)
        for node in ast.walk(tree):
            for mod in imported(path, name, node):
                dst = unit_of(mod)
                if src and dst and dst != src:
                    out.append((src, dst, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(name) for _, name, _ in modules()} - {None}
    assert units - set(LAYER) == set(), "a new unit of dtm/: give it a layer in LAYERS"


def test_no_unit_imports_a_unit_above_its_layer():
    upward = [
        f"{where}: {a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
        for a, b, where in edges()
        if LAYER.get(b, 99) > LAYER.get(a, -1)
    ]
    assert upward == []


def test_the_units_import_each_other_in_no_circle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    # Tarjan's strongly connected components: a component of two or more is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The graph checks above, on a made-up package: they must see what they look for."""
    pkg = tmp_path / "dtm"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("def f():\n    from dtm import score\n")
    (pkg / "score.py").write_text("from dtm.train import f\n")
    monkeypatch.setattr(__import__(__name__), "DTM", pkg)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = {(a, b) for a, b, _ in edges()}
    assert found == {("train", "score"), ("score", "train")}
    with pytest.raises(AssertionError):
        test_no_unit_imports_a_unit_above_its_layer()
    with pytest.raises(AssertionError):
        test_the_units_import_each_other_in_no_circle()


def test_imports_between_dtm_modules_are_at_the_top_or_say_why():
    """An import of a dtm module inside a function keeps a heavy dependency out of a path
    that does not need it, and says so on its line (``# lazy: ...``)."""
    bad = []
    for path, name, tree in modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mods = imported(path, name, node)
                if any(unit_of(m) for m in mods):
                    text = " ".join(lines[node.lineno - 1 : node.end_lineno])
                    if "# lazy:" not in text:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


def test_only_the_store_runs_sql():
    sql = re.compile(r"\bsqlite3\b|\._connect\(|\.execute\(|\.executemany\(|\.transaction\(")
    found = []
    for path in sorted(DTM.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "store" or rel.name == "store.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if sql.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []


def _says_why(text: str | None) -> bool:
    return bool(text) and "length:" in text.lower()


def _code_files():
    yield from sorted(DTM.rglob("*.py"))
    yield from sorted((ROOT / "views").glob("*.py"))
    yield ROOT / "app.py"


def test_files_and_functions_are_short_or_say_why():
    """No file over ~400 lines and no function over ~80 without a reason at its top (its
    docstring, or a comment on the lines right after it, starting "Length:")."""
    long = []
    for path in _code_files():
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        lines = src.splitlines()
        if len(lines) > 420 and not _says_why(ast.get_docstring(tree)):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = fn.end_lineno - fn.lineno + 1
                head = "\n".join(lines[fn.lineno - 1 : fn.body[0].end_lineno + 3])
                if size > 85 and not (_says_why(ast.get_docstring(fn)) or _says_why(head)):
                    long.append(f"{path.relative_to(ROOT)}: {fn.name} ({size} lines)")
    assert long == []


def test_dtm_never_imports_streamlit_or_the_views():
    found = []
    for path, name, tree in modules():
        for node in ast.walk(tree):
            for mod in imported(path, name, node):
                if mod.split(".")[0] in ("streamlit", "views"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# docs/architecture.md: every `dtm/...` path it names exists, and every function or class
# named in a row of its table is defined in the modules that row names.
ARCH = ROOT / "docs" / "architecture.md"


def _defined(paths: list[Path]) -> set[str]:
    names = set()
    for p in paths:
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
    return names


def test_architecture_page_names_only_what_exists():
    text = ARCH.read_text(encoding="utf-8")
    missing = []
    paths = set(re.findall(r"\b((?:dtm|views|bench|studies|tests)/[\w/]*(?:\.py|/))", text))
    assert paths, "the architecture page names no module"
    missing += [p for p in sorted(paths) if not (ROOT / p).exists()]
    rows = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: "):
            continue
        mods = [ROOT / m for m in re.findall(r"`((?:dtm|views)/[\w/]*(?:\.py|/)?)`", cells[1])]
        names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)`", cells[2]) if not n.endswith(".py")]
        if not mods or not names:
            continue
        rows += 1
        have = _defined([m for m in mods if m.exists()])
        missing += [f"{n} in {cells[1]}" for n in names if n.split(".")[-1] not in have]
    assert rows >= 20, "the table of where things happen was not read"
    # the flow: "-> step   module   function, function ..."
    for m in re.finditer(r"(dtm/[\w/]+\.py)\s+([\w, ]+?)(?=\s{2,}|\(|$)", text, re.M):
        mod = ROOT / m.group(1)
        if mod.exists():
            have = _defined([mod])
            missing += [
                f"{n} in {m.group(1)}"
                for n in (x.strip() for x in m.group(2).split(","))
                if n and n not in have
            ]
    assert missing == []
