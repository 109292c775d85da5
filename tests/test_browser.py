"""The whole flow in a real browser: the dashboard served by `streamlit run app.py`,
driven in headless Chromium as a person would, with a server crash on the way.

Screenshots of each page land in test-artifacts/browser/ (DTM_TEST_ARTIFACTS)."""

from __future__ import annotations

import re
import time

import pytest
from browser import (
    Dashboard,
    OffMachine,
    launch_chromium,
    need_chromium,
    on_this_machine,
    shot,
    wait_idle,
)

from dtm import jobs
from dtm.lab import default_lab_dir
from dtm.store import Registry

pytestmark = pytest.mark.browser
MINUTE = 60_000


@pytest.fixture
def dashboard(cache, lab0, tmp_path):
    need_chromium()
    lab = default_lab_dir()
    lab.parent.mkdir(parents=True)
    lab.symlink_to(lab0, target_is_directory=True)
    app = Dashboard(cache, tmp_path / "streamlit.log").start()
    yield app
    app.stop()
    store = jobs.JobStore(Registry(cache))
    for j in store.list():
        if j.state not in jobs.FINAL:
            jobs.cancel(j.id, store)


def go(page, app, title: str) -> None:
    """Open a page from the sidebar, as a person does."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    page.get_by_role("heading", name=title, level=1).wait_for(timeout=MINUTE)
    wait_idle(page)


def page_done(page, name: str) -> None:
    """No exception on the page; a screenshot kept as a test artifact."""
    from playwright.sync_api import expect

    shot(page, name)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def metric_values(page) -> list[str]:
    return page.get_by_test_id("stMetricValue").all_inner_texts()


def lasso(page, box) -> None:
    """A lasso drawn around the middle of a Plotly chart."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    rx, ry = box["width"] / 3, box["height"] / 3
    page.mouse.move(cx - rx, cy - ry)
    page.mouse.down()
    for x, y in ((cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry), (cx - rx, cy - ry)):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def set_number(page, key: str, value) -> None:
    box = page.locator(f".st-key-{key} input")
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


@pytest.fixture
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        for i, page in enumerate(pg for c in browser.contexts for pg in c.pages):
            shot(page, f"last-{i}")  # where it stood at the end, pass or fail
        browser.close()


