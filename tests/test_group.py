"""Group runs (``dtm train --kind subs``): K sub-models and SFT over one base in one process,
equal to their separate runs at dropout 0, and as jobs (kill -9, resume, cancel)."""

import json
import os
import signal

import numpy as np
import pytest
from archs import instruction_rows, make_model, write_tasks
from conftest import dtm_cli, round_robin_assignment, tiny_train, write_jsonl

from dtm import jobs
from dtm.store import Registry

# float32 on the CPU: the shared forward pads to another width and batches more rows, so
# the kernels sum in another order (~1e-7 relative per operation); over a run's steps
# these stay far below the differences a wrong data order, init or loss scale makes.
REL = 1e-4


def _records(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _close(a: dict, b: dict) -> float:
    """max |a - b| over every tensor, over max |b|; the key sets must match."""
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny random Qwen2 (not the lab's model) and 60 instruction rows dispersed into
    three unequal clusters (30, 20, 10)."""
    root = tmp_path_factory.mktemp("group")
    base = make_model("qwen2", root / "base")
    rows = instruction_rows(72)
    data = write_jsonl(root / "data.jsonl", rows[:60])
    write_jsonl(root / "val.jsonl", rows[60:])
    write_tasks(root / "tasks")
    asg = root / "asg.csv"
    asg.write_text(
        "id,cluster\n"
        + "".join(
            f"{r['id']},{0 if i % 6 < 3 else 1 if i % 6 < 5 else 2}\n"
            for i, r in enumerate(rows[:60])
        )
    )
    return base, data, asg


FLAGS = {
    "epochs": 2.0,
    "lr": 2e-3,
    "lora_r": 4,
    "lora_alpha": 12,  # alpha != r
    "lora_dropout": 0.0,
    "batch_size": 6,
    "micro_batch_size": 3,  # gradient accumulation, and a short last step each epoch
    "max_length": 64,
    "log_every": 2,
    "probe_size": 6,
    "fisher_size": 5,
    "seed": 5,
}


@pytest.mark.parametrize("grouping", ["auto", "on"])
def test_a_group_run_equals_its_members_separate_runs_at_dropout_0(qwen, tmp_path, grouping):
    """With the plain shuffle (``auto`` on a CPU) and with length-grouped batches."""
    from dtm.jobs.runner import run_training as train
    from dtm.train import TrainConfig

    base, data, asg = qwen
    out = tmp_path / "group"
    scored = {  # a shared validation file and a task scored at step 0 and at the end
        "val_data": str(data.parent / "val.jsonl"),
        "eval_tasks": ("my_mc",),
        "tasks_dir": str(data.parent / "tasks"),
        "eval_every": 1000,
        "group_by_length": grouping,
    }
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    flags += ["--val-data", scored["val_data"], "--eval-tasks", "my_mc"]
    flags += ["--tasks-dir", scored["tasks_dir"], "--eval-every", "1000"]
    flags += ["--group-by-length", grouping]
    r = dtm_cli(
        "train", "--kind", "subs", "--base", base, "--data", data, "--assignments", asg,
        "--with-sft", *flags, "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "cluster-0", "cluster-1", "cluster-2", "group.json", "sft",
    ]  # fmt: skip
    common = {"base": str(base), "data": str(data), **FLAGS, **scored}
    separate = {
        f"cluster-{c}": TrainConfig(
            **common, kind="sub", assignments=str(asg), cluster=c, out=str(tmp_path / f"s{c}")
        )
        for c in range(3)
    }
    separate["sft"] = TrainConfig(**common, kind="sft", out=str(tmp_path / "sft"))
    steps = {}
    for name, cfg in separate.items():
        train(cfg)
        mine, theirs = out / name, tmp_path / cfg.out
        files = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
        if cfg.kind == "sub":
            files.add("fisher.safetensors")
        assert {p.name for p in (mine / "adapter").iterdir()} == files
        got = _tensors(mine / "adapter" / "adapter_model.safetensors")
        want = _tensors(theirs / "adapter" / "adapter_model.safetensors")
        reached = _close(got, want)
        print(f"{name}: adapter max |diff| / max |w| = {reached:.2e}")  # docs/training.md
        assert reached < REL, name
        if cfg.kind == "sub":
            fisher = _tensors(mine / "adapter" / "fisher.safetensors")
            assert _close(fisher, _tensors(theirs / "adapter" / "fisher.safetensors")) < 1e-3
        a, b = _records(mine), _records(theirs)
        assert [x["step"] for x in a] == [x["step"] for x in b]
        assert [x.get("bench") is not None for x in a] == [x.get("bench") is not None for x in b]
        assert a[0]["bench"] == b[0]["bench"] and a[-1]["bench"].keys() == b[-1]["bench"].keys()
        for x, y in zip(a, b, strict=True):
            assert x["epoch"] == pytest.approx(y["epoch"]) and x["lr"] == pytest.approx(y["lr"])
            # the same rows at each step; the shared forward pads to the widest member
            assert x["tokens"] == y["tokens"] and x["padded_tokens"] >= y["padded_tokens"]
            for key in ("train_loss", "val_loss", "probe_loss"):
                if y[key] is None:
                    assert x[key] is None
                else:
                    assert x[key] == pytest.approx(y[key], rel=REL), (name, x["step"], key)
        mine_cfg = json.loads((mine / "config.json").read_text())
        theirs_cfg = json.loads((theirs / "config.json").read_text())
        assert mine_cfg["run_id"] == theirs_cfg["run_id"]  # the same run, trained together
        assert mine_cfg["resolved_steps"] == theirs_cfg["resolved_steps"]
        assert mine_cfg["group_by_length_used"] is theirs_cfg["group_by_length_used"]
        assert theirs_cfg["group_by_length_used"] is (grouping == "on")
        steps[name] = theirs_cfg["resolved_steps"]
    # unequal clusters: members left the batch at different steps
    assert steps["cluster-2"] < steps["cluster-1"] < steps["cluster-0"] < steps["sft"]


def test_group_dropout_follows_the_separate_runs_distribution(qwen):
    """With dropout on, the routed forward of a member's rows has the mean and spread of
    its separate peft model's forward (Monte Carlo over 400 training-mode passes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dtm.train.group import Routing, route

    base, _, _ = qwen
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["down_proj"])
    torch.manual_seed(0)
    solo = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    torch.manual_seed(1)
    group = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg, adapter_name="m000")
    group.add_adapter("m001", cfg)
    with torch.no_grad():  # member m001 carries the solo model's (non-zero) adapter
        for n, p in solo.named_parameters():
            if "lora_" in n:
                w = p if "lora_A" in n else torch.randn_like(p) * 0.5
                p.copy_(w)
                dict(group.named_parameters())[n.replace(".default.", ".m001.")].copy_(w)
    routing = Routing()
    route(group, routing)
    ids = torch.tensor([[5, 9, 3, 7, 2], [4, 4, 8, 1, 6]])
    solo.train(), group.train()
    a, b = [], []
    with torch.no_grad():
        for _ in range(400):
            a.append(solo(input_ids=ids).logits)
            routing.segments = [("m000", 0, 2), ("m001", 2, 4)]
            b.append(group(input_ids=torch.cat([ids, ids])).logits[2:])
            routing.segments = None
    a, b = torch.stack(a), torch.stack(b)
    spread = a.std(0)
    assert float(spread.max()) > 0  # dropout is on: the outputs vary
    se = (spread / np.sqrt(len(a))).clamp_min(1e-6)
    z = ((a.mean(0) - b.mean(0)).abs() / (se * np.sqrt(2))).max()
    assert float(z) < 6, float(z)
    assert float(((b.std(0) - spread).abs() / spread.clamp_min(1e-6)).median()) < 0.15


