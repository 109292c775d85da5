"""Background jobs with real processes and a real SQLite registry: the queue, duplicate
launches, kill -9 and resume, cancel, a restarted server, and a real local Ray head."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, dtm_cli, round_robin_assignment, tiny_train

from dtm import jobs
from dtm.store import Registry


def wait_for(pred, timeout=240, poll=0.5, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def states(store):
    return {j.id: j.state for j in jobs.refresh(store)}


def test_queue_runs_one_cpu_job_at_a_time_and_never_duplicates(lab0, cache, tmp_path):
    store = jobs.JobStore(Registry(cache))
    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    cfgs = [
        tiny_train(lab0, "-", kind="sub", assignments=str(asg), cluster=c, steps=6)
        for c in range(2)
    ]
    a, created_a = jobs.submit(cfgs[0], group="g", store=store)
    b, created_b = jobs.submit(cfgs[1], group="g", store=store)
    again, created_again = jobs.submit(cfgs[0], group="g", store=store)
    assert created_a and created_b and not created_again and again.id == a.id
    assert b.state == "queued"  # one CPU job at a time by default
    seen_parallel = []

    def all_done():
        s = states(store)
        seen_parallel.append(sum(v in jobs.ACTIVE for v in s.values()))
        return all(v == "done" for v in s.values()) and s

    wait_for(all_done, what="both jobs done")
    assert max(seen_parallel) == 1
    assert len(store.list()) == 2
    for j in (a, b):
        recs = store.metrics(j.id)
        assert [r["step"] for r in recs] == [0, 2, 4, 6]
        assert (cache / "runs" / j.id / "adapter" / "adapter_model.safetensors").exists()
        assert "step 6: train_loss" in (cache / "runs" / j.id / "log.txt").read_text()


@pytest.mark.fault
def test_kill_9_shows_interrupted_and_resume_continues_from_the_checkpoint(lab0, cache):
    store = jobs.JobStore(Registry(cache))
    cfg = tiny_train(
        lab0, "-", steps=400, save_every=5, log_every=5, batch_size=4, micro_batch_size=4
    )
    job, _ = jobs.submit(cfg, store=store)
    ckpts = cache / "runs" / job.id / "checkpoints"
    wait_for(
        lambda: store.get(job.id).step >= 12 and list(ckpts.glob("checkpoint-*")),
        what="a checkpoint",
    )
    os.kill(store.get(job.id).pid, signal.SIGKILL)
    wait_for(lambda: states(store)[job.id] == "interrupted", what="interrupted")
    done_before = max(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    job = jobs.restart(job.id, resume=True, store=store)
    assert job.state in ("starting", "running")
    wait_for(lambda: store.get(job.id).step > done_before + 5, what="progress after resume")
    jobs.cancel(job.id, store=store)  # graceful: saves a checkpoint, then stops
    wait_for(lambda: states(store)[job.id] == "cancelled", what="cancelled")
    recs = store.metrics(job.id)
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)) and steps[0] == 0  # one curve, no repeats or gaps
    assert steps == list(range(0, steps[-1] + 1, 5))
    log = (cache / "runs" / job.id / "log.txt").read_text()
    assert "=== attempt 2" in log and "stopped on request" in log
    assert store.get(job.id).attempts == 1


@pytest.mark.fault
def test_jobs_survive_their_launcher_and_are_seen_by_a_new_process(lab0, cache):
    """The launching process (a dashboard server) exits; a fresh process re-attaches."""
    cfg = tiny_train(lab0, "-", steps=40, log_every=10)
    code = (
        "import sys; sys.path.insert(0, 'tests'); from conftest import tiny_train; "
        "from pathlib import Path; from dtm import jobs; "
        f"j, _ = jobs.submit(tiny_train(Path({str(lab0)!r}), '-', steps=40, log_every=10)); "
        "print(j.id)"
    )
    env = {**os.environ, "DTM_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip()
    from dtm.train import run_id

    assert jid == run_id(tiny_train(lab0, "other-out", steps=40, log_every=10)) == run_id(cfg)
    listed = dtm_cli("jobs", "list", cache=cache)
    assert listed.returncode == 0 and jid[:12] in listed.stdout
    assert dtm_cli("jobs", "wait", jid, "--timeout", "240", cache=cache).returncode == 0
    out = dtm_cli("jobs", "list", cache=cache).stdout
    assert "done" in out and "40/40" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(multi_node: bool = False) -> dict:
    bin_dir = os.path.dirname(sys.executable)
    return {
        **os.environ,
        # 0: a single node, else Ray rebinds 127.0.0.1 to the host IP; a node joining a head
        # needs 1 (its --node-ip-address keeps it on loopback)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOSCALER_METRIC_PORT": str(_free_port()),
        "DASHBOARD_METRIC_PORT": str(_free_port()),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def start_ray_node(
    args: list[str], temp: str, multi_node: bool = False
) -> tuple[subprocess.Popen, list[str]]:
    """``ray start --block ARGS`` on loopback in its own session; returns the process
    and its output up to "will now block" (the rest is drained in a thread).

    ``multi_node``: a node joining a head with ``--address``. Ray turns a loopback
    address to join into the host's IP (``resolve_ip_for_localhost``), where a head on
    loopback does not listen, so that one ``ray start`` keeps the address as given."""
    import threading

    bin_dir = os.path.dirname(sys.executable)
    ray_cli = [os.path.join(bin_dir, "ray")]
    if multi_node:
        ray_cli = [
            sys.executable,
            "-c",
            "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
            "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()",
        ]
    cmd = [
        *ray_cli,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--object-store-memory=200000000",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        "--log-style=record",
        "--log-color=false",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        env=ray_env(multi_node),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "will now block" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, lines


def stop_ray_node(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # agents that outlive the node process
        except ProcessLookupError:
            pass


HEAD_ARGS = [
    "--head",
    "--port=0",
    "--include-dashboard=true",
    "--dashboard-host=127.0.0.1",
    "--dashboard-port=0",
    "--dashboard-agent-listen-port=0",
]


def ray_addresses(lines: list[str]) -> tuple[str | None, None]:
    """(the Jobs API address, None) from a head's output."""
    import re

    api = None
    for line in lines:
        m = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", line)
        api = api or (m and m.group(1))
    return api, None


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on loopback only, started here (``ray start --head --block`` in its
    own session) and stopped after the module without touching any other Ray on the
    machine. The temp dir is short: Ray's unix socket paths must fit in 107 bytes."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    proc, lines = start_ray_node(
        [*HEAD_ARGS, f"--ray-client-server-port={_free_port()}", "--num-cpus=2"], temp
    )
    try:
        address, _ = ray_addresses(lines)
        assert address, "".join(lines)
        from ray.job_submission import JobSubmissionClient

        wait_for(lambda: _reachable(JobSubmissionClient, address), timeout=120, what="Ray")
        yield address
    finally:
        stop_ray_node(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _reachable(client_cls, address):
    try:
        client_cls(address).list_jobs()
        return True
    except Exception:
        return False


def test_ray_backend_runs_cancels_and_logs_on_a_real_head(lab0, cache, ray_head):
    store = jobs.JobStore(Registry(cache))
    backend = f"ray:{ray_head}"
    done, _ = jobs.submit(tiny_train(lab0, "-", steps=4), backend=backend, store=store)
    slow, _ = jobs.submit(
        tiny_train(lab0, "-", steps=2000, save_every=10, batch_size=2, micro_batch_size=2),
        backend=backend,
        store=store,
    )
    wait_for(lambda: states(store)[done.id] in jobs.FINAL, what="the Ray job to finish")
    assert store.get(done.id).state == "done", store.get(done.id).error
    recs = store.metrics(done.id)
    assert [r["step"] for r in recs] == [0, 2, 4]
    assert (cache / "runs" / done.id / "adapter" / "adapter_model.safetensors").exists()
    job = store.get(done.id)
    assert job.ref.startswith("dtm-") and "step 4: train_loss" in jobs.backend_for(backend).logs(
        job, 10_000
    )
    wait_for(lambda: store.get(slow.id).step >= 12, what="the second Ray job to run")
    jobs.cancel(slow.id, store=store)
    wait_for(lambda: states(store)[slow.id] == "cancelled", what="the Ray job to stop")
    assert list((cache / "runs" / slow.id / "checkpoints").glob("checkpoint-*"))


def test_experiment_dry_runs_print_the_plan_without_loading_anything(cache):
    r = dtm_cli("run", "experiments/paper-llama2-7b.yaml", "--dry-run", cache=cache)
    assert r.returncode == 0, r.stderr
    # the soup of seed 0 averages SFT of seeds 0-3: three more SFT runs, planned as such
    assert "14 training runs" in r.stdout and "GPU-hours" in r.stdout
    [soup] = [x for x in r.stdout.splitlines() if "soup s0" in x]
    assert soup.split("averages ")[1] == (
        "sft s0, sft s1 (soup member), sft s2 (soup member), sft s3 (soup member), after "
        "the other runs"
    ), soup
    [curate] = [x for x in r.stdout.splitlines() if "curate s0" in x]
    assert f"~{326154 // 4:>7} rows" in curate  # the budget: 1/K of estimate.rows
    assert "train together: one group job" in r.stdout
    assert "kmeans sub 3 s0" in r.stdout and "meta-llama/Llama-2-7b-hf" in r.stdout
    assert not (cache / "runs").exists()
    r = dtm_cli("run", "experiments/lab.yaml", "--dry-run", cache=cache)
    # seeds 0-2 and the soups' other members, seeds 3-5: six SFT runs, not 3 + 3 x 4
    assert r.returncode == 0 and "48 training runs" in r.stdout, r.stderr
    assert "train together" in r.stdout
    assert len(re.findall(r" sft +~ +800 rows", r.stdout)) == 6, r.stdout
    [curate] = [x for x in r.stdout.splitlines() if "curate s1" in x]
    assert curate.split()[-4:] == ["200", "rows", f"{900 * 200 // 800}", "steps"], curate
    apart = cache.parent / "apart.yaml"
    text = (ROOT / "experiments" / "lab.yaml").read_text()
    assert "  steps: 900\n" in text
    apart.write_text(text.replace("  steps: 900\n", "  steps: 900\n  together: false\n"))
    r = dtm_cli("run", apart, "--dry-run", cache=cache)
    assert r.returncode == 0 and "48 training runs" in r.stdout, r.stderr
    assert "train together" not in r.stdout
    assert not (cache / "lab").exists()


def test_run_experiment_end_to_end_on_the_small_lab(cache, tmp_path):
    exp = tmp_path / "tiny.yaml"
    exp.write_text(
        "name: tiny\nlab: {size: small, seed: 0}\ndisperse: {k: 2, methods: [random]}\n"
        "train: {steps: 4, log_every: 2, batch_size: 8, micro_batch_size: 8, max_length: 96,"
        " eval_every: 4, members: 2}\nbaselines: [l2, soup]\nseeds: [0]\n"
        "merge: {methods: [average], blocks: 2, learn_steps: 2}\n"
        "evaluate: {hma: [0, 1]}\n"
    )
    r = dtm_cli("run", exp, cache=cache, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 training runs" in r.stdout  # and the soup's other member: SFT with seed 1
    out = cache / "experiments" / "tiny"
    assert (out / "jobs.md").read_text().count("| done |") == 6
    results = (out / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in results.splitlines() if line[:2] == "| "}
    for model in (
        "base",
        "sft",
        "sft ×1/2",
        "dtm-random",
        "sub-random-0",
        "sub-random-1",
        "l2",
        "soup",
    ):
        assert model in rows, results
    # The shrinkage frontier: its points in their own table, the merge placed against it
    assert "## DTM against the shrinkage frontier" in results
    frontier = results.split("## DTM against the shrinkage frontier", 1)[1]
    frontier = frontier.split("## DTM against the per-block frontier", 1)[0]
    for point in ("| base |", "| sft ×0.25 |", "| sft ×1/2 |", "| sft ×0.75 |", "| sft |"):
        assert point in frontier, frontier
    placed = [x for x in frontier.splitlines() if x.startswith("| dtm-random | lab_knowledge")]
    assert len(placed) == 2 and all(
        x.split(" | ")[3] in ("above", "on", "below", "beyond") for x in placed
    ), placed
    # The per-block frontier (2 layers: 2 blocks, scales 0 and 1: 2 points) and the
    # per-block DTM merge learned on the validation rows, placed against both fronts
    assert "## DTM against the per-block frontier" in results
    per_block = results.split("## DTM against the per-block frontier", 1)[1]
    assert "sft ×[" in per_block and "| dtm-random-blocks | lab_" in per_block
    assert "| dtm-random-blocks |" in frontier and "sft ×[0/1]" not in rows
    assert "dtm-random-blocks" in rows  # in the main table, a merge like the others
    learned = json.loads((out / "learned" / "dtm-random-s0.json").read_text())
    assert len(learned["path"]) == 3 and len(learned["best"]["weights"][0]) == 2
    assert "Loss-reduction ratio" in results and "| knowledge |" in results.replace(
        "| model | knowledge |", "| knowledge |"
    )
    assert (out / "merged" / "dtm-random-s0" / "recipe.json").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and all(
        s["state"] == "done" for s in status["stages"].values()
    ), status
    from dtm.score import scores

    scored = scores(group="tiny", registry=Registry(cache))
    assert set(scored["label"]) >= {"base", "sft", "dtm-random", "l2"}
    accuracy = scored[scored["metric"].str.startswith("acc")]
    assert len(accuracy) and accuracy["value"].between(0, 1).all()
    store = jobs.JobStore(Registry(cache))
    listed = store.list(group="tiny")
    assert sorted(j.name for j in listed) == [
        "dtm s0",  # the group job: SFT and the sub-models in one process
        "l2 s0",
        "random sub 0 s0",
        "random sub 1 s0",
        "sft s0",
        "sft s1 (soup member)",  # a run of its own: the group's id does not depend on it
        "soup s0",
    ]
    grp = next(j for j in listed if j.kind == "group")
    assert {j.parent for j in listed if j.kind == "sub"} == {grp.id}
    member = next(j for j in listed if j.name == "sft s1 (soup member)")
    assert next(j for j in listed if j.name == "sft s0").parent == grp.id
    assert member.parent is None and member.config["seed"] == 1
    # The soup trains nothing: it averages the SFT runs of seeds 0 and 1, exactly
    soup = next(j for j in listed if j.kind == "soup")
    sfts = [grp.run_dir / "sft" / "adapter", member.run_dir / "adapter"]
    assert json.loads((soup.run_dir / "config.json").read_text())["members"] == [
        str(p) for p in sfts
    ]
    assert not (soup.run_dir / "members").exists()
    assert soup.started >= member.ended  # submitted once its members had ended
    # The Jobs table shows the members' steps and curves, though nothing was trained here
    assert (soup.step, soup.total_steps) == (8, 8), (soup.step, soup.total_steps)
    own = [store.metrics(next(j for j in listed if j.name == "sft s0").id)]
    own.append(store.metrics(member.id))
    curves = store.metrics(soup.id)
    assert len(curves) == len(own[0]) + len(own[1]) > 2, curves
    for rec in curves:
        [same] = [r for r in own[rec["member"]] if r["step"] == rec["step"]]
        assert (rec["val_loss"], rec["probe_loss"]) == (same["val_loss"], same["probe_loss"])
    from dtm.merge.sources import merge_sources

    [source] = [x for x in merge_sources(store) if x.group == "tiny"]
    assert {"sft s0", "l2 s0", "soup s0"} <= set(source.baselines)
    assert "sft s1 (soup member)" not in source.baselines  # not a model of the results
    assert [json.loads((p.parent / "config.json").read_text())["seed"] for p in sfts] == [0, 1]
    from dtm.merge import read_adapter

    def dense(adapter):  # layer -> s * B @ A
        layers = read_adapter(adapter).layers
        return {n: s * (b.float() @ a.float()) for n, (a, b, s) in layers.items()}

    souped, parts = dense(soup.run_dir / "adapter"), [dense(p) for p in sfts]
    assert souped.keys() == parts[0].keys()
    for name, d in souped.items():
        torch.testing.assert_close(d, (parts[0][name] + parts[1][name]) / 2, rtol=1e-5, atol=1e-7)
    sub = next(j for j in listed if j.name == "random sub 0 s0")
    assert sub.config["steps"] == 2  # same epochs: half the rows, half the steps
    sft = next(j for j in listed if j.kind == "sft")
    assert "bench" in store.metrics(sft.id)[-1]  # the lab's benchmarks on the curve
    # The Home page's pictures, each sentence written from these very scores
    from dtm.experiment import load_experiment
    from dtm.story import story_panels

    panels = {p["key"]: p for p in story_panels(load_experiment(exp), listed, scored)}
    assert {"tax", "bars", "keeps"} <= set(panels), list(panels)
    mean = scored.groupby(["label", "task", "metric"])["value"].mean()
    know = mean[("dtm-random", "lab_knowledge", "acc")]
    assert (
        f"knowledge {know:.3f} against SFT's {mean[('sft', 'lab_knowledge', 'acc')]:.3f}"
        in (panels["bars"]["sentence"])
    )
    keeps = panels["keeps"]["frame"]
    assert set(keeps["role"]) >= {"SFT", "DTM", "SFT ×1/K", "sub-model"}
    base_fav = mean[("base", "lab_knowledge", "favourite_flan")]
    flan_dtm = keeps[(keeps["what"] == "flan's favourite") & (keeps["role"] == "DTM")]["value"]
    assert float(flan_dtm.iloc[0]) == pytest.approx(
        mean[("dtm-random", "lab_knowledge", "favourite_flan")] - base_fav
    )
    again = dtm_cli("run", exp, cache=cache, timeout=300)
    assert again.returncode == 0 and len(store.list()) == 7  # nothing trained twice
    assert json.loads((sub.run_dir / "config.json").read_text())["kind"] == "sub"
    assert sub.run_dir == grp.run_dir / "random" / "cluster-0"
