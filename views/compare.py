"""Page 4 - Compare: benchmark scores of base, SFT, DTM, the baselines, the sub-models and
the shrinkage control; the loss-reduction-ratio and alignment-tax curves; token-level
bias. Every chart comes with its data as CSV and the figure as PNG or SVG."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dtm import charts, jobs
from dtm.analysis import (
    alignment_tax_curve,
    loss_ratio_curves,
    model_order,
    paper_reference,
    ratio_windows,
    summarise,
    wide,
    with_deltas,
)
from dtm.errors import DTMError
from dtm.evaluate import known_tasks
from dtm.evaluate.harness import CODE_TASKS, PAPER_TASKS
from dtm.evaluate.user import folder_tasks
from dtm.experiment import experiment_dir, group_models
from dtm.merge.sources import merge_sources
from dtm.score import groups, score_models, scores
from dtm.store import read_metrics
from dtm.tasks import PROBES, TASKS, columns
from views.common import registry

BIAS = [(t, m) for t, m, _ in columns() if t == "lab_bias" and m != "chat_acc"]


@st.cache_resource(show_spinner=False)
def _can_render_images() -> str | None:
    """None when kaleido can render here, else why not (checked once per server)."""
    import plotly.graph_objects as go

    try:
        charts.figure_bytes(go.Figure(), "svg")
    except DTMError as e:
        return str(e)
    return None


def downloads(fig, data: pd.DataFrame, name: str) -> None:
    c = st.columns([1, 1, 1, 5])
    c[0].download_button(
        "CSV",
        data.to_csv(index=False),
        f"{name}.csv",
        "text/csv",
        key=f"csv_{name}",
        on_click="ignore",
        icon=":material/table:",
    )
    why = _can_render_images()
    if why is None:
        for col, fmt, mime in ((c[1], "png", "image/png"), (c[2], "svg", "image/svg+xml")):
            col.download_button(
                fmt.upper(),
                lambda f=fmt: charts.figure_bytes(fig, f),
                f"{name}.{fmt}",
                mime,
                key=f"{fmt}_{name}",
                on_click="ignore",
                icon=":material/image:",
            )
    else:
        c[3].caption(f"PNG/SVG export off: {why}")


def _jobs_of(group: str, table: pd.DataFrame, store) -> list:
    """The training jobs behind a group's scores: the group's own, and any job whose
    adapter a scored model uses (experiments reuse jobs trained for another)."""
    used = set()
    for m in table["model"].unique():
        used.update(json.loads(m).get("adapters") or [])
    return [
        j
        for j in store.list(states=("done",))
        if j.kind != "group" and (j.group == group or str(j.run_dir / "adapter") in used)
    ]


LAUNCH, SAVED, FOLDER = "a launch", "saved merges", "a model folder"


def _models_to_score(store) -> tuple[list[dict], str, str | None] | None:
    """The models to score, the group their scores go under, and their lab (when every
    one of them is a lab model)."""
    from dtm.merge.saved import saved_merges
    from dtm.models import lab_of

    kind = st.radio("Score", [LAUNCH, SAVED, FOLDER], horizontal=True, key="c_kind")
    if kind == LAUNCH:
        sources = merge_sources(store)
        if not sources:
            st.caption(
                "No launch to score yet: train SFT and the sub-models on the Train page, or "
                "run `python -m dtm run experiments/lab.yaml` (or the Home page's button)."
            )
            return None
        labels = {
            s.group: f"{s.group} · {len(s.subs)} sub-models, {len(s.baselines)} others"
            for s in sources
        }
        group = st.selectbox("Launch", list(labels), format_func=labels.get, key="c_src")
        src = next(s for s in sources if s.group == group)
        models = group_models(src)
        # every merge of these sub-models that was tuned or exported, named by its recipe
        kept = saved_merges(registry(), adapters=[str(p) for _, p in src.subs])
        models += _unique_labels([m for m in kept if _same_path(m["base"], src.base)], models)
        return models, group, src.lab or lab_of(src.base)
    if kind == SAVED:
        kept = saved_merges(registry())
        if not kept:
            st.caption(
                "No saved merge yet: export one, or press **Keep for Compare**, on the Merge "
                "page (or `python -m dtm merge ... --out DIR`)."
            )
            return None
        by_key = {m["key"]: m for m in kept}
        picked = st.multiselect(
            "Merges",
            list(by_key),
            default=list(by_key)[:4],
            key="c_saved",
            format_func=lambda k: (
                f"{by_key[k]['label']} · {by_key[k]['source']} · {by_key[k]['base']}"
            ),
        )
        group = st.text_input("Scores go under", "merges", key="c_saved_group").strip()
        models = _unique_labels([by_key[k] for k in picked], [])
        bases = list(dict.fromkeys(m["base"] for m in models))
        models = [
            {
                "label": "base" if len(bases) == 1 else f"base {b}",
                "kind": "base",
                "seed": None,
                "base": b,
                "adapters": [],
            }
            for b in bases
        ] + models
    else:
        c = st.columns([2, 2, 1])
        base = c[0].text_input("Model folder or hub id", key="c_base").strip()
        adapter = c[1].text_input("Adapter folder (optional)", key="c_adapter").strip()
        label = c[2].text_input(
            "Label", key="c_label", help="default: the adapter's folder name"
        ).strip() or _folder_label(adapter)
        group = st.text_input("Scores go under", "my-models", key="c_folder_group").strip()
        if not base:
            return None
        models = [{"label": "base", "kind": "base", "seed": None, "base": base, "adapters": []}]
        if adapter:
            models.append(
                {
                    "label": label,
                    "kind": "baseline",
                    "seed": None,
                    "base": base,
                    "adapters": [adapter],
                }
            )
    if not group or not models:
        return None
    labs = {lab_of(m["base"]) for m in models}
    return models, group, labs.pop() if len(labs) == 1 else None


def _same_path(a: str, b: str) -> bool:
    import os

    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _folder_label(adapter: str) -> str:
    from pathlib import Path

    p = Path(adapter) if adapter else None
    if p is None:
        return "model"
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name or "model"


def _unique_labels(merges: list[dict], others: list[dict]) -> list[dict]:
    """Merges whose labels repeat one another's (or another row's) get their key's first
    characters: rows of one label are averaged as seeds of one model."""
    taken = [m["label"] for m in others]
    labels = [m["label"] for m in merges]
    out = []
    for m in merges:
        if labels.count(m["label"]) > 1 or m["label"] in taken:
            m = {**m, "label": f"{m['label']} #{m['key'][:6]}"}
        out.append(m)
    return out


def frontier_choice(models: list[dict]) -> list[dict]:
    """The scaled copies that trace one model's shrinkage frontier, when asked for."""
    from dtm.controls import frontier_models

    sources = [m for m in models if m["kind"] in ("sft", "baseline") and len(m["adapters"]) == 1]
    if not sources:
        return []
    c = st.columns([1, 2])
    if not c[0].checkbox(
        "Trace the shrinkage frontier",
        key="c_frontier",
        help="score the model's LoRA delta scaled by each α in 0.25 … 0.75 (exact, no "
        "training): the curve that DTM and the baselines are compared with",
    ):
        return []
    names = [m["label"] for m in sources]
    pick = c[1].selectbox(
        "of", names, index=names.index("sft") if "sft" in names else 0, key="c_frontier_of"
    )
    return frontier_models(next(m for m in sources if m["label"] == pick), models)


