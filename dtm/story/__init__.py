"""The lab story in pictures: the Home page's charts of one experiment, each with one
sentence written from its numbers.

``story_panels(exp, jobs, table)`` returns the panels that the results so far allow, in
the story's order: the alignment-tax curve of SFT, its loss-reduction ratio, DTM against
SFT, the shrinkage control and the baselines, and what the merge keeps and forgets.
Each panel is ``{"key", "title", "figure", "sentence", "frame", "table"}``; ``frame`` is
the data drawn, ``table`` the same numbers as text, rounded as the sentence rounds them
(the Home page shows it under the chart: every number of the sentence is in it, or is a
median or mean of its rows that the sentence names). ``jobs`` are the experiment's jobs
(``dtm.jobs``), ``table`` its scores (``dtm.score.scores``). How long a story takes
here, and what its button runs: ``dtm.story.timing``.
"""

from __future__ import annotations

import statistics

import pandas as pd

from dtm.store import read_metrics
from dtm.story.timing import paced_seconds, story_jobs, story_runs, story_time, trained_rows

TAX = (("lab_knowledge", "acc"), ("lab_reasoning", "acc"), ("lab_bias", "format"))
BARS = (
    ("lab_knowledge", "acc"),
    ("lab_reasoning", "acc"),
    ("lab_instruct", "acc"),
    ("lab_bias", "format"),
)


# What a class reads on the curves, for the metric keys of TAX
WORDS = {
    "lab_knowledge.acc": "knowledge",
    "lab_reasoning.acc": "reasoning",
    "lab_bias.format": "answer format",
}


def _sft_runs(exp, jobs) -> dict[int, list[dict]]:
    """Each seed's SFT records, in seed order."""
    out = {}
    for j in jobs:
        if j.kind == "sft" and j.config.get("seed") in exp.seeds:
            recs = read_metrics(j.run_dir / "metrics.jsonl")
            if recs:
                out[j.config["seed"]] = recs
    return dict(sorted(out.items()))


def _sft_steps(exp, jobs, seed) -> int | None:
    """The steps SFT of ``seed`` trains in all (its job's, else the experiment's)."""
    for j in jobs:
        if j.kind == "sft" and j.config.get("seed") == seed and j.total_steps:
            return int(j.total_steps)
    return exp.train.get("steps")


def tax_panel(exp, jobs, table) -> dict | None:
    """SFT's scores against the step, in words, the base model's level as a dashed line
    (its scores, else SFT's step-0 scores: the same model), the x-axis over the whole
    run from the first point. While SFT trains the sentence says where it is so far."""
    from dtm import charts  # lazy: plotly
    from dtm.analysis import alignment_tax_curve  # lazy: torch

    runs = _sft_runs(exp, jobs)
    seed, recs = next(iter(runs.items()), (None, None))
    if not recs:
        return None
    frame = alignment_tax_curve(recs, list(TAX))
    if frame.empty:
        return None
    frame["task"] = (frame["task"] + "." + frame["metric"]).map(lambda k: WORDS.get(k, k))
    base_rows = table[table["label"] == "base"].groupby(["task", "metric"])["value"].mean()
    first = frame[frame["step"] == frame["step"].min()].set_index("task")["value"]
    base = {}
    for t, m in TAX:
        word = WORDS[f"{t}.{m}"]
        if (t, m) in base_rows.index:
            base[word] = float(base_rows[(t, m)])
        elif frame["step"].min() == 0 and word in first.index:
            base[word] = float(first[word])
    total = _sft_steps(exp, jobs, seed)
    last = int(frame["step"].max())
    done = total is not None and last >= total
    know = frame[frame["task"] == "knowledge"].sort_values("step")
    fmt = frame[frame["task"] == "answer format"].sort_values("step")
    sentence = "SFT's scores against the step: the first point is the base model."
    if len(know) > 1 and len(fmt) > 1:
        k0, k1 = know["value"].iloc[0], know["value"].iloc[-1]
        f0, f1 = fmt["value"].iloc[0], fmt["value"].iloc[-1]
        if not done:
            of = f" of {total}" if total else ""
            sentence = (
                f"So far (SFT seed {seed}, step {last}{of}): the answer format has gone from "
                f"{f0:.2f} to {f1:.2f} and knowledge from {k0:.3f} to {k1:.3f}."
            )
        else:
            step90 = fmt[fmt["value"] - f0 >= 0.9 * (f1 - f0)]["step"]
            sentence = (
                f"Over SFT (seed {seed}) the answer format goes from {f0:.2f} to {f1:.2f} and "
                f"knowledge from {k0:.3f} to {k1:.3f}"
            )
            if len(step90) and k0 != k1:
                at = know[know["step"] <= step90.iloc[0]]["value"].iloc[-1]
                share = (k0 - at) / (k0 - k1)
                sentence += (
                    f"; by step {int(step90.iloc[0])}, where the format has 90% of its gain, "
                    f"{max(share, 0):.0%} of the knowledge drop has happened"
                )
            sentence += "."
    return {
        "key": "tax",
        "title": "The alignment tax",
        "figure": charts.tax_curve(frame, base, x_max=total),
        "sentence": sentence,
        "frame": frame,
        "table": tax_table(frame),
        "final": done,
    }


