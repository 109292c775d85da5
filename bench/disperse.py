"""Disperse benchmark: this project's pipeline beside the naive one, in one run.

naive: SentenceTransformer.encode with default settings (fp32, batch 32), then UMAP with
       default settings on the raw 384-d embeddings.
dtm:   dtm.embed.encode (dedupe, length order, batch 128, bf16 autocast where native),
       then dtm.cluster.project_2d (PCA to 50 dimensions, then seeded UMAP).

Both maps are scored by trustworthiness (sklearn, 5 neighbours) on the same 2,000-point
sample against the fp32 embeddings, so a lossy encoder would count against dtm. Also
timed: re-clustering with another K on cached embeddings (the assignment step: k-means,
silhouette, keywords) and a warm reopen of page 1 (a new session of the same server
process, under Streamlit's AppTest, with every artifact cached).

    .venv/bin/python -m bench.disperse --sizes 2000,10000,52000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def trust(reference: np.ndarray, xy: np.ndarray, seed: int = 0, n: int = 2000) -> float:
    from sklearn.manifold import trustworthiness

    idx = np.random.default_rng(seed).choice(len(xy), min(n, len(xy)), replace=False)
    return float(trustworthiness(reference[idx], xy[idx], n_neighbors=5))


def naive(texts: list[str]):
    import umap
    from sentence_transformers import SentenceTransformer

    from dtm.embed import DEFAULT_MODEL, resolve_model

    model = SentenceTransformer(resolve_model(DEFAULT_MODEL), device="cpu")
    emb, t_emb = timed(lambda: model.encode(texts))
    xy, t_proj = timed(lambda: umap.UMAP().fit_transform(emb))
    return emb, xy, t_emb, t_proj


def ours(texts: list[str], seed: int):
    from dtm.cluster import project_2d
    from dtm.embed import encode

    emb, t_emb = timed(lambda: encode(texts))
    xy, t_proj = timed(lambda: project_2d(emb, seed))
    return emb, xy, t_emb, t_proj


def warm_up_numba() -> None:
    """Compile UMAP's numba kernels once, so neither side pays for it in its timing."""
    import umap

    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    umap.UMAP(random_state=0).fit_transform(x)
    umap.UMAP().fit_transform(x)


def recluster_and_reopen(n: int, seed: int, repeats: int) -> tuple[float, list[float]]:
    """Seconds to re-cluster with another K on cached embeddings, and warm page reopens."""
    from streamlit.testing.v1 import AppTest

    from dtm.disperse import DisperseConfig, assignment_step, run_disperse
    from dtm.samples import synthetic_instructions, write_jsonl
    from dtm.store import Registry

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DTM_CACHE"] = str(Path(tmp) / "cache")
        path = write_jsonl(synthetic_instructions(n, seed), Path(tmp) / "data.jsonl")
        reg = Registry()
        res = run_disperse(DisperseConfig(data=str(path), k=4, seed=seed), reg)
        ds, emb = res.artifacts["dataset"], res.artifacts["embedding"]
        (_, computed), t_re = timed(lambda: assignment_step(ds, emb, reg, k=8, seed=seed))
        assert computed
        opens = []
        for _ in range(repeats + 1):
            at = AppTest.from_file(str(ROOT / "views" / "disperse.py"), default_timeout=600)
            at.session_state["ds_kind"] = "Local path"
            at.session_state["ds_path"] = str(path)
            _, t = timed(at.run)
            assert not at.exception, at.exception
            opens.append(t)
        return t_re, opens[1:]  # the first open fills Streamlit's own caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,10000,52000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reopens", type=int, default=5)
    args = ap.parse_args()

    import pandas as pd
    import torch

    from dtm.data import load_instructions  # noqa: F401  (import cost outside timings)
    from dtm.embed import auto_precision, field_texts, load_encoder
    from dtm.samples import synthetic_instructions

    load_encoder()
    warm_up_numba()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores; dtm precision: {auto_precision()}"
    )
    head = (
        f"{'N':>6} {'pipeline':>8} {'embed sent/s':>12} {'embed s':>8} {'project s':>9} "
        f"{'total s':>8} {'trust':>6}"
    )
    rows = []
    for n in map(int, args.sizes.split(",")):
        table = pd.DataFrame(synthetic_instructions(n, args.seed)).rename(
            columns={"output": "response"}
        )
        texts = field_texts(table, "instruction")
        e_naive, xy_naive, te_n, tp_n = naive(texts)
        e_ours, xy_ours, te_o, tp_o = ours(texts, args.seed)
        t_n, t_o = trust(e_naive, xy_naive, args.seed), trust(e_naive, xy_ours, args.seed)
        cos = float((e_naive * e_ours).sum(1).min())
        rows.append((n, "naive", n / te_n, te_n, tp_n, te_n + tp_n, t_n))
        rows.append((n, "dtm", n / te_o, te_o, tp_o, te_o + tp_o, t_o))
        print(head if len(rows) == 2 else "", flush=True)
        for r in rows[-2:]:
            print(
                f"{r[0]:>6} {r[1]:>8} {r[2]:>12.0f} {r[3]:>8.1f} {r[4]:>9.1f} {r[5]:>8.1f} "
                f"{r[6]:>6.3f}",
                flush=True,
            )
        print(f"{'':>6} unique texts {len(set(texts)) / n:.1%}")
        print(
            f"{'':>6} speed-up end to end {(te_n + tp_n) / (te_o + tp_o):.2f}x, "
            f"trust diff {t_o - t_n:+.3f}, min cosine dtm vs fp32 {cos:.5f}",
            flush=True,
        )
    n = max(map(int, args.sizes.split(",")))
    t_re, opens = recluster_and_reopen(n, args.seed, args.reopens)
    print(f"\nN={n}: re-cluster K=4 -> K=8 on cached embeddings: {t_re:.2f} s")
    print(
        f"N={n}: warm reopen of page 1: median {statistics.median(opens):.2f} s, "
        f"max {max(opens):.2f} s over {len(opens)}"
    )


if __name__ == "__main__":
    main()