def frontier_section(table: pd.DataFrame, group: str) -> None:
    """Every model on a trade-off chart against a model's shrinkage frontier."""
    from dtm.controls import TRADE_OFFS, frontier_rows, frontier_sources, tradeoff_frames

    sources = frontier_sources(table["label"].unique())
    if not sources:
        return
    st.subheader("Against the shrinkage frontier")
    st.caption(
        "The frontier: a model's delta scaled by α (the base at 0, the model at 1). A model "
        "above it keeps more of the base at the same gain than shrinking alone does."
    )
    have = set(zip(table["task"], table["metric"], strict=True))
    pairs = [p for p in TRADE_OFFS if set(p) <= have]
    if not pairs:
        st.caption("These scores have no pair of kept and gained lab measures.")
        return
    c = st.columns([1, 2])
    source = c[0].selectbox("Frontier of", sources, key="c_front_src")
    pair = c[1].selectbox(
        "Trade-off",
        pairs,
        format_func=lambda p: f"{'.'.join(p[0])} against {'.'.join(p[1])}",
        key="c_front_pair",
    )
    front, points = tradeoff_frames(table, pair[0], pair[1], source)
    fig = charts.tradeoff(front, points, ".".join(pair[0]), ".".join(pair[1]))
    st.plotly_chart(fig, key="c_front_fig")
    downloads(fig, pd.concat([front.assign(role="frontier"), points]), f"{group}-frontier")
    others = [x for x in points["label"] if x not in ("base", source)]
    rows = frontier_rows(table, others, source, [pair])
    if rows:
        st.dataframe(
            pd.DataFrame(rows)[["label", "where", "mean", "std", "seeds", "beyond"]].rename(
                columns={"mean": "distance (kept)", "std": "std over seeds"}
            ),
            hide_index=True,
            width="stretch",
        )