BAR_WORDS = ("knowledge", "reasoning", "instruct", "answer format")
DIGITS = {"knowledge": 3, "reasoning": 3, "instruct": 3, "answer format": 2}


def tax_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The tax curve's points as text: a row per step, a column per measure in words."""
    wide = frame.pivot_table(index="step", columns="task", values="value", aggfunc="mean")
    out = pd.DataFrame({"step": [str(int(x)) for x in wide.index]})
    for word in WORDS.values():
        if word in wide:
            out[word] = [f"{v:.{DIGITS[word]}f}" for v in wide[word]]
    return out


def ratio_panel(exp, jobs) -> dict | None:
    from dtm import charts  # lazy: plotly
    from dtm.analysis import ratio_windows  # lazy: torch

    runs = _sft_runs(exp, jobs)
    frames = []
    for seed, recs in runs.items():
        w = ratio_windows(recs)
        if not w.empty:
            frames.append(w.assign(run=f"sft s{seed}"))
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    if not (frame["val_moving"].astype(bool) | frame["abs_low"].notna()).any():
        return None  # nothing to draw yet: every window is within the losses' noise
    running = any(
        j.kind == "sft" and j.config.get("seed") in exp.seeds and j.state != "done" for j in jobs
    )
    # Each seed's first window where the validation loss moves beyond its noise, and its
    # largest 95% lower bound on the ratio's size in the windows after that one.
    moving = frame[frame["val_moving"].astype(bool)].sort_values("window")
    first_rows = moving.groupby("run", sort=False).head(1)
    first = first_rows["ratio"]
    after = frame.merge(first_rows[["run", "window"]], on="run", suffixes=("", "_first"))
    later = after[after["window"] > after["window_first"]].groupby("run")["abs_low"].max()
    later = later.dropna()
    if first.empty:
        sentence = "The validation loss has not yet moved more than its noise in any window."
    else:
        where = (
            f"steps {first_rows['start'].iloc[0]:g}–{first_rows['end'].iloc[0]:g}"
            if len(first_rows) == 1
            else f"median over {len(first)} seeds"
        )
        sentence = (
            f"The train probe's loss falls {statistics.median(first):.2f}× as fast as the "
            f"validation loss in the first window where the validation loss moves ({where})"
        )
        if later.empty:
            sentence += "."
        else:
            sentence += (
                f"; later, with 95% confidence, at least {later.min():.1f}× as fast in every "
                f"seed ({', '.join(f'{v:.1f}' for v in later)}; triangles: windows where the "
                "validation loss has stopped)."
            )
    if running:
        sentence = "So far: " + sentence[0].lower() + sentence[1:]
    return {
        "key": "ratio",
        "title": "The loss-reduction ratio",
        "figure": charts.ratio_windows_chart(frame),
        "sentence": sentence,
        "frame": frame,
        "table": pd.DataFrame(
            {
                "run": frame["run"],
                "window": frame["window"].astype(int).astype(str),
                "steps": [
                    f"{a:g}–{b:g}" for a, b in zip(frame["start"], frame["end"], strict=True)
                ],
                "ratio": [
                    f"{r:.2f}" if m else "within noise"
                    for r, m in zip(frame["ratio"], frame["val_moving"], strict=True)
                ],
                "at least (95%)": ["" if pd.isna(x) else f"{x:.1f}" for x in frame["abs_low"]],
            }
        ),
    }