@pytest.mark.fault
def test_the_whole_flow_in_chromium_survives_a_server_crash(dashboard, chromium, cache):
    from playwright.sync_api import expect

    app, browser = dashboard, chromium
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app.url)
    page.get_by_role("heading", name="Disperse-Then-Merge", level=1).wait_for(timeout=MINUTE)
    wait_idle(page)
    page_done(page, "1-home")

    # Disperse: the lab's data into K=4 clusters, the map, a lasso, the table.
    go(page, app, "Disperse")
    chart = page.locator(".st-key-disperse_map .js-plotly-plot")
    chart.wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    assert metric_values(page)[2] == "4"
    expect(page.get_by_role("heading", name="Selected rows (0)")).to_be_visible()
    lasso(page, page.locator(".st-key-disperse_map .nsewdrag").first.bounding_box())
    heading = page.get_by_role("heading", name=re.compile(r"Selected rows \([1-9]\d*\)"))
    heading.wait_for(timeout=MINUTE)
    wait_idle(page)
    n = int(re.search(r"\((\d+)\)", heading.inner_text())[1])
    # The table of the selected rows: a grid of n rows and a header row.
    grid = page.get_by_test_id("stDataFrame").locator(f"[role='grid'][aria-rowcount='{n + 1}']")
    expect(grid).to_have_count(1, timeout=MINUTE)
    page_done(page, "2-disperse")
    page.locator(".st-key-save_assignment button").click()
    wait_idle(page)

    # Train: two sessions press the launch button at once.
    pages = [page, browser.new_page(viewport={"width": 1400, "height": 1000})]
    pages[1].goto(app.url)
    wait_idle(pages[1])
    for pg in pages:
        go(pg, app, "Train")
        pg.get_by_text("Hyperparameters").click()
        for key, value in (("hp_steps", 16), ("hp_lr", "0.01"), ("hp_log", 4)):
            set_number(pg, key, value)
        for key, value in (("hp_len", 96), ("hp_batch", 8), ("hp_micro", 8)):
            set_number(pg, key, value)
    for pg in pages:
        pg.locator(".st-key-launch_dtm button").click(no_wait_after=True)
    for pg in pages:
        wait_idle(pg)
        expect(pg.get_by_test_id("stException")).to_have_count(0)
        expect(pg.get_by_test_id("stAlertContentError")).to_have_count(0)
    store = jobs.JobStore(Registry(cache))
    deadline = time.time() + 2 * 60  # on a busy machine the rerun may start after the wait
    while not store.list() and time.time() < deadline:
        time.sleep(1)
    for pg in pages:
        wait_idle(pg)
    names = sorted(j.name for j in store.list())  # one group job: SFT and the sub-models
    assert names == ["dtm set", "sft", "sub 0", "sub 1", "sub 2", "sub 3"]
    pages[1].close()

    # The server dies with jobs running; a new one re-attaches to them.
    app.kill9()
    time.sleep(1)
    app.start()
    page.reload()  # the tab was on the Train page: it comes back to it, through app.py
    page.get_by_role("heading", name="Train", level=1).wait_for(timeout=MINUTE)
    expect(page.get_by_test_id("stSidebar")).to_contain_text("Alignment-tax lab: ready")
    end = time.time() + 600
    while time.time() < end and not all(j.state == "done" for j in store.list()):
        time.sleep(2)
    assert [j.state for j in store.list()] == ["done"] * 6
    page.wait_for_timeout(3000)  # the jobs table refreshes every 2 s
    wait_idle(page)
    expect(page.locator(".st-key-curve_train .js-plotly-plot")).to_be_visible()
    page_done(page, "3-train")

    # Merge: a slider moves, the live score changes.
    go(page, app, "Merge")
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    before = metric_values(page)[:3]
    page.locator(".st-key-w_0 input[type='range']").press("End")
    wait_idle(page)
    for i in (1, 2, 3):
        page.locator(f".st-key-w_{i} input[type='range']").press("Home")
        wait_idle(page)
    expect(page.locator(".st-key-w_0 input[type='range']")).to_have_value("1")
    after = metric_values(page)[:3]
    page_done(page, "4-merge")
    assert after != before, (before, after)
    # The merge landscape at K = 4: a rotatable tetrahedron (WebGL); then a 2-D slice,
    # where a click on one of its points sets the sliders to it.
    page.locator(".st-key-m_land button").click()
    page.locator(".st-key-m_land_chart .js-plotly-plot").wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    expect(page.locator(".st-key-m_land_chart .gl-container")).to_have_count(1)  # a 3-D scene
    page.locator(".st-key-m_view").get_by_text("2-D slice").click()
    wait_idle(page)
    page.locator(".st-key-m_land button").click()
    points = page.locator(".st-key-m_land_chart .scatterlayer .point")
    points.first.wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    points.nth(points.count() // 2).click(force=True)
    wait_idle(page)
    expect(page.locator(".st-key-w_0 input[type='range']")).not_to_have_value("1", timeout=MINUTE)
    weights = [page.locator(f".st-key-w_{i} input[type='range']").input_value() for i in range(4)]
    # the slice moves w0 and w1 over 0, 0.2, ..., 1 and holds the others where they were
    grid = {round(x / 5, 1) for x in range(6)}
    assert {round(float(w), 1) for w in weights[:2]} <= grid and weights[2:] == ["0", "0"]
    page_done(page, "4-merge-landscape")

    # Compare: score the launch, then the benchmark bars and the loss-ratio chart.
    go(page, app, "Compare")
    page.locator(".st-key-c_go button").click()
    page.locator(".st-key-c_bars .js-plotly-plot").wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    expect(page.locator(".st-key-c_ratio_fig .js-plotly-plot")).to_be_visible()
    page_done(page, "5-compare")


@pytest.mark.fault
def test_a_job_killed_mid_run_shows_interrupted_and_resumes_from_the_page(
    dashboard, chromium, cache, lab0
):
    """kill -9 of a training job: the Train page shows it interrupted; its Resume button
    continues it from the checkpoint to the end, one loss curve without repeats."""
    import os
    import signal

    from conftest import tiny_train
    from playwright.sync_api import expect

    store = jobs.JobStore(Registry(cache))
    cfg = tiny_train(
        lab0, "-", steps=400, save_every=5, log_every=5, batch_size=4, micro_batch_size=4
    )
    job, _ = jobs.submit(cfg, name="sft long", group="faults", store=store)
    ckpts = cache / "runs" / job.id / "checkpoints"
    end = time.time() + 240
    while time.time() < end and not (store.get(job.id).step >= 10 and any(ckpts.glob("c*"))):
        time.sleep(0.3)
    assert store.get(job.id).state == "running", "the job ended before it could be killed"
    os.kill(store.get(job.id).pid, signal.SIGKILL)

    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url := dashboard.url)
    go(page, app_url, "Train")
    picked = page.locator(".st-key-job_pick input")  # the selected job: "name · state · id"
    expect(picked).to_have_value(re.compile("^sft long · interrupted"), timeout=MINUTE)
    page_done(page, "6-train-interrupted")
    page.locator(".st-key-job_resume button").click()
    expect(picked).to_have_value(re.compile("^sft long · done"), timeout=4 * MINUTE)
    page_done(page, "7-train-resumed")
    steps = [r["step"] for r in store.metrics(job.id)]
    assert steps == list(range(0, 401, 5)), steps  # the curve went on from the checkpoint
    assert store.get(job.id).attempts == 1