def score_panel(store) -> None:
    with st.expander("Score models", expanded=not groups(registry())):
        chosen = _models_to_score(store)
        if chosen is None:
            return
        models, group, lab = chosen
        models = models + frontier_choice(models)
        c = st.columns([1, 3, 1])
        engine = c[0].radio("Engine", ["quick", "full"], key="c_engine", horizontal=True)
        tasks_dir = (
            st.text_input("Tasks folder (lm-evaluation-harness YAMLs)", key="c_tasks_dir").strip()
            or None
        )
        user: list[str] = []
        if tasks_dir:
            try:
                user = list(folder_tasks(tasks_dir))
            except DTMError as e:
                st.error(str(e))
        lab_tasks = list(TASKS + PROBES) if lab else []  # a lab task only for a lab model
        if engine == "quick":
            options = lab_tasks + user
        else:
            options = lab_tasks + [
                t for t in known_tasks(tasks_dir if user else None) if t not in TASKS + PROBES
            ]
        tasks = c[1].multiselect(
            "Tasks",
            options,
            default=lab_tasks or user[:4],
            key=f"c_tasks_{engine}",
            help=None
            if lab
            else "not lab models: their tasks come from a tasks folder or "
            "lm-evaluation-harness (the full engine)",
        )
        limit = c[2].number_input("items per task (0: all)", 0, 100000, 0, 50, key="c_limit")
        held = st.text_input(
            "Held-out files (comma-separated; instruction data or .txt)", key="c_heldout"
        ).strip()
        heldout = [h.strip() for h in held.split(",") if h.strip()]
        allow = False
        if any(t in CODE_TASKS for t in tasks):
            allow = st.checkbox(
                "Run the code the model writes (HumanEval, MBPP execute it on this machine)",
                key="c_code",
            )
        if st.button(
            f"Score {len(models)} models",
            type="primary",
            disabled=not (tasks or heldout),
            key="c_go",
        ):
            with st.status(f"Scoring {len(models)} models…", expanded=True) as box:
                bar = st.progress(0.0)
                try:
                    score_models(
                        models,
                        tasks,
                        group=group,
                        lab=lab,
                        engine=engine,
                        limit=int(limit) or None,
                        allow_code=allow,
                        controls_dir=experiment_dir(group) / "controls",
                        progress=lambda what, f: bar.progress(min(f, 1.0), text=what),
                        tasks_dir=tasks_dir,
                        heldout=heldout,
                    )
                except DTMError as e:
                    box.update(label="Scoring stopped", state="error")
                    st.error(str(e))
                    return
                box.update(label="Scored", state="complete")
            st.session_state["c_group"] = group