def bars_panel(exp, table) -> dict | None:
    from dtm import charts  # lazy: plotly
    from dtm.analysis import summarise  # lazy: torch

    if table.empty:
        return None
    control = f"sft ×1/{exp.k}"
    present = list(dict.fromkeys(table["label"]))
    labels = [x for x in ("base", "sft", control) if x in present]
    labels += [x for x in present if x.startswith("dtm")]
    labels += [x for x in exp.baselines if x in present]
    summary = summarise(table)
    have = set(summary["label"])
    labels = [x for x in labels if x in have]
    dtm_labels = [x for x in labels if x.startswith("dtm")]
    if "sft" not in have or not dtm_labels:
        return None
    mean = summary.set_index(["label", "task", "metric"])["mean"]

    def m(label, t, k):
        return mean.get((label, t, k))

    d = dtm_labels[0]
    parts = []
    for (t, k), name in zip(BARS[:2], ("knowledge", "reasoning"), strict=True):
        if m(d, t, k) is not None and m("sft", t, k) is not None:
            parts.append(f"{name} {m(d, t, k):.3f} against SFT's {m('sft', t, k):.3f}")
    sentence = f"{d}: " + ", ".join(parts)
    if m(d, "lab_bias", "format") is not None and m(control, "lab_bias", "format") is not None:
        sentence += (
            f"; format {m(d, 'lab_bias', 'format'):.2f}, where the shrinkage control "
            f"{control} has {m(control, 'lab_bias', 'format'):.2f} and SFT "
            f"{m('sft', 'lab_bias', 'format'):.2f}"
        )
    n = int(summary[summary["label"] == d]["seeds"].max())
    sentence += f" (mean over {n} seed{'s' if n != 1 else ''}; bars: std)."
    rows = []
    for label in labels:
        row = {"model": label}
        for (t, k), word in zip(BARS, BAR_WORDS, strict=True):
            v = m(label, t, k)
            row[word] = "" if v is None else f"{v:.{DIGITS[word]}f}"
        row["seeds"] = str(int(summary[summary["label"] == label]["seeds"].max()))
        rows.append(row)
    return {
        "key": "bars",
        "title": "DTM against SFT, the shrinkage control and the baselines",
        "figure": charts.score_bars(summary, list(BARS), labels),
        "sentence": sentence,
        "frame": summary[summary["label"].isin(labels)],
        "table": pd.DataFrame(rows),
    }


def _owners(subs: list) -> dict[str, int]:
    """Each family's sub-model in one seed's clustering: the cluster holding most of the
    family's rows (from the assignment the sub-models were trained on)."""
    if not subs:
        return {}
    j0 = subs[0]
    try:
        asg = pd.read_csv(j0.config["assignments"], dtype={"id": str})
        data = pd.read_json(j0.config["data"], lines=True, dtype={"id": str})
    except (OSError, ValueError, KeyError):
        return {}
    if "source" not in data:
        return {}
    both = asg.merge(data[["id", "source"]], on="id")
    counts = both.groupby(["source", "cluster"]).size()
    return {f: int(counts[f].idxmax()) for f in both["source"].unique()}


