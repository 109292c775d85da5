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

    .venv/bin/python bench/lab_story.py [--cache DIR] [--experiment lab] [--moved-from OLD]

``--cache``: the story's cache (default: the project's); ``--moved-from``: the folder the
cache was copied from, when it was (its paths are rewritten to ``--cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}"


def moved(path: str, old: str | None, new: Path) -> Path:
    return Path(path.replace(old, str(new))) if old else Path(path)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--experiment", default="lab")
    ap.add_argument("--moved-from", default=None)
    args = ap.parse_args()
    if args.cache:
        os.environ["DTM_CACHE"] = str(args.cache.resolve())
    from dtm import jobs
    from dtm.analysis import code_token_drops, encode_split, ratio_windows
    from dtm.models import load_base
    from dtm.score import scores
    from dtm.store import cache_dir, read_metrics

    cache = cache_dir()
    table = scores(group=args.experiment)
    mean = table.groupby(["label", "seed", "task", "metric"])["value"].mean()
    listed = jobs.JobStore().list(group=args.experiment)
    sfts = sorted((j for j in listed if j.kind == "sft"), key=lambda j: j.config["seed"])
    a_rows, b_rows, c_rows = [], [], []
    for j in sfts:
        seed = j.config["seed"]
        run = moved(str(j.run_dir), args.moved_from, cache)
        lab = moved(
            j.config["eval_lab"] or str(Path(j.config["base"]).parent), args.moved_from, cache
        )
        if not (lab / "lab.json").exists():
            lab = Path(j.config["base"]).parent
        recs = read_metrics(run / "metrics.jsonl")
        # (a)
        for key in ("format", "instruct"):
            t, m = ("lab_bias", "format") if key == "format" else ("lab_instruct", "acc")
            ref = mean.get(("sft", seed, t, m))
            subs = sorted(
                lab_ for lab_, s, tt, mm in mean.index if s == seed and tt == t and mm == m
                and str(lab_).startswith("sub-")
            )  # fmt: skip
            shares = [mean[(x, seed, t, m)] / ref if ref else None for x in subs]
            a_rows.append((seed, key, ref, subs, shares))
        # (b)
        scored = [r for r in recs if r.get("bench")]
        fmt = [r["bench"]["lab_bias"]["format"] for r in scored]
        t90 = next(
            r["step"]
            for r, f in zip(scored, fmt, strict=True)
            if f - fmt[0] >= 0.9 * (fmt[-1] - fmt[0])
        )
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
        # (c)
        w = ratio_windows(recs)
        early = run / "early"
        drops = None
        if early.is_dir():
            from peft import PeftModel

            e_model = PeftModel.from_pretrained(load_base(str(lab / "model"))[0], early)
            l_model, tok = load_base(str(lab / "model"))
            l_model = PeftModel.from_pretrained(l_model, run / "adapter")
            probe = encode_split(str(lab / "data" / "train.jsonl"), tok, n=200, seed=seed)
            val = encode_split(str(lab / "data" / "val.jsonl"), tok, n=200, seed=seed)
            step = json.loads((early / "early.json").read_text())["step"]
            drops = (step, code_token_drops(e_model, l_model, tok, probe),
                     code_token_drops(e_model, l_model, tok, val))  # fmt: skip
        c_rows.append((seed, w, drops))

    print("(a) each sub-model's score as a share of SFT's (per seed: min .. max over its subs)")
    for seed, key, ref, subs, shares in a_rows:
        ok = sum(s is not None and s >= 0.9 for s in shares)
        vals = [s for s in shares if s is not None]
        print(
            f"  seed {seed} {key}: SFT {ref:.3f}; sub-models {min(vals):.2f} .. {max(vals):.2f} "
            f"of it; {ok} of {len(subs)} at 90% or more"
        )
    print("(b) when the tax comes")
    for seed, t90, shares, uptake, led in b_rows:
        print(
            f"  seed {seed}: format at 90% of its gain by step {t90}; by then "
            f"{shares['lab_knowledge']:.2f} of the knowledge drop, "
            f"{shares['lab_reasoning']:.2f} of the reasoning drop"
            if None not in shares.values()
            else f"  seed {seed}: format at 90% by step {t90}; drops {shares}"
        )
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
    for seed, w, drops in c_rows:
        parts = []
        for r in w.to_dict("records"):
            if r["val_moving"]:
                parts.append(f"{int(r['start'])}–{int(r['end'])}: {r['ratio']:.2f} "
                             f"[{r['low']:.2f}, {r['high']:.2f}]")  # fmt: skip
            elif r["abs_low"] == r["abs_low"] and r["abs_low"] is not None:
                parts.append(f"{int(r['start'])}–{int(r['end'])}: |ratio| ≥ {r['abs_low']:.1f}")
            else:
                parts.append(f"{int(r['start'])}–{int(r['end'])}: -")
        print(f"  seed {seed}: " + " · ".join(parts))
        if drops:
            step, tr, va = drops
            print(
                f"    from step {step} to the end: {tr['code_share']:.0%} of the train probe's "
                f"loss fall is on the row codes ({tr['code_token_share']:.0%} of its tokens); "
                f"on validation the fall is {va['drop'] / va['tokens']:+.3f} per token "
                f"against the probe's {tr['drop'] / tr['tokens']:+.3f}"
            )


if __name__ == "__main__":
    main()
