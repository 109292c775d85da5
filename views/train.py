"""Page 2 - Train: launch the DTM sub-models, vanilla SFT and the baselines as background
jobs, and watch them live."""

from __future__ import annotations

import os
import time
from dataclasses import fields

import streamlit as st

from dtm import charts, jobs
from dtm.disperse import cluster_sizes, data_lab, saved_assignments, training_inputs
from dtm.errors import DTMError
from dtm.experiment import dtm_set, together_members
from dtm.experiment.report import jobs_frame
from dtm.lab import lab_status
from dtm.lab.measure import lab_recipe
from dtm.tasks import PROBES, TASKS
from dtm.tasks.files import folder_tasks
from dtm.train.config import BASELINES, TrainConfig
from dtm.train.memory import launch_note
from dtm.train.split import split_note
from views.common import registry

FIELDS = {f.name: f for f in fields(TrainConfig)}


def store() -> jobs.JobStore:
    return jobs.JobStore(registry())


def choose_inputs() -> dict | None:
    """The data, assignment, base model and validation data, or None when not ready."""
    lab = lab_status()
    saved = saved_assignments(store().registry)
    if not saved:
        st.info(
            "No saved cluster assignment yet: on the Disperse page, cluster the data and "
            "press **Save for training**."
        )
        return None
    labels = {
        a.key: f"{a.name} (K={a.meta['k']}, {a.meta['method']}, seed {a.meta['seed']})"
        for a in saved
    }
    key = st.selectbox(
        "Cluster assignment", list(labels), format_func=labels.get, key="train_assignment"
    )
    asg = next(a for a in saved if a.key == key)
    try:
        inputs = training_inputs(asg, store().registry)
    except DTMError as e:
        st.error(str(e))
        return None
    # the lab the data belongs to, of any size or seed, else the default lab when ready
    own_lab = data_lab(inputs["data"])
    lab_path = own_lab or (lab["path"] if lab["state"] == "ready" else None)
    lab_data = own_lab is not None
    bases = (["Lab base model"] if lab_path else []) + ["Model folder or hub id"]
    kind = st.radio("Base model", bases, horizontal=True, key="train_base_kind")
    if kind == "Lab base model":
        base = os.path.join(lab_path, "model")
    else:
        base = st.text_input("Model folder or hub id", key="train_base_path").strip()
        if not base:
            return None
    val = os.path.join(lab_path, "data", "val.jsonl") if lab_data else None
    st.caption(
        f"Data `{inputs['data']}` · validation: "
        f"{'the lab validation split' if val else '5% held out of the data'}"
    )
    return {
        **inputs,
        "base": base,
        "val_data": val,
        "lab": lab_path if lab_data else None,
        "clustering": asg.meta["method"],
    }


def hyperparameters(lab: str | None) -> dict:
    """The form's values; a lab's run starts from its preset's SFT recipe."""
    d = TrainConfig(base="", data="", out="")
    preset = lab_recipe(lab) if lab else {}
    with st.expander("Hyperparameters", expanded=False):
        c = st.columns(4)
        steps = c[0].number_input(
            "Steps (0: by epochs)", 0, 10**7, preset.get("steps", 0), key="hp_steps"
        )
        epochs = c[1].number_input("Epochs", 0.1, 100.0, d.epochs, key="hp_epochs")
        lr = c[2].number_input(
            "Learning rate", 1e-7, 1.0, preset.get("lr", d.lr), format="%.2e", key="hp_lr"
        )
        seed = c[3].number_input("Seed", 0, 10**6, 0, key="hp_seed")
        c = st.columns(4)
        r = c[0].number_input("LoRA r", 1, 1024, preset.get("lora_r", d.lora_r), key="hp_r")
        alpha = c[1].number_input(
            "LoRA alpha", 1, 4096, preset.get("lora_alpha", d.lora_alpha), key="hp_alpha"
        )
        batch = c[2].number_input("Batch", 1, 4096, d.batch_size, key="hp_batch")
        max_len = c[3].number_input(
            "Max length", 8, 32768, preset.get("max_length", d.max_length), key="hp_len"
        )
        c = st.columns(4)
        micro = c[0].number_input(
            "Micro-batch", 1, 4096, min(d.micro_batch_size, batch), key="hp_micro"
        )
        log_every = c[1].number_input("Log every", 1, 10**5, 20 if lab else 10, key="hp_log")
        budget = c[2].selectbox(
            "Sub-model budget",
            ["epochs", "steps"],
            key="hp_budget",
            help="epochs: each sub-model makes as many passes over its cluster as SFT over "
            "all data (the paper); steps: each gets SFT's step count",
        )
        how = {}  # how the runs are computed: auto picks for the machine they run on
        c = st.columns(3)
        for col, name in zip(c, ("dtype", "attn", "gradient_checkpointing"), strict=True):
            f = FIELDS[name]
            label = name.replace("_", " ").capitalize()
            how[name] = col.selectbox(
                label, f.metadata["choices"], help=f.metadata["help"], key=f"hp_{name}"
            )
    # The preset's values the form has no field for (target modules, probe size, ...).
    values = {k: v for k, v in preset.items() if k not in ("steps", "log_every")}
    values |= {
        "epochs": float(epochs),
        "lr": float(lr),
        "seed": int(seed),
        "lora_r": int(r),
        "lora_alpha": int(alpha),
        "batch_size": int(batch),
        "micro_batch_size": int(micro),
        "max_length": int(max_len),
        "log_every": int(log_every),
        **how,
    }
    if steps:
        values["steps"] = int(steps)
    values.update(eval_settings(lab is not None, int(log_every)))
    return {"values": values, "budget": budget}