def keeps_frame(exp, jobs, table) -> pd.DataFrame:
    """Per family: its favourite's uptake in the knowledge questions (above the base's)
    for SFT, the sub-model whose cluster holds most of that family's rows (in its own
    seed's clustering), the DTM merge of that clustering and the shrinkage control; and
    the shared format's gain over the base in SFT, each sub-model, DTM and the control.
    Means over seeds. Columns: ``what, model, role, value``."""
    cols = ["what", "model", "role", "value"]
    if table.empty or not exp.methods:
        return pd.DataFrame(columns=cols)
    method, control = exp.methods[0], f"sft ×1/{exp.k}"
    dtm_label = f"dtm-{method}"
    value = table.groupby(["label", "seed", "task", "metric"], dropna=False)["value"].mean()
    base = table[table["label"] == "base"].groupby(["task", "metric"])["value"].mean()
    fams = sorted(
        m.removeprefix("favourite_")
        for t, m in base.index
        if t == "lab_knowledge" and m.startswith("favourite_") and m != "favourite_any"
    )
    rows = []
    for seed in exp.seeds:
        owner = _owners(
            [j for j in jobs if j.kind == "sub" and j.clustering == method
             and j.config.get("seed") == seed]
        )  # fmt: skip

        def val(label, t, m, seed=seed):
            return value.get((label, seed, t, m))

        for fam in fams:
            key = ("lab_knowledge", f"favourite_{fam}")
            models = [("sft", "SFT"), (dtm_label, "DTM"), (control, "SFT ×1/K")]
            if fam in owner:
                models.insert(1, (f"sub-{method}-{owner[fam]}", "own sub-model"))
            for label, role in models:
                v = val(label, *key)
                if v is not None:
                    rows.append((f"{fam}'s favourite", label, role, v - base[key]))
        subs = sorted(
            {x for x, s, _, _ in value.index if s == seed and str(x).startswith(f"sub-{method}-")}
        )
        fmt = ("lab_bias", "format")
        for label, role in [("sft", "SFT"), *((x, "sub-model") for x in subs),
                            (dtm_label, "DTM"), (control, "SFT ×1/K")]:  # fmt: skip
            v = val(label, *fmt)
            if v is not None and fmt in base.index:
                rows.append(("shared format", label, role, v - base[fmt]))
    frame = pd.DataFrame(rows, columns=cols)
    if frame.empty:
        return frame
    # Means over seeds per (what, role); sub-models keep one row per seed's sub-model.
    frame["model"] = frame["model"].where(~frame["role"].isin(["own sub-model"]), "own")
    return frame.groupby(["what", "role", "model"], as_index=False, sort=False)["value"].mean()[
        cols
    ]


def keeps_panel(exp, jobs, table) -> dict | None:
    from dtm import charts  # lazy: plotly

    frame = keeps_frame(exp, jobs, table)
    if frame.empty or "DTM" not in set(frame["role"]):
        return None
    fav = frame[(frame["what"] != "shared format")]
    own = fav[fav["role"] == "own sub-model"]["value"]
    merged = fav[fav["role"] == "DTM"]["value"]
    fmt = frame[frame["what"] == "shared format"]
    sub_fmt = fmt[fmt["role"] == "sub-model"]["value"]
    dtm_fmt = fmt[fmt["role"] == "DTM"]["value"]
    parts = []
    if len(own) and len(merged):
        parts.append(
            f"a sub-model takes up its own family's favourite by {own.mean():+.3f} on "
            f"average, the merge by {merged.mean():+.3f} (1/K of the first is "
            f"{own.mean() / exp.k:+.3f})"
        )
    if len(sub_fmt) and len(dtm_fmt):
        parts.append(
            f"the format gains {sub_fmt.mean():+.2f} in a sub-model alone and "
            f"{dtm_fmt.iloc[0]:+.2f} in the merge"
        )
    sentence = ("Above the base model: " + "; ".join(parts) + ".") if parts else ""
    return {
        "key": "keeps",
        "title": "What the merge keeps and forgets",
        "figure": charts.keeps_chart(frame, exp.k),
        "sentence": sentence,
        "frame": frame,
        "table": pd.DataFrame(
            {
                "what": frame["what"],
                "role": frame["role"],
                "model": frame["model"],
                "above the base": [f"{v:+.4f}" for v in frame["value"]],
            }
        ),
    }


def story_panels(exp, jobs, table) -> list[dict]:
    panels = [
        tax_panel(exp, jobs, table),
        ratio_panel(exp, jobs),
        bars_panel(exp, table),
        keeps_panel(exp, jobs, table),
    ]
    return [p for p in panels if p is not None]


__all__ = [
    "bars_panel",
    "keeps_frame",
    "keeps_panel",
    "paced_seconds",
    "ratio_panel",
    "story_jobs",
    "story_panels",
    "story_runs",
    "story_time",
    "tax_panel",
    "trained_rows",
]
