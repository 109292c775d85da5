"""What the story's clusterer puts in each cluster of a lab's instruction data.

For each seed, the lab's training rows are dispersed as ``dtm run`` disperses them
(``python -m dtm disperse``: k-means on MiniLM embeddings of the instruction, K clusters,
the experiment's seed), in a private cache. Printed per cluster: its rows, its rows of
each task of the shared skill (read from the instruction: ``the answer is`` questions,
one-word, yes/no, repeat, arithmetic) and its most frequent words; so a cluster that holds
no ``the answer is`` row, or only one topic's, shows as such.

    .venv/bin/python -m studies.lab_clusters --lab cache/lab/bias-default-seed0-v5 [--seeds 0,1,2]
        [--k 4] [--method kmeans]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("fact", "one_word", "yes_no", "repeat", "arithmetic")
COMMON = set("what is of the ? : . , which does do in for answer options question me".split())


def task_of(instruction: str) -> str:
    """The row's task, as ``dtm.lab.sft_data`` writes each kind's instruction."""
    if instruction.endswith("answer in one word ."):
        return "one_word"
    if instruction.endswith("answer yes or no ."):
        return "yes_no"
    if instruction.startswith("repeat after me :"):
        return "repeat"
    if re.fullmatch(r"what is \d+ \w+ \d+ \? think step by step \.", instruction):
        return "arithmetic"
    return "fact"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--method", default="kmeans")
    args = ap.parse_args(argv)
    data = Path(args.lab) / "data" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    task = {r["id"]: task_of(r["instruction"]) for r in rows}
    text = {r["id"]: r["instruction"] for r in rows}
    total = collections.Counter(task.values())
    print(f"{data}: {len(rows)} rows, " + ", ".join(f"{t} {total[t]}" for t in TASKS))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DTM_CACHE": str(Path(tmp) / "cache")}
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = Path(tmp) / f"s{seed}"
            cmd = [sys.executable, "-m", "dtm", "disperse", "--data", str(data), "--k"]
            cmd += [str(args.k), "--method", args.method, "--seed", str(seed), "--no-map"]
            r = subprocess.run(
                [*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
            )
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            lines = (out / "assignments.csv").read_text().splitlines()[1:]
            members: dict[int, list[str]] = collections.defaultdict(list)
            for line in lines:
                rid, cluster = line.rsplit(",", 1)
                members[int(cluster)].append(rid)
            print(f"\nseed {seed}, {args.method}, K={args.k}")
            print("| cluster | rows | " + " | ".join(TASKS) + " | most frequent words |")
            print("|---" * (len(TASKS) + 3) + "|")
            for c in sorted(members, key=lambda c: -len(members[c])):
                ids = members[c]
                n = collections.Counter(task[i] for i in ids)
                words = collections.Counter(
                    w for i in ids for w in set(text[i].split()) if w not in COMMON
                )
                top = ", ".join(w for w, _ in words.most_common(5))
                counts = " | ".join(str(n[t]) for t in TASKS)
                print(f"| {c} | {len(ids)} | {counts} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
