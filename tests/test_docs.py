"""The README and the lab's guide stay short enough to read, and what they link to exists:
every picture, every docs/ file and every section a link names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"README.md": 250, "docs/lab.md": 400}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w/.])docs/[\w./-]+\.(?:md|png)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def local_links(path: Path) -> list[str]:
    """The relative targets of a Markdown file's links and images."""
    return [t for t in LINK.findall(path.read_text(encoding="utf-8")) if "://" not in t]


@pytest.mark.parametrize("name", LIMITS)
def test_short_enough(name):
    lines = (ROOT / name).read_text(encoding="utf-8").count("\n")
    assert lines <= LIMITS[name], f"{name} has {lines} lines (at most {LIMITS[name]})"


def test_readme_shows_a_picture_of_each_page():
    images = [t for t in LINK.findall((ROOT / "README.md").read_text()) if t.endswith(".png")]
    pages = {Path(t).stem for t in images}
    assert pages >= {"home", "disperse", "train", "merge", "compare"}, images


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_resolve(doc):
    path = ROOT / doc
    missing = []
    for target in local_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            missing.append(target)
    assert not missing, f"{doc} links to what does not exist: {missing}"


def test_docs_files_the_readme_names_exist():
    named = set(DOCS_PATH.findall((ROOT / "README.md").read_text()))
    assert named, "the README names no docs/ file"
    assert not [n for n in sorted(named) if not (ROOT / n).exists()]