@pytest.mark.parametrize(
    "url, here",
    [
        ("http://127.0.0.1:8501/_stcore/health", True),
        ("ws://127.0.0.1:8501/_stcore/stream", True),
        ("http://127.8.9.10/x", True),
        ("http://[::1]:8501/", True),
        ("http://localhost:8501/", True),
        ("data:image/svg+xml,<svg/>", True),
        ("blob:http://127.0.0.1:8501/0f3c", True),
        ("https://fonts.gstatic.com/s/i/short-term/release/x/hub/default/24px.svg", False),
        ("https://webhooks.fivetran.com/webhooks/x", False),
        ("http://10.0.0.1:8501/", False),
        ("http://[2001:db8::1]/", False),
        ("http://127.0.0.1.example.com/", False),
    ],
)
def test_on_this_machine_tells_loopback_from_the_rest(url, here):
    assert on_this_machine(url) is here


def watched_home(chromium, app):
    """Home in a fresh browser context whose requests off this machine are watched:
    ``(page, OffMachine)``."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    net = OffMachine(context)
    page = context.new_page()
    page.goto(app.url)
    page.get_by_role("heading", name="Disperse-Then-Merge", level=1).wait_for(timeout=MINUTE)
    wait_idle(page)
    return page, net


def test_the_dashboard_asks_nothing_off_the_machine(dashboard, chromium):
    """Home, Disperse (what each cluster holds, random beside k-means) and the other
    pages, on a built lab: the browser asks for no address off this machine. A probe at
    the end shows the watch sees such a request."""
    from playwright.sync_api import expect

    app = dashboard
    page, net = watched_home(chromium, app)
    page_done(page, "offline-1-home")

    go(page, app, "Disperse")
    page.locator(".st-key-composition_chart_0 .js-plotly-plot").wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    expect(page.locator(".st-key-composition_by")).to_contain_text("task")
    by_task = page.get_by_text(re.compile(r"^By task: cluster 0 "))
    expect(by_task).to_have_count(1)
    beside = page.locator(".st-key-composition_beside input")  # a combobox: keys open it
    beside.click()
    beside.press("ArrowDown")
    page.get_by_role("option", name="random", exact=True).click()
    page.locator(".st-key-composition_chart_1 .js-plotly-plot").wait_for(timeout=2 * MINUTE)
    wait_idle(page)
    expect(by_task).to_have_count(2)
    expect(by_task.nth(1)).to_contain_text("every cluster holds every task")
    page_done(page, "offline-2-disperse")

    for title in ("Train", "Merge", "Compare"):
        go(page, app, title)
        expect(page.get_by_test_id("stException")).to_have_count(0)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Home", exact=True).click()
    page.get_by_role("heading", name="Disperse-Then-Merge", level=1).wait_for(timeout=MINUTE)
    wait_idle(page)
    assert net.urls == [], net.urls

    # The watch sees what it looks for (and aborts it: nothing is sent).
    probe = "https://example.com/dtm-offline-probe.png"
    page.evaluate("url => { new Image().src = url; }", probe)
    page.wait_for_timeout(1000)
    assert net.urls == [probe]


# The class story on the small lab (linked as the default lab): K=2, both clusterings, few
# steps, so that it runs in about a minute; Home reads story files from DTM_STORIES.
CLASS_STORY = """\
name: {name}
lab: {{preset: bias, size: default, seed: 0}}
disperse: {{k: 2, methods: [kmeans, random], field: instruction}}
train: {{steps: 48, lr: 3.0e-3, lora_r: 8, lora_alpha: 16, batch_size: 8, micro_batch_size: 8,
        max_length: 96, log_every: 4, probe_size: 32, eval_every: 12}}
