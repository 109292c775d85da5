"""The README's pictures of the dashboard: `make screenshots`
(`.venv/bin/python -m tests.screenshots [--keep DIR]`).

In a private temporary DTM_CACHE it builds the small lab, runs a short lab story on it
(one seed, a few hundred tiny steps), serves the dashboard on a free loopback port, drives
headless Chromium (as tests/test_browser.py does) to each page and writes
docs/img/<page>.png. It never touches the checkout's cache/ and never builds the default
lab. It prints how long the lab and the story took (1694 s on a 2-core CPU shared with
other work; most of it pretraining the small lab's model), then each picture's size."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.browser import CHROMIUM, ROOT, Dashboard, launch_chromium, wait_idle

OUT = ROOT / "docs" / "img"
MINUTE = 60_000
WIDTH, MAX_HEIGHT = 1280, 2600
# The Home page draws the story of experiments/lab.yaml (name: lab); this one has its name,
# K and clusterings, on the small lab, one seed and few steps.
STORY = """\
name: lab
lab: {preset: bias, size: small, seed: 0}
disperse: {k: 4, methods: [kmeans], field: instruction}
train: {steps: 120, lr: 3.0e-3, lora_r: 8, lora_alpha: 16, batch_size: 8, micro_batch_size: 8,
        max_length: 96, log_every: 4, probe_size: 32, eval_every: 30}
baselines: [l2]
merge: {methods: [average]}
evaluate: {engine: quick}
seeds: [0]
"""


def run_story(cache: Path, tmp: Path) -> None:
    path = tmp / "lab.yaml"
    path.write_text(STORY)
    env = {**os.environ, "DTM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "dtm", "run", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"the story failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"small lab and story: {time.time() - t0:.0f} s", flush=True)


def save(page, name: str) -> Path:
    """The page down to MAX_HEIGHT (Streamlit scrolls inside its main block, so the
    viewport is stretched to the block's height), as a 256-colour PNG."""
    from PIL import Image

    height = page.evaluate(
        "() => Math.max(document.querySelector('[data-testid=stMain]')?.scrollHeight || 0,"
        " document.body.scrollHeight)"
    )
    page.set_viewport_size({"width": WIDTH, "height": min(max(height, 800), MAX_HEIGHT)})
    page.wait_for_timeout(1500)  # Plotly redraws at the new size
    raw = OUT / f".{name}.raw.png"
    page.screenshot(path=str(raw))
    page.set_viewport_size({"width": WIDTH, "height": 900})
    path = OUT / f"{name}.png"
    with Image.open(raw) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    raw.unlink()
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB", flush=True)
    return path


def go(page, title: str) -> None:
    """Open a page from the sidebar, as a person does."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    page.get_by_role("heading", name=title, level=1).wait_for(timeout=MINUTE)
    wait_idle(page)


def lasso(page, box) -> None:
    """A lasso drawn around the middle of a Plotly chart."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    rx, ry = box["width"] / 4, box["height"] / 4
    page.mouse.move(cx - rx, cy - ry)
    page.mouse.down()
    for x, y in ((cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry), (cx - rx, cy - ry)):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def pages(url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.goto(url)
        page.get_by_role("heading", name="Disperse-Then-Merge", level=1).wait_for(timeout=MINUTE)
        page.locator(".js-plotly-plot").nth(3).wait_for(timeout=2 * MINUTE)  # the story's 4
        wait_idle(page)
        save(page, "home")

        go(page, "Disperse")
        page.locator(".st-key-disperse_map .js-plotly-plot").wait_for(timeout=5 * MINUTE)
        wait_idle(page)
        lasso(page, page.locator(".st-key-disperse_map .nsewdrag").first.bounding_box())
        page.get_by_role("heading", name=re.compile(r"Selected rows \([1-9]\d*\)")).wait_for(
            timeout=MINUTE
        )
        wait_idle(page)
        save(page, "disperse")

        go(page, "Train")
        page.locator(".st-key-curve_train .js-plotly-plot").wait_for(timeout=MINUTE)
        wait_idle(page)
        save(page, "train")

        go(page, "Merge")
        page.get_by_test_id("stMetricValue").first.wait_for(timeout=5 * MINUTE)
        wait_idle(page)
        page.locator(".st-key-m_land button").click()
        page.locator(".st-key-m_land_chart .scatterlayer .point").first.wait_for(timeout=5 * MINUTE)
        wait_idle(page)
        save(page, "merge")

        go(page, "Compare")
        page.locator(".st-key-c_bars .js-plotly-plot").wait_for(timeout=5 * MINUTE)
        wait_idle(page)
        save(page, "compare")
        browser.close()


def main(argv: list[str]) -> None:
    """``--keep DIR``: work in DIR (a new or an earlier run's) and leave it there, so a
    second run reuses the lab and the story and only retakes the pictures."""
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM} (make test installs Debian's chromium)")
    OUT.mkdir(parents=True, exist_ok=True)
    keep = Path(argv[1]).resolve() if argv[:1] == ["--keep"] and len(argv) == 2 else None
    tmp = keep or Path(tempfile.mkdtemp(prefix="dtm-shots-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cache = tmp / "cache"
    os.environ.update(DTM_CACHE=str(cache), DTM_LAB_AUTOBUILD="0", HF_HUB_OFFLINE="1")
    app = None
    try:
        run_story(cache, tmp)
        from dtm.lab import default_lab_dir

        # The dashboard's default lab is the small one built for the story.
        if not default_lab_dir().is_symlink():
            default_lab_dir().symlink_to(default_lab_dir(0, "small"), target_is_directory=True)
        app = Dashboard(cache, tmp / "streamlit.log").start()
        pages(app.url)
    finally:
        if app is not None:
            app.stop()
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
