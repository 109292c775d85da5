"""The data commands: ``data check``, ``disperse`` and ``curate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtm import threads
from dtm.cli.common import progress_bar
from dtm.cluster import METHODS, composition_sentence
from dtm.curate import curate_folder
from dtm.data import load_instructions
from dtm.disperse import DisperseConfig, disperse_to_folder
from dtm.embed import DEFAULT_MODEL, FIELDS, PRECISIONS
from dtm.train.config import TrainConfig


def cmd_data_check(args: argparse.Namespace) -> int:
    res = load_instructions(args.file, split=args.split, count_tokens=False)
    print(res.report.summary(max_examples=args.examples))
    return 0


def cmd_disperse(args: argparse.Namespace) -> int:
    threads.claim("dispersal")
    cfg = DisperseConfig(
        data=args.data,
        k=args.k,
        method=args.method,
        field=args.field,
        model=args.model,
        seed=args.seed,
        split=args.split,
        precision=args.precision,
    )
    res, csv_path, json_path = disperse_to_folder(
        cfg, args.out, force=args.force, project=not args.no_map, progress=progress_bar()
    )
    reused = [k for k, v in res.computed.items() if not v]
    print(res.report.summary(max_examples=3))
    sil = res.clusters["silhouette"]
    print(
        f"clusters (K={cfg.k}, {cfg.method}): sizes {res.clusters['sizes']}, "
        f"silhouette {'n/a' if sil is None else round(sil, 4)}"
    )
    for c, words in enumerate(res.clusters["keywords"]):
        print(f"  cluster {c}: {', '.join(words)}")
    for noun in ("task", "source"):
        if f"{noun}s" in res.clusters:
            print(composition_sentence(res.clusters[f"{noun}s"], noun))
    if reused:
        print(f"reused from the registry: {', '.join(reused)}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        base=args.base or "", data=args.data, out=args.out, kind="curate",
        curate_budget=args.curate_budget, curate_score=args.curate_score,
        curate_threshold=args.curate_threshold, max_length=args.max_length,
    )  # fmt: skip
    sel = curate_folder(cfg)
    kept, out = int(sel["kept"].sum()), Path(cfg.out)
    print(f"selection: kept {kept} of {len(sel)} rows; wrote {out}/selection.csv")
    return 0


def data_parser(data: argparse.ArgumentParser) -> None:
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="load a file and report kept and dropped rows")
    check.add_argument("file", help="JSONL, JSON, CSV or Parquet file, or a hub dataset id")
    check.add_argument("--split", default="train", help="split of a hub dataset")
    check.add_argument("--examples", type=int, default=20, help="dropped rows to list")
    check.set_defaults(func=cmd_data_check)


def disperse_parser(d: argparse.ArgumentParser) -> None:
    d.add_argument("--data", required=True, help="data file or hub dataset id")
    d.add_argument("--k", type=int, required=True, help="number of clusters (sub-models)")
    d.add_argument("--method", default="kmeans", choices=METHODS)
    d.add_argument(
        "--field",
        default="instruction",
        choices=FIELDS,
        help="text to embed: the instruction, the response, or both",
    )
    d.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="sentence-transformers model: a local folder or a hub id",
    )
    d.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="encoder arithmetic: auto = bf16 where the hardware has native bf16",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="train", help="split of a hub dataset")
    d.add_argument("--no-map", action="store_true", help="skip the 2-D UMAP projection")
    d.add_argument("--force", action="store_true", help="replace outputs already in --out")
    d.add_argument("--out", required=True, help="folder for assignments.csv, clusters.json")
    d.set_defaults(func=cmd_disperse)


def curate_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("--data", required=True, help="instruction data file (or hub dataset id)")
    c.add_argument("--base", default=None, help="the model whose IFD scores the rows (ifd)")
    c.add_argument("--curate-budget", dest="curate_budget", required=True,
                   help="rows kept: a count (800) or a fraction (0.25)")  # fmt: skip
    c.add_argument("--curate-score", dest="curate_score", default="ifd",
                   help="ifd, column:NAME or deita:COMPLEXITY_MODEL,QUALITY_MODEL")  # fmt: skip
    c.add_argument("--curate-threshold", dest="curate_threshold", type=float, default=0.9,
                   help="keep a row only if its cosine to every kept row is below")  # fmt: skip
    c.add_argument("--max-length", dest="max_length", type=int, default=1024)
    c.add_argument("--out", required=True, help="folder for selection.csv")
    c.set_defaults(func=cmd_curate)


PARSERS = {"data": data_parser, "disperse": disperse_parser, "curate": curate_parser}