baselines: []
merge: {{methods: [average]}}
evaluate: {{engine: quick, limit: 40, frontier: [0.5]}}
seeds: {seeds}
"""


@pytest.fixture
def stories(tmp_path, monkeypatch):
    folder = tmp_path / "stories"
    folder.mkdir()
    (folder / "lab-class.yaml").write_text(CLASS_STORY.format(name="lab-class", seeds="[0]"))
    (folder / "lab.yaml").write_text(CLASS_STORY.format(name="lab", seeds="[0, 1]"))
    monkeypatch.setenv("DTM_STORIES", str(folder))
    return folder


TABLE_JS = """el => {
  const head = [...el.querySelectorAll('thead th')].map(x => x.textContent.trim());
  return [...el.querySelectorAll('tbody tr')].map(tr => {
    const cells = [...tr.querySelectorAll('th, td')].map(x => x.textContent.trim());
    return Object.fromEntries(head.map((h, i) => [h, cells[i]]));
  });
}"""


def test_the_class_story_draws_its_charts_as_results_arrive(stories, dashboard, chromium, cache):
    """Home on a built small lab: the class story starts from its button, its first chart
    is on the page while the story still runs, then every chart comes with its sentence,
    whose numbers are those of the table under it; no request leaves the machine."""
    import json

    from playwright.sync_api import expect
    from story_check import check_panel

    app = dashboard
    page, net = watched_home(chromium, app)
    page.get_by_role("button", name="Run the class story").first.click()
    status_file = cache / "experiments" / "lab-class" / "status.json"
    page.locator(".st-key-home_tax .js-plotly-plot").wait_for(timeout=4 * MINUTE)
    state_at_first_chart = json.loads(status_file.read_text())["state"]
    assert state_at_first_chart == "running", "the first chart came only when the story ended"
    shot(page, "class-1-first-chart")
    keys = ("tax", "ratio", "bars", "keeps")
    for key in keys:
        page.locator(f".st-key-home_{key} .js-plotly-plot").wait_for(timeout=6 * MINUTE)
    expect(page.get_by_text("Done", exact=True)).to_have_count(1, timeout=3 * MINUTE)
    wait_idle(page)
    page_done(page, "class-2-done")
    for key in keys:
        panel = page.locator(f".st-key-home_panel_{key}")
        sentence = panel.get_by_test_id("stCaptionContainer").first.inner_text()
        panel.locator(f".st-key-home_numbers_{key} summary").click()
        table = panel.get_by_test_id("stTable").locator("table").first
        table.wait_for(timeout=MINUTE)
        rows = table.evaluate(TABLE_JS)
        assert rows, key
        check_panel(key, sentence, rows)
    assert json.loads(status_file.read_text())["state"] == "done"
    assert net.urls == [], net.urls


def _groups_of_a_launch(cache, lab0, tmp_path):
    """A launch of two clusterings and two seeds, K=2 each (two tiny sub-models trained
    here, each group's rows pointing at copies of them), and a third k-means sub-model of
    seed 0 training for real: that group is K=3, still training."""
    import shutil
    from dataclasses import asdict, replace

    from conftest import round_robin_assignment, tiny_train

    from dtm.jobs.queue import _new_job
    from dtm.jobs.runner import run_training

    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=3)
    store = jobs.JobStore(Registry(cache))
    trained = []
    for c in (0, 1):
        cfg = tiny_train(lab0, tmp_path / f"t{c}", kind="sub", assignments=str(asg), cluster=c,
                         steps=2, eval_lab=str(lab0))  # fmt: skip
        run_training(cfg)
        trained.append((cfg, tmp_path / f"t{c}" / "adapter"))
    for clustering in ("kmeans", "random"):
        for seed in (0, 1):
            for c, (cfg, adapter) in enumerate(trained):
                jid = f"{clustering}-{seed}-{c}"
                run = cache / "runs" / jid
                shutil.copytree(adapter, run / "adapter")
                config = asdict(replace(cfg, seed=seed, out=str(run)))
                job = _new_job(jid, "sub", f"{clustering} sub {c} s{seed}", "lab", config,
                               "local", run, clustering)  # fmt: skip
                store.add(replace(job, state="done"))
    # The queue runs one CPU job at a time: a long job of another launch holds the third
    # sub-model queued (still training) until the test cancels it.
    blocker, _ = jobs.submit(tiny_train(lab0, "-", steps=100000, log_every=100000),
                             name="blocker", group="other", store=store)  # fmt: skip
    last = tiny_train(lab0, "-", kind="sub", assignments=str(asg), cluster=2, steps=6,
                      eval_lab=str(lab0))  # fmt: skip
    job, _ = jobs.submit(last, name="kmeans sub 2 s0", group="lab", store=store,
                         clustering="kmeans")  # fmt: skip
    return store, job, blocker


def test_merge_groups_keep_the_sliders_and_a_kept_merge_is_a_row_of_its_group(
    dashboard, chromium, cache, lab0, tmp_path
):
    """The Merge page offers the four (clustering, seed) groups by name; a sub-model that
    finishes adds its slider and leaves the others as set; Keep puts the merge on Compare
    under its group, named by its clusters' weights."""
    from playwright.sync_api import expect

    store, job, blocker = _groups_of_a_launch(cache, lab0, tmp_path)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(dashboard.url)
    go(page, dashboard.url, "Merge")
    pick = page.locator(".st-key-m_group")
    pick.click()
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    assert sorted(options) == [
        "lab · k-means, seed 0, K=3",
        "lab · k-means, seed 1, K=2",
        "lab · random, seed 0, K=2",
        "lab · random, seed 1, K=2",
    ], options
    pick.click()
    page.get_by_role("option", name="lab · k-means, seed 0, K=3").click()
    wait_idle(page)
    training = page.get_by_text("2 of 3 finished, still training")
    expect(training).to_be_visible()
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    page.locator(".st-key-w_0 input[type='range']").press("End")
    wait_idle(page)
    page.locator(".st-key-w_1 input[type='range']").press("Home")
    wait_idle(page)
    expect(page.locator(".st-key-w_2")).to_have_count(0)
    assert store.get(job.id).state == "queued"  # behind the blocker: not finished early
    jobs.cancel(blocker.id, store)
    end = time.time() + 4 * 60
    while time.time() < end and store.get(job.id).state not in jobs.FINAL:
        time.sleep(1)
    assert store.get(job.id).state == "done", store.get(job.id).error
    page.locator(".st-key-m_norm label").click()  # any rerun: the page reads the jobs again
    wait_idle(page)
    # the same group, no longer training
    expect(pick.locator("input")).to_have_value("lab · k-means, seed 0, K=3", timeout=MINUTE)
    expect(training).to_have_count(0)
    page.locator(".st-key-w_2").wait_for(timeout=5 * MINUTE)
    wait_idle(page)
    sliders = [page.locator(f".st-key-w_{i} input[type='range']") for i in range(3)]
    expect(sliders[0]).to_have_value("1")  # as the user set them
    expect(sliders[1]).to_have_value("0")
    w = [float(s.input_value()) for s in sliders]  # normalise is off now
    page_done(page, "8-merge-groups")
    page.get_by_role("button", name="Keep for Compare").click()
    wait_idle(page)
    label = "average: " + " · ".join(
        f"c{i} " + (f"{v:.2f}"[1:] if v < 1 else f"{v:.2f}") for i, v in enumerate(w)
    )
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text(label)

    go(page, dashboard.url, "Compare")
    page.locator(".st-key-c_src").click()
    page.get_by_role("option", name="lab · k-means, seed 0, K=3").click()
    wait_idle(page)
    listed = page.get_by_text("Scores go under lab · k-means, seed 0, K=3:")
    expect(listed).to_contain_text(label)
    expect(listed).to_contain_text("dtm · kmeans sub 0 s0")
    page_done(page, "9-compare-kept")
