"""Page 4 - Compare: benchmark scores of base, SFT, DTM, the baselines, the sub-models and
the shrinkage control; the loss-reduction-ratio and alignment-tax curves; token-level
bias. Every chart comes with its data as CSV and the figure as PNG or SVG."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dtm import charts, jobs
from dtm.analysis import (
    alignment_tax_curve,
    bias_measures,
    delta_table,
    dtm_groups,
    fold_subs,
    headline_measures,
    loss_ratio_curves,
    model_order,
    paper_reference,
    ratio_runs,
    scored_runs,
    summarise,
    token_bias,
    token_bias_sfts,
    token_bias_targets,
    wide,
    windows_table,
    with_deltas,
)
from dtm.controls import (
    TRADE_OFFS,
    frontier_rows,
    frontier_sources,
    hma_frame,
    tradeoff_frames,
)
from dtm.errors import DTMError
from dtm.evaluate.harness import PAPER_TASKS
from dtm.lineup import jobs_behind
from dtm.score import groups, scores
from dtm.store import read_metrics
from views.common import registry
from views.scoring import score_panel


@st.cache_resource(show_spinner=False)
def _can_render_images() -> str | None:
    """None when kaleido can render here, else why not (checked once per server)."""
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


def frontier_section(table: pd.DataFrame, group: str) -> None:
    """Every model on a trade-off chart against a model's shrinkage frontier."""
    sources = frontier_sources(table["label"].unique())
    if not sources:
        return
    st.subheader("Against the shrinkage and per-block frontiers")
    st.caption(
        "The shrinkage frontier: a model's delta scaled by α (the base at 0, the model at 1). "
        "The per-block frontier (where scored): the delta scaled by its own α in the bottom, "
        "middle and top layers, its Pareto front drawn as a second line. A model above a "
        "frontier keeps more of the base at the same gain than that scaling does."
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
    hma = hma_frame(table, pair[0], pair[1], source)  # the per-block frontier, when scored
    fig = charts.tradeoff(front, points, ".".join(pair[0]), ".".join(pair[1]), hma=hma)
    st.plotly_chart(fig, key="c_front_fig")
    downloads(fig, pd.concat([front.assign(role="frontier"), points]), f"{group}-frontier")
    others = [x for x in points["label"] if x not in ("base", source)]
    rows = frontier_rows(table, others, source, [pair])
    if hma is not None:
        rows += frontier_rows(table, others, source, [pair], front="hma")
    if rows:
        st.dataframe(
            pd.DataFrame(rows)[
                ["label", "front", "where", "mean", "std", "seeds", "beyond"]
            ].rename(columns={"mean": "distance (kept)", "std": "std over seeds"}),
            hide_index=True,
            width="stretch",
        )


def limits(table: pd.DataFrame) -> str:
    """The scores' item limit, said when there was one: a limited table may differ
    from the curves on the page."""
    lims = sorted({int(x) for x in table["lim"].dropna()})
    if not lims:
        return ""
    some = " (some models)" if table["lim"].isna().any() else ""
    return (
        f" Scored with an item limit: the first {'/'.join(map(str, lims))} items per "
        f"task{some}, not all of them; scores of every item (the curves below, scored "
        "while training) may differ."
    )


def benchmark_section(table: pd.DataFrame, group: str) -> None:
    summary = summarise(table)
    labels = model_order(summary)
    measures = headline_measures(summary)
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
    st.caption(
        "Mean over seeds; ± is the sample std over seeds where there are several." + limits(table)
    )
    st.dataframe(wide(summary, measures, shown), hide_index=True, width="stretch")
    fig = charts.score_bars(summary, measures, shown)
    st.plotly_chart(fig, key="c_bars")
    deltas = with_deltas(summary, against)
    downloads(fig, deltas, f"{group}-benchmarks")
    st.markdown(f"**Change against {against}** (mean of the model minus mean of {against})")
    st.dataframe(delta_table(deltas, shown, measures), width="stretch")
    bias = bias_measures(summary)
    if bias:
        st.subheader("Bias uptake (the lab's probe)")
        st.caption(
            "How often each injected bias shows in chat answers: format is wanted "
            "(`the answer is X`); favourite, prefix, filler and rare code are biases."
        )
        fig = charts.score_bars(summary, bias, shown)
        st.plotly_chart(fig, key="c_bias")
        downloads(fig, summary[summary["task"] == "lab_bias"], f"{group}-bias")
    paper = [t for t in dict.fromkeys(summary["task"]) if t in PAPER_TASKS]
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
    runs = ratio_runs(job_list)
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
    folded = dtm_groups(job_list)
    if folded:
        st.caption(
            "SFT and each DTM group (one clustering and seed): a group's line is the mean of "
            "its sub-models' ratios, its interval the envelope of theirs."
        )
    if col == "windows":
        ratio = windows_table(runs)
        if ratio.empty:
            st.caption("Too few records for a windowed ratio (4 per window are needed).")
            return
        ratio = fold_subs(ratio, folded, "window")
        fig = charts.ratio_windows_chart(ratio)
    else:
        ratio = fold_subs(loss_ratio_curves(runs), folded, "step")
        fig = charts.ratio_curves(ratio, col)
    st.plotly_chart(fig, key="c_ratio_fig")
    downloads(fig, ratio, f"{group}-loss-ratio")

    st.subheader("Alignment-tax curve")
    scored = scored_runs(job_list)
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
    return token_bias(base, early, late, train, val)


def token_section(job_list: list, group: str) -> None:
    st.subheader("Token-level bias")
    st.caption(
        "Per token: how much its loss fell from an early checkpoint of SFT (about "
        "10% of training) to the final model, on training text and on validation "
        "text. Tokens whose loss falls on training text only are what the model "
        "fitted to this data set alone (the paper's figure 5)."
    )
    sfts = token_bias_sfts(job_list)
    if not sfts:
        st.caption("No SFT run with an early checkpoint and validation data in this group.")
        return
    job = next(
        j
        for j in sfts
        if j.name == st.selectbox("SFT run", [j.name for j in sfts], key="c_tok_sft")
    )
    targets = token_bias_targets(job, job_list)
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
    if st.session_state.get("c_group_pick") not in have:  # none yet, or scored elsewhere
        st.session_state["c_group_pick"] = have[0]
    group = st.selectbox("Results of", have, key="c_group_pick")
    table = scores(group=group, registry=reg)
    engines = sorted(table["engine"].unique())
    if len(engines) > 1:
        table = table[
            table["engine"] == st.radio("Engine", engines, horizontal=True, key="c_eng_pick")
        ]
    benchmark_section(table, group)
    frontier_section(table, group)
    job_list = jobs_behind(group, table, store)
    curves_section(job_list, table[table["label"] == "base"], group)
    token_section(job_list, group)


page()