def benchmark_section(table: pd.DataFrame, group: str) -> None:
    summary = summarise(table)
    labels = model_order(summary)
    tasks = [t for t in dict.fromkeys(summary["task"]) if t != "lab_bias"]
    have = set(zip(summary["task"], summary["metric"], strict=True))
    headline = {
        t: next((m for m in ("acc", "loss", "bits_per_byte") if (t, m) in have), None)
        for t in tasks
    }
    measures = [(t, m) for t, m in headline.items() if m] + [
        (t, m) for t, m in [("lab_bias", "chat_acc")] if (summary["task"] == t).any()
    ]
    c = st.columns([3, 2])
    shown = c[0].multiselect(
        "Models", labels, default=[x for x in labels if "sub" not in x], key="c_models"
    )
    against = c[1].selectbox(
        "Deltas against",
        labels,
        index=labels.index("sft") if "sft" in labels else 0,
        key="c_against",
    )
    st.subheader("Benchmarks")
    st.caption("Mean over seeds; ± is the sample std over seeds where there are several.")
    st.dataframe(wide(summary, measures, shown), hide_index=True, width="stretch")
    fig = charts.score_bars(summary, measures, shown)
    st.plotly_chart(fig, key="c_bars")
    deltas = with_deltas(summary, against)
    downloads(fig, deltas, f"{group}-benchmarks")
    st.markdown(f"**Change against {against}** (mean of the model minus mean of {against})")
    d = deltas[
        deltas["label"].isin(shown)
        & deltas.apply(lambda r: (r["task"], r["metric"]) in measures, axis=1)
    ]
    st.dataframe(
        d.pivot_table(index="label", columns="task", values="delta")
        .reindex([x for x in shown if x in set(d["label"])])
        .round(4),
        width="stretch",
    )
    bias = [m for m in BIAS if ((summary["task"] == m[0]) & (summary["metric"] == m[1])).any()]
    if bias:
        st.subheader("Bias uptake (the lab's probe)")
        st.caption(
            "How often each injected bias shows in chat answers: format is wanted "
            "(`the answer is X`); favourite, prefix, filler and rare code are biases."
        )
        fig = charts.score_bars(summary, bias, shown)
        st.plotly_chart(fig, key="c_bias")
        downloads(fig, summary[summary["task"] == "lab_bias"], f"{group}-bias")
    paper = [t for t in tasks if t in PAPER_TASKS]
    ref = paper_reference(paper or None)
    if paper and len(ref):
        st.subheader("The paper's numbers (reported, not measured)")
        st.caption(
            "Fu et al. (2024), Llama-2-7b on TÜLU-V2-mix, percent. Only the cells in "
            "dtm/reference/paper_table1.csv; see its README."
        )
        fig = charts.reference_bars(ref)
        st.plotly_chart(fig, key="c_ref")
        downloads(fig, ref, "paper-reported")


def curves_section(job_list: list, base_scores: pd.DataFrame, group: str) -> None:
    st.subheader("Loss-reduction ratio")
    st.caption(
        "ΔL_train / ΔL_val: how much faster the loss falls on a fixed probe of the "
        "training rows than on held-out rows (the paper saw SFT climb from about 1 to "
        "about 20). By window: least-squares falls over each quarter of the steps, with "
        "95% intervals, only where the validation loss moves more than its noise."
    )
    runs = {}
    for j in job_list:
        if j.kind in ("sft", "sub"):
            recs = [r for r in read_metrics(j.run_dir / "metrics.jsonl") if "member" not in r]
            if recs:
                runs[j.name] = recs
    if not runs:
        st.caption("No SFT or sub-model runs with metrics in this group.")
        return
    col = st.radio(
        "Ratio",
        ["windows", "loss_ratio", "loss_ratio_interval"],
        horizontal=True,
        key="c_ratio",
        format_func=lambda c: {
            "windows": "by window, with intervals",
            "loss_ratio": "since the start",
            "loss_ratio_interval": "per record",
        }[c],
    )
    if col == "windows":
        parts = [ratio_windows(r).assign(run=name) for name, r in runs.items()]
        ratio = pd.concat([p for p in parts if not p.empty] or [pd.DataFrame()])
        if ratio.empty:
            st.caption("Too few records for a windowed ratio (4 per window are needed).")
            return
        fig = charts.ratio_windows_chart(ratio)
    else:
        ratio = loss_ratio_curves(runs)
        fig = charts.ratio_curves(ratio, col)
    st.plotly_chart(fig, key="c_ratio_fig")
    downloads(fig, ratio, f"{group}-loss-ratio")

    st.subheader("Alignment-tax curve")
    scored = [
        j
        for j in job_list
        if any(r.get("bench") for r in read_metrics(j.run_dir / "metrics.jsonl"))
    ]
    if not scored:
        st.caption(
            "No run of this group scored tasks while training: give `--eval-tasks` (lab or "
            "`--tasks-dir` tasks) to `dtm train`, or tick **Score tasks during training** "
            "on the Train page."
        )
        return
    names = [j.name for j in scored]
    first = next((j.name for j in scored if j.kind == "sft"), names[0])
    pick = st.selectbox("Run", names, index=names.index(first), key="c_sft")
    job = next(j for j in scored if j.name == pick)
    tax = alignment_tax_curve(read_metrics(job.run_dir / "metrics.jsonl"))
    if tax.empty:
        st.caption("This run's scores have no accuracy to draw (only losses or perplexities).")
        return
    x = st.radio("x axis", ["step", "fraction"], horizontal=True, key="c_tax_x")
    base = base_scores[(base_scores["metric"] == "acc")].groupby("task")["value"].mean()
    fig = charts.tax_curve(tax, base.to_dict(), x)
    st.plotly_chart(fig, key="c_tax")
    downloads(fig, tax, f"{group}-alignment-tax")


