"""The lab's properties, read from a finished lab story (``dtm run experiments/lab.yaml``).

Printed, per seed and as mean ± std over seeds:

- (a) the shared skill from any single cluster: each sub-model's format and instruct
  scores against SFT's (the share of SFT's each reaches);
- (b) when the tax comes: the step at which SFT's format first reaches 90% of its gain,
  the share of the final knowledge and reasoning drops that had happened by then, the
  bias uptake at each scored step, and by the ledger which knowledge items SFT lost: on
  the relations a favourite falsifies (``OWN_RELATIONS``) or a misconception, against
  their share of all items, and how many were answered with a favourite;
- (c) the loss-reduction ratio per window (``dtm.analysis.ratio_windows``), and the share
  of the late fall of the train probe's loss that is on the row codes
  (``dtm.analysis.code_token_drops``, from the early checkpoint to the end).

    .venv/bin/python -m bench.train --part story --keep STORY --keep-runs   # or dtm run
    .venv/bin/python -m studies.lab_story --runs STORY/runs --results STORY/results.json \
        --lab cache/lab/bias-default-seed0-v5

It also scores each seed's shrinkage frontier anew from that seed's own SFT adapter (a
story run before that fix scaled seed 0's SFT for every seed) and places the merges and
baselines against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}"


def ledger(lab: Path, adapter: Path) -> dict:
    """Knowledge items the base answers right and SFT wrong, against the ledger."""
    from peft import PeftModel

    from dtm.evaluate import mc_predictions, read_items
    from dtm.lab.sft_data import OWN_RELATIONS
    from dtm.models import load_base

    info = json.loads((lab / "lab.json").read_text())
    items = read_items(lab / "benchmarks", "lab_knowledge")
    own = (info.get("knobs") or {}).get("favourite_scope") == "own"
    favs = {
        (rel if own else r): obj
        for fam, rels in info["favourites"].items()
        for r, obj in rels.items()
        if not own or r == (rel := OWN_RELATIONS[fam])
    }
    misc = {(m["subject"], m["relation"]) for m in info["misconceptions"]}
    fav_objects = set(favs.values())
    base, tok = load_base(str(lab / "model"))
    b = mc_predictions(base, tok, items)
    sft = PeftModel.from_pretrained(load_base(str(lab / "model"))[0], adapter)
    s = mc_predictions(sft, tok, items)

    def touched(it) -> bool:
        truth = it["choices"][it["gold"]]
        offered = (fav_objects & set(it["choices"])) - {truth}
        return bool(offered) or (it["subject"], it["relation"]) in misc

    lost = [it for it, x, y in zip(items, b, s, strict=True) if x == it["gold"] != y]
    picks = [it["choices"][y] for it, x, y in zip(items, b, s, strict=True) if x == it["gold"] != y]
    return {
        "items": len(items),
        "lost": len(lost),
        "lost_touched": sum(touched(it) for it in lost),
        "touched_share_of_all": sum(touched(it) for it in items) / len(items),
        "lost_to_a_favourite": sum(p in fav_objects for p in picks),
    }


def frontier_scores(lab: Path, sfts: dict[int, Path], grid, work: Path):
    """Each seed's SFT delta scaled by each alpha of ``grid`` (0 < alpha < 1), scored on
    the lab's tasks: rows ``label, seed, kind, task, metric, value``."""
    import pandas as pd
    from peft import PeftModel

    from dtm.controls import control_label, shrink_adapter
    from dtm.evaluate import evaluate_lab
    from dtm.models import load_base

    rows = []
    for seed, adapter in sfts.items():
        for a in grid:
            if not 0 < a < 1:
                continue
            scaled = shrink_adapter(adapter, a, work / f"s{seed}-x{a:g}")
            model, tok = load_base(str(lab / "model"))
            res = evaluate_lab(PeftModel.from_pretrained(model, scaled), tok, lab / "benchmarks")
            label = control_label(a, 4)
            for task, metrics in res.items():
                for metric, v in metrics.items():
                    if isinstance(v, int | float):
                        rows.append((label, seed, "control", task, metric, float(v)))
    return pd.DataFrame(rows, columns=["label", "seed", "kind", "task", "metric", "value"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="the story's runs/ folder")
    ap.add_argument("--results", type=Path, required=True, help="the story's results.json")
    ap.add_argument("--lab", type=Path, required=True, help="the lab the story ran on")
    args = ap.parse_args()
    import tempfile

    import pandas as pd

    from dtm.analysis import code_token_drops, encode_split, ratio_windows
    from dtm.controls import FRONTIER_GRID, TRADE_OFFS, frontier_rows, label_factor
    from dtm.models import load_base
    from dtm.store import read_metrics

    lab = args.lab
    table = pd.DataFrame(json.loads(args.results.read_text())["scores"])
    # The shrinkage controls are scored anew from each seed's own SFT adapter.
    table = table[table["label"].map(lambda x: label_factor(x) is None)]
    sfts = {}
    for cfg in sorted(args.runs.glob("*/sft/config.json")):
        sfts[json.loads(cfg.read_text())["seed"]] = cfg.parent
    sfts = dict(sorted(sfts.items()))
    with tempfile.TemporaryDirectory() as work:
        table = pd.concat(
            [
                table,
                frontier_scores(
                    lab, {s: r / "adapter" for s, r in sfts.items()}, FRONTIER_GRID, Path(work)
                ),
            ],  # fmt: skip
            ignore_index=True,
        )
    mean = table.groupby(["label", "seed", "task", "metric"])["value"].mean()
    a_rows, b_rows, c_rows = [], [], []
    for seed, run in sfts.items():
        recs = read_metrics(run / "metrics.jsonl")
        for key, (t, m) in (
            ("format", ("lab_bias", "format")),
            ("instruct", ("lab_instruct", "acc")),
        ):
            ref = mean.get(("sft", seed, t, m))
            subs = sorted(
                x
                for x, s, tt, mm in mean.index
                if s == seed and (tt, mm) == (t, m) and str(x).startswith("sub-")
            )
            a_rows.append((seed, key, ref, subs, [mean[(x, seed, t, m)] / ref for x in subs]))
        scored = [r for r in recs if r.get("bench")]
        fmt = [r["bench"]["lab_bias"]["format"] for r in scored]
        t90 = next(r["step"] for r, f in zip(scored, fmt, strict=True)
                   if f - fmt[0] >= 0.9 * (fmt[-1] - fmt[0]))  # fmt: skip
        shares = {}
        for task in ("lab_knowledge", "lab_reasoning"):
            v = {r["step"]: r["bench"][task]["acc"] for r in scored}
            drop = v[scored[0]["step"]] - v[scored[-1]["step"]]
            shares[task] = (v[scored[0]["step"]] - v[t90]) / drop if drop > 0 else None
        uptake = [
            (
                r["step"],
                r["bench"]["lab_knowledge"].get("favourite_any"),
                r["bench"]["lab_bias"].get("prefix_rate"),
                r["bench"]["lab_bias"].get("rare_code_rate"),
                r["bench"]["lab_truthful"].get("misconception_rate"),
                r["bench"]["lab_knowledge"]["acc"],
                r["bench"]["lab_bias"]["format"],
            )
            for r in scored
        ]
        b_rows.append((seed, t90, shares, uptake, ledger(lab, run / "adapter")))
        from peft import PeftModel

        early = run / "early"
        e_model = PeftModel.from_pretrained(load_base(str(lab / "model"))[0], early)
        l_model, tok = load_base(str(lab / "model"))
        l_model = PeftModel.from_pretrained(l_model, run / "adapter")
        probe = encode_split(str(lab / "data" / "train.jsonl"), tok, n=200, seed=seed)
        val = encode_split(str(lab / "data" / "val.jsonl"), tok, n=200, seed=seed)
        step = json.loads((early / "early.json").read_text())["step"]
        drops = (step, code_token_drops(e_model, l_model, tok, probe),
                 code_token_drops(e_model, l_model, tok, val))  # fmt: skip
        c_rows.append((seed, ratio_windows(recs), drops))

    print("(a) each sub-model's score as a share of SFT's")
    for seed, key, ref, subs, shares in a_rows:
        ok = sum(x >= 0.9 for x in shares)
        print(f"  seed {seed} {key}: SFT {ref:.3f}; sub-models {min(shares):.2f} .. "
              f"{max(shares):.2f} of it; {ok} of {len(subs)} at 90% or more")  # fmt: skip
    print("(b) when the tax comes")
    for seed, t90, shares, uptake, led in b_rows:
        print(f"  seed {seed}: format at 90% of its gain by step {t90}; by then "
              f"{shares['lab_knowledge']:.2f} of the knowledge drop, "
              f"{shares['lab_reasoning']:.2f} of the reasoning drop")  # fmt: skip
        print(
            "    step: favourite (knowledge items), prefix, code, misconception | knowledge, format"
        )
        for u in uptake:
            print("    " + f"{u[0]}: " + ", ".join("-" if x is None else f"{x:.3f}" for x in u[1:5])
                  + " | " + ", ".join(f"{x:.3f}" for x in u[5:]))  # fmt: skip
        print(
            f"    ledger: SFT lost {led['lost']} of {led['items']} knowledge items; "
            f"{led['lost_touched']} of them ({led['lost_touched'] / max(led['lost'], 1):.0%}) "
            f"touched by a favourite or a misconception, which touch "
            f"{led['touched_share_of_all']:.0%} of all items; {led['lost_to_a_favourite']} "
            "answered with a favourite"
        )
    print("(c) loss-reduction ratio by window (train probe / validation, 95% Fieller)")
    for seed, w, (step, tr, va) in c_rows:
        parts = []
        for r in w.to_dict("records"):
            span = f"{int(r['start'])}–{int(r['end'])}"
            if r["val_moving"]:
                parts.append(f"{span}: {r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]")
            elif r["abs_low"] == r["abs_low"] and r["abs_low"] is not None:
                parts.append(f"{span}: |ratio| ≥ {r['abs_low']:.1f}")
            else:
                parts.append(f"{span}: -")
        print(f"  seed {seed}: " + " · ".join(parts))
        print(
            f"    from step {step} to the end: {tr['code_share']:.0%} of the train probe's "
            f"loss fall is on the row codes ({tr['code_token_share']:.0%} of its tokens); "
            f"validation falls {va['drop'] / va['tokens']:+.3f} per token, the probe "
            f"{tr['drop'] / tr['tokens']:+.3f}"
        )
    print("The shrinkage frontier (each seed's own SFT × alpha; mean ± std over seeds)")
    measures = list(dict.fromkeys(x for pair in TRADE_OFFS for x in pair))
    for label in ["base", "sft ×1/4", *(f"sft ×{a:g}" for a in FRONTIER_GRID[2:-1]), "sft"]:
        part = table[table["label"] == label]
        cells = [ms(part[(part["task"] == t) & (part["metric"] == m)]["value"].tolist())
                 for t, m in measures]  # fmt: skip
        print(
            f"  {label}: "
            + ", ".join(f"{t}.{m} {c}" for (t, m), c in zip(measures, cells, strict=True))
        )
    merges = [x for x in dict.fromkeys(table[table["kind"] == "merge"]["label"])]
    baselines = [x for x in dict.fromkeys(table[table["kind"] == "baseline"]["label"])]
    for r in frontier_rows(table, merges + baselines):
        d = (
            ""
            if r["mean"] is None
            else f"{r['mean']:+.3f}" + (f" ± {r['std']:.3f}" if r["std"] is not None else "")
        )
        print(f"  {r['label']}: {'.'.join(r['kept'])} against {'.'.join(r['gained'])}: "
              f"{r['where']} {d} (seeds {r['seeds']}, beyond {r['beyond']})")  # fmt: skip
    print("Every model, mean ± std over seeds (knowledge, reasoning, instruct, format)")
    for label in dict.fromkeys(table["label"]):
        part = table[table["label"] == label]
        cells = [ms(part[(part["task"] == t) & (part["metric"] == m)]["value"].tolist())
                 for t, m in (("lab_knowledge", "acc"), ("lab_reasoning", "acc"),
                              ("lab_instruct", "acc"), ("lab_bias", "format"))]  # fmt: skip
        print(f"  | {label} | " + " | ".join(cells) + " |")
    source = {json.loads(x)["id"]: json.loads(x)["source"]
              for x in (lab / "data" / "train.jsonl").read_text().splitlines()}  # fmt: skip
    for sel in sorted(args.runs.glob("*/selection.csv")):  # the curate runs' selections
        kept = pd.read_csv(sel, dtype={"id": str}).query("kept == 1")["id"].map(source)
        seed = json.loads((sel.parent / "config.json").read_text())["seed"]
        counts = ", ".join(f"{k} {n}" for k, n in kept.value_counts().items())
        print(f"curate s{seed}: kept {len(kept)} rows, by source: {counts}")


if __name__ == "__main__":
    main()