def test_subs_refuses_bad_clusters_and_mixed_flags_with_exit_2(lab0, tmp_path):
    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    common = ["--base", lab0 / "model", "--data", lab0 / "data" / "train.jsonl"]
    r = dtm_cli("train", "--kind", "subs", *common, "--assignments", asg, "--clusters", "0,5",
                "--out", tmp_path / "o")  # fmt: skip
    assert r.returncode == 2 and "--clusters 0,5" in r.stderr and "0..1" in r.stderr
    r = dtm_cli("train", "--kind", "subs", *common, "--assignments", asg, "--cluster", "1",
                "--out", tmp_path / "o")  # fmt: skip
    assert r.returncode == 2 and "--clusters" in r.stderr
    r = dtm_cli("train", "--kind", "sft", *common, "--with-sft", "--out", tmp_path / "o")
    assert r.returncode == 2 and "kind 'subs'" in r.stderr
    assert not (tmp_path / "o" / "cluster-0").exists()


def _wait(pred, what, timeout=240):
    from test_jobs import wait_for

    return wait_for(pred, timeout=timeout, what=what)


@pytest.mark.fault
def test_a_group_job_after_kill_9_is_interrupted_and_resume_continues_every_member(
    lab0, cache, tmp_path
):
    store = jobs.JobStore(Registry(cache))
    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    big = {"save_every": 5, "log_every": 5, "batch_size": 4, "micro_batch_size": 4}
    members = [
        (f"sub {c}", tiny_train(lab0, "-", kind="sub", assignments=str(asg), cluster=c,
                                steps=[300, 40][c], **big), "random", f"cluster-{c}")
        for c in range(2)
    ] + [("sft", tiny_train(lab0, "-", steps=300, **big), None, "sft")]  # fmt: skip
    group, rows, created = jobs.submit_group(members, name="dtm", group="g", store=store)
    assert created and group.kind == "group" and len(rows) == 3
    again, _, created_again = jobs.submit_group(members, name="dtm", group="g", store=store)
    assert again.id == group.id and not created_again
    by_name = {r.name: r for r in rows}
    short = by_name["sub 1"]
    _wait(lambda: store.get(short.id).state == "done", "the short member to finish")
    assert store.get(group.id).state == "running"  # the others go on
    assert (short.run_dir / "adapter" / "fisher.safetensors").exists()
    long_ckpts = by_name["sub 0"].run_dir / "checkpoints"
    _wait(lambda: store.get(by_name["sub 0"].id).step >= 50, "progress of the long members")
    os.kill(store.get(group.id).pid, signal.SIGKILL)
    _wait(lambda: jobs.refresh(store) and store.get(group.id).state == "interrupted", "interrupted")
    now = {r.name: store.get(r.id).state for r in rows}
    assert now == {"sub 0": "interrupted", "sub 1": "done", "sft": "interrupted"}
    before = {n: max(int(p.name.split("-")[1]) for p in (by_name[n].run_dir / "checkpoints").glob("checkpoint-*"))
              for n in ("sub 0", "sft")}  # fmt: skip
    jobs.restart(by_name["sub 0"].id, resume=True, store=store)  # a member resumes its group
    assert store.get(group.id).state in ("starting", "running")
    _wait(
        lambda: all(store.get(by_name[n].id).step > before[n] + 5 for n in before),
        "both members past their checkpoints",
    )
    jobs.cancel(group.id, store=store)  # graceful: every member saves a checkpoint
    _wait(lambda: jobs.refresh(store) and store.get(group.id).state == "cancelled", "cancelled")
    for n in before:
        r = store.get(by_name[n].id)
        assert r.state == "cancelled"
        saved = max(
            int(p.name.split("-")[1]) for p in (r.run_dir / "checkpoints").glob("checkpoint-*")
        )
        assert saved == r.step > before[n]  # the checkpoint is the step it stopped at
        steps = [x["step"] for x in store.metrics(r.id)]
        assert steps == list(range(0, steps[-1] + 1, 5))  # one curve, no repeats or gaps
    assert store.get(short.id).state == "done"
    log = (group.run_dir / "log.txt").read_text()
    assert "=== attempt 2" in log and "stopped on request" in log
    assert long_ckpts.exists()