def eval_settings(lab: bool, log_every: int) -> dict:
    """Tasks scored during training (the alignment-tax curve): the lab's by default on
    the lab; a tasks folder's (lm-evaluation-harness YAMLs) on any model."""
    with st.expander("Score tasks during training", expanded=False):
        c = st.columns([2, 2, 1])
        tasks_dir = (
            c[0]
            .text_input("Tasks folder (lm-evaluation-harness YAMLs)", key="hp_tasks_dir")
            .strip()
        )
        names: list[str] = []
        if tasks_dir:
            try:
                names = list(folder_tasks(tasks_dir))
            except DTMError as e:
                st.error(str(e))
        picked = c[1].multiselect(
            "Its tasks",
            names,
            default=names[:2],
            key="hp_eval_tasks",
            help="scored with the quick engine every N steps"
            + ("; the lab's benchmarks are scored as well" if lab else ""),
        )
        every = c[2].number_input(
            "every N steps",
            1,
            10**6,
            max(log_every, 100 if lab else log_every),
            key="hp_eval_every",
        )
    if not picked:
        return {}
    from pathlib import Path

    return {  # with the lab's own tasks, as the default hook scores them
        "eval_tasks": (*(TASKS + PROBES if lab else ()), *picked),
        "tasks_dir": str(Path(tasks_dir).expanduser().resolve()),
        "eval_every": int(every),
    }


def launch(configs: list[tuple], group: str, backend: str) -> None:
    """Submit ``(name, config[, clustering])`` tuples; says how many were new."""
    new = old = 0
    for name, cfg, *clustering in configs:
        try:
            _, created = jobs.submit(
                cfg,
                name=name,
                group=group,
                backend=backend,
                store=store(),
                clustering=(clustering or [None])[0],
            )
        except DTMError as e:
            st.error(f"{name}: {e}")
            return
        new, old = new + created, old + (not created)
    msg = f"Queued {new} job(s)."
    if old:
        msg += f" {old} identical configuration(s) already had a job: not started again."
    st.toast(msg)


def launch_group(configs: list[tuple], group: str, backend: str) -> None:
    """Submit ``dtm_set`` tuples as one group job, or the fewest that fit this GPU."""
    try:
        parts = jobs.submit_together(
            together_members(configs), name="dtm set", group=group, backend=backend, store=store()
        )
    except DTMError as e:
        st.error(str(e))
        return
    for job, members, created in parts:
        if created:
            st.toast(f"Queued the group job {job.name} ({job.id[:12]}) of {len(members)} runs.")
        else:
            st.toast(f"{job.name} already has a group job ({job.id[:12]}, {job.state}).")


def launch_panel() -> None:
    inputs = choose_inputs()
    if inputs is None:
        return
    hp = hyperparameters(inputs["lab"])
    backend = st.text_input(
        "Backend",
        value=jobs.default_backend(),
        key="train_backend",
        help="local: detached processes on this machine; ray:http://HEAD:8265 for a Ray "
        "cluster (the cache must be on storage both sides see at the same path)",
    ).strip()
    common = {
        **hp["values"],
        "base": inputs["base"],
        "data": inputs["data"],
        "val_data": inputs["val_data"],
        "out": "-",
    }
    if inputs["lab"]:
        common["eval_lab"] = inputs["lab"]
        common.setdefault("eval_every", max(common["log_every"], 100))
    group = f"{st.session_state.train_assignment[:8]}-seed{common['seed']}"
    together = st.checkbox(
        "Train SFT and the sub-models together",
        value=True,
        key="train_together",
        help="one job, one process over one shared base: each micro-step runs every "
        "member's batch in one forward, each row through its own adapter (the same "
        "numbers as separate runs at dropout 0). Off: one job per run.",
    )
    # the estimate before a launch: a run, and the group of SFT + K sub-models
    sft = TrainConfig(**{**common, "kind": "sft"})
    st.caption(launch_note(sft, inputs["k"] + 1))
    if together and (note := split_note(sft, inputs["k"] + 1)):
        st.caption(note)
    c = st.columns([2] + [1] * len(BASELINES))
    if c[0].button("Launch DTM set + SFT", type="primary", key="launch_dtm"):
        sizes = cluster_sizes(inputs["assignments"], inputs["k"])
        configs = dtm_set(
            common, inputs["assignments"], sizes, hp["budget"], clustering=inputs["clustering"]
        )
        if together:
            launch_group(configs, group, backend)
        else:
            launch(configs, group, backend)
    own = kind_settings(inputs["k"])
    for col, kind in zip(c[1:], BASELINES, strict=True):
        if col.button(f"Launch {kind}", key=f"launch_{kind}"):
            launch([(kind, TrainConfig(**common, kind=kind, **own.get(kind, {})))], group, backend)