@st.cache_data(show_spinner="Scoring every token with the early and late models…", max_entries=8)
def _token_bias(base: str, early: str, late: tuple[str, ...], train: str, val: str):
    from dtm.analysis import encode_split, token_level_bias
    from dtm.score import ModelRef, load_model

    early_model, tok = load_model(ModelRef(base=base, adapters=[early]))
    late_ref = ModelRef(base=base, adapters=list(late))
    if len(late) > 1:
        late_ref.recipe = {
            "method": "average",
            "weights": [1 / len(late)] * len(late),
            "params": {},
        }
    late_model, _ = load_model(late_ref)
    tr, va = encode_split(train, tok), encode_split(val, tok)
    return token_level_bias(early_model, late_model, tok, tr, va)


def token_section(job_list: list, group: str) -> None:
    st.subheader("Token-level bias")
    st.caption(
        "Per token: how much its loss fell from an early checkpoint of SFT (about "
        "10% of training) to the final model, on training text and on validation "
        "text. Tokens whose loss falls on training text only are what the model "
        "fitted to this data set alone (the paper's figure 5)."
    )
    sfts = [j for j in job_list if j.kind == "sft" and (j.run_dir / "early").is_dir()]
    if not sfts or not any(j.config.get("val_data") for j in sfts):
        st.caption("No SFT run with an early checkpoint and validation data in this group.")
        return
    job = next(
        j
        for j in sfts
        if j.name == st.selectbox("SFT run", [j.name for j in sfts], key="c_tok_sft")
    )
    seed = job.config.get("seed")
    subs = sorted(
        (j for j in job_list if j.kind == "sub" and j.config.get("seed") == seed),
        key=lambda j: (j.config.get("assignments") or "", j.config["cluster"]),
    )
    sets: dict[str, list] = {}
    for j in subs:  # by the clustering each sub-model was submitted with
        sets.setdefault(j.clustering or "", []).append(j)
    targets = {"SFT": (str(job.run_dir / "adapter"),)}
    for name, js in sets.items():
        targets[f"DTM ({name or 'sub-models'})"] = tuple(str(j.run_dir / "adapter") for j in js)
    which = st.multiselect(
        "Late models", list(targets), default=list(targets)[:2], key="c_tok_models"
    )
    if not st.toggle("Compute", key="c_tok_go"):
        return
    for name in which:
        try:
            df = _token_bias(
                job.config["base"],
                str(job.run_dir / "early"),
                targets[name],
                job.config["data"],
                job.config["val_data"],
            )
        except DTMError as e:
            st.error(str(e))
            continue
        fig = charts.token_bias_bars(df, title=f"{name}: top tokens by train − validation drop")
        st.plotly_chart(fig, key=f"c_tok_{name}")
        downloads(fig, df, f"{group}-token-bias-{name.split()[0].lower()}")
        st.caption(
            f"{name}: mean drop on training tokens {df['train_drop'].mean():.3f}, on "
            f"validation tokens {df['val_drop'].mean():.3f} over {len(df)} tokens."
        )


def page() -> None:
    st.title("Compare")
    reg = registry()
    store = jobs.JobStore(reg)
    score_panel(store)
    have = groups(reg)
    if not have:
        st.info(
            "No scores yet. Score a launch above, or run an experiment "
            "(`python -m dtm run experiments/lab.yaml`)."
        )
        return
    default = st.session_state.get("c_group")
    group = st.selectbox(
        "Results of", have, key="c_group_pick", index=have.index(default) if default in have else 0
    )
    table = scores(group=group, registry=reg)
    engines = sorted(table["engine"].unique())
    if len(engines) > 1:
        table = table[
            table["engine"] == st.radio("Engine", engines, horizontal=True, key="c_eng_pick")
        ]
    benchmark_section(table, group)
    frontier_section(table, group)
    job_list = _jobs_of(group, table, store)
    curves_section(job_list, table[table["label"] == "base"], group)
    token_section(job_list, group)


page()