@pytest.fixture
def ray_two_nodes():
    """A Ray cluster of two nodes on loopback, started here and stopped after the test: a
    head with no CPUs and a worker node joined with ``ray start --address``, so a job that
    asks for a CPU can only run on the worker. Yields (Jobs API address, worker node id)."""
    import shutil
    import tempfile

    import requests
    from ray.job_submission import JobSubmissionClient
    from test_jobs import (
        HEAD_ARGS,
        _free_port,
        _reachable,
        ray_addresses,
        start_ray_node,
        stop_ray_node,
        wait_for,
    )

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    procs = []
    try:
        gcs = f"127.0.0.1:{_free_port()}"
        head_args = [a for a in HEAD_ARGS if a != "--port=0"] + [f"--port={gcs.split(':')[1]}"]
        head, lines = start_ray_node(
            [*head_args, f"--ray-client-server-port={_free_port()}", "--num-cpus=0"], temp
        )
        procs.append(head)
        api, _ = ray_addresses(lines)
        assert api, "".join(lines)
        worker, lines = start_ray_node([f"--address={gcs}", "--num-cpus=2"], temp, True)
        procs.append(worker)
        wait_for(lambda: _reachable(JobSubmissionClient, api), timeout=120, what="Ray")

        def worker_id():
            nodes = requests.get(f"{api}/api/v0/nodes", timeout=5).json()["data"]["result"]
            alive = [n for n in nodes["result"] if n["state"] == "ALIVE"]
            ids = [n["node_id"] for n in alive if not n["is_head_node"]]
            return ids[0] if len(alive) == 2 and ids else None

        yield api, wait_for(worker_id, timeout=120, what="the worker node to join")
    finally:
        for p in reversed(procs):
            stop_ray_node(p)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_group_is_one_ray_job_and_runs_on_the_worker_node(lab0, cache, tmp_path, ray_two_nodes):
    from ray.job_submission import JobSubmissionClient

    api, worker = ray_two_nodes
    store = jobs.JobStore(Registry(cache))
    asg = round_robin_assignment(lab0, tmp_path / "asg.csv", k=2)
    members = [
        (f"sub {c}", tiny_train(lab0, "-", kind="sub", assignments=str(asg), cluster=c, steps=4),
         "random", f"cluster-{c}")
        for c in range(2)
    ]  # fmt: skip
    group, rows, _ = jobs.submit_group(members, name="dtm", backend=f"ray:{api}", store=store)
    _wait(lambda: jobs.refresh(store) and store.get(group.id).state in jobs.FINAL, "the group")
    assert store.get(group.id).state == "done", store.get(group.id).error
    for r in rows:  # written by the worker node into the shared cache path
        r = store.get(r.id)
        assert r.state == "done" and [x["step"] for x in store.metrics(r.id)] == [0, 2, 4]
        assert (r.run_dir / "adapter" / "fisher.safetensors").exists()
        assert r.run_dir.parent == cache / "runs" / group.id
    from dtm.merge.sources import merge_sources

    [source] = merge_sources(store)  # the Merge page finds the members as sub-models
    assert [p for _, p in source.subs] == [store.get(r.id).run_dir / "adapter" for r in rows]
    client = JobSubmissionClient(api)
    mine = [j for j in client.list_jobs() if (j.metadata or {}).get("dtm_job") == group.id]
    assert len(mine) == 1  # the whole group is one Ray job
    assert client.get_job_info(store.get(group.id).ref).driver_node_id == worker