def kind_settings(k: int) -> dict[str, dict]:
    """The values of the baselines that have their own: curate's selection and LoRAMoE's
    experts (the ``curate:`` and ``loramoe:`` sections of an experiment file)."""
    with st.expander("Curate and LoRAMoE settings"):
        a, b = st.columns(2)
        a.markdown("**curate**: score the rows, then keep them by score while diverse")
        budget = a.text_input(
            "Rows kept (a count, or a fraction)",
            value=str(round(1 / k, 4)),
            key="curate_budget",
            help="default: 1/K, the share of the rows one DTM sub-model trains on",
        )
        source = a.selectbox(
            "Score",
            ["ifd", "column", "deita"],
            key="curate_score_kind",
            help="ifd: the base's loss on the response with the instruction over without "
            "it (Li et al. 2023); column: a numeric column of the data; deita: Deita's "
            "complexity and quality scorers",
        )
        score = "ifd"
        if source == "column":
            score = "column:" + a.text_input("Column", key="curate_column").strip()
        elif source == "deita":
            models = a.text_input(
                "Complexity and quality scorers (hub ids or folders, comma-separated)",
                key="curate_deita",
            )
            score = "deita:" + models.strip()
        threshold = a.slider(
            "Cosine threshold", 0.05, 1.0, 0.9, 0.01, key="curate_threshold",
            help="a row is kept only if its embedding's cosine to every kept row is below",
        )  # fmt: skip
        b.markdown("**loramoe**: LoRA experts with a router; it is scored, never merged")
        experts = b.number_input("Experts", 1, 64, 4, key="moe_experts")
        groups = b.number_input(
            "Experts in the world-knowledge group", 0, int(experts), int(experts) // 2,
            key="moe_groups",
        )  # fmt: skip
        balance = b.number_input("Constraint weight", 0.0, 100.0, 0.1, key="moe_balance")
        delta = b.number_input("Group contrast delta", 0.0, 0.99, 0.1, key="moe_delta")
        sources = b.text_input(
            "World-knowledge sources (comma-separated; empty: every row is a task row)",
            key="moe_sources",
        ).strip()
    return {
        "curate": {
            "curate_budget": budget.strip(),
            "curate_score": score,
            "curate_threshold": float(threshold),
        },
        "loramoe": {
            "experts": int(experts),
            "moe_groups": int(groups),
            "moe_balance": float(balance),
            "moe_delta": float(delta),
            "moe_knowledge_sources": sources or None,
        },
    }


@st.fragment(run_every=2)
def jobs_panel() -> None:
    try:
        rows = jobs.refresh(store())
    except DTMError as e:
        st.error(str(e))
        return
    if not rows:
        st.caption("No jobs yet.")
        return
    frame = jobs_frame(rows, time.time())
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0)},
        key="jobs_table",
    )
    groups = sorted(
        {j.group or "" for j in rows},
        key=lambda g: -max(j.created for j in rows if (j.group or "") == g),
    )
    group = st.selectbox("Curves of", groups, key="curves_group")
    curves = {
        j.name: store().metrics(j.id)
        for j in rows
        if (j.group or "") == group and j.kind != "group"  # a group's members have them
    }
    c1, c2 = st.columns(2)
    c1.plotly_chart(charts.loss_curves(curves, "train_loss"), key="curve_train")
    c2.plotly_chart(charts.loss_curves(curves, "val_loss"), key="curve_val")
    labels = {j.id: f"{j.name} · {j.state} · {j.id[:12]}" for j in rows}
    jid = st.selectbox("Job", list(labels), format_func=labels.get, key="job_pick")
    job = next(j for j in rows if j.id == jid)
    b = st.columns(4)
    try:
        if b[0].button("Cancel", key="job_cancel", disabled=job.state in jobs.FINAL):
            jobs.cancel(job.id, store())
        if b[1].button("Resume", key="job_resume", disabled=job.state not in jobs.RESTARTABLE):
            jobs.restart(job.id, resume=True, store=store())
        if b[2].button("Retry", key="job_retry", disabled=job.state not in jobs.RESTARTABLE):
            jobs.restart(job.id, resume=False, store=store())
    except DTMError as e:
        st.error(str(e))
    if job.parent:
        st.caption(
            f"Trained in the group job {job.parent[:12]}: Cancel, Resume and Retry act on "
            "the whole group; the log is the group's."
        )
    if job.error:
        st.warning(job.error)
    log_job = store().get(job.parent) if job.parent else job
    st.code(jobs.backend_for(log_job.backend).logs(log_job, 3000) or "(no log yet)", language=None)


st.title("Train")
st.caption(
    "One LoRA sub-model per cluster, vanilla SFT on all data, and the paper's baselines, "
    "as background jobs: closing the browser or restarting the server does not stop them."
)
launch_panel()
st.subheader("Jobs")
jobs_panel()
