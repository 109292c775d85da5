"""Disperse: split the instruction data into K subsets, describe them, and map them.

- ``disperse(emb, k, method, seed)`` -> cluster id per row (int32, shape (N,)).
  Methods: ``kmeans`` (the paper's: k-means on L2-normalised embeddings), ``random``
  (a seeded split into K equal-as-possible parts: the paper's random baseline) and
  ``agglomerative`` (Ward linkage on a PCA reduction; above ``AGGLO_EXACT_MAX`` rows it
  is fitted on a seeded sample and the rest go to the nearest cluster mean).
- ``silhouette(emb, labels)``: cosine silhouette on a seeded sample of 2,000 rows.
- ``cluster_keywords(texts, labels, k)``: each cluster's most distinctive words by
  class-based TF-IDF (c-TF-IDF, as in BERTopic).
- ``project_2d(emb, seed)``: PCA to 50 dimensions, then UMAP to 2-D, shape (N, 2).
- ``composition(values, labels, k)``: what each cluster holds, as counts of a column's
  values (a row's source, or its task); ``composition_sentence`` says it in words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from dtm.errors import ConfigError

METHODS = ("kmeans", "random", "agglomerative")
NAMES = {"kmeans": "k-means", "random": "random", "agglomerative": "agglomerative"}  # as shown
AGGLO_EXACT_MAX = 12_000
PCA_DIMS = 50
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean"}
TOP = 10  # values named per cluster in ``composition``; the rest are counted as OTHER
OTHER = "(other)"
NONE = "(none)"


def check_k(k: int, n_rows: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ConfigError(f"K must be a whole number (got {k!r}).")
    if k < 1:
        raise ConfigError(f"K must be at least 1 (got {k}).")
    if k > n_rows:
        raise ConfigError(f"K={k} is larger than the number of usable rows ({n_rows}).")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)} (got {method!r}).")


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dims = min(dims, x.shape[0], x.shape[1])
    if dims >= x.shape[1]:
        return x
    return PCA(n_components=dims, random_state=seed, svd_solver="randomized").fit_transform(x)


def disperse(emb: np.ndarray, k: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster id in 0..k-1 for each row of ``emb`` (N, d), deterministic in ``seed``."""
    n = emb.shape[0]
    check_k(k, n)
    check_method(method)
    if method == "random":
        labels = np.arange(n) % k
        return np.random.default_rng(seed).permutation(labels).astype(np.int32)
    if k == 1:
        return np.zeros(n, dtype=np.int32)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=3, random_state=seed)
        return km.fit_predict(x).astype(np.int32)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        z = _pca(x, PCA_DIMS, seed)
        fit_idx = (
            np.arange(n)
            if n <= AGGLO_EXACT_MAX
            else np.sort(np.random.default_rng(seed).choice(n, AGGLO_EXACT_MAX, replace=False))
        )
        fit_labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z[fit_idx])
        if len(fit_idx) == n:
            return fit_labels.astype(np.int32)
        means = np.stack([z[fit_idx][fit_labels == c].mean(0) for c in range(k)])
        d2 = (z * z).sum(1, keepdims=True) - 2 * z @ means.T + (means * means).sum(1)
        labels = d2.argmin(1)
        labels[fit_idx] = fit_labels
        return labels.astype(np.int32)
    raise AssertionError(method)


def silhouette(
    emb: np.ndarray, labels: np.ndarray, seed: int = 0, sample: int = 2000
) -> float | None:
    """Mean cosine silhouette on a sample; None when fewer than 2 clusters are non-empty."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return None
    return float(
        silhouette_score(
            emb, labels, metric="cosine", sample_size=min(sample, len(labels)), random_state=seed
        )
    )


def cluster_keywords(
    texts: list[str], labels: np.ndarray, k: int, top_n: int = 8
) -> list[list[str]]:
    """The ``top_n`` most distinctive words of each cluster by c-TF-IDF:
    tf(word, cluster) * log(1 + mean words per cluster / total count of word)."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(
        stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b", lowercase=True
    )
    try:
        counts = vec.fit_transform(texts)
    except ValueError:  # only stop words or no words at all
        return [[] for _ in range(k)]
    onehot = np.zeros((k, len(labels)), dtype=np.float32)
    onehot[labels, np.arange(len(labels))] = 1.0
    per_class = np.asarray((counts.T @ onehot.T).T)  # (k, vocab)
    tf = per_class / np.maximum(per_class.sum(1, keepdims=True), 1)
    idf = np.log(1 + per_class.sum(1).mean() / np.maximum(per_class.sum(0), 1))
    score = tf * idf
    vocab = vec.get_feature_names_out()
    out = []
    for c in range(k):
        top = np.argsort(-score[c], kind="stable")[:top_n]
        out.append([str(vocab[i]) for i in top if per_class[c, i] > 0])
    return out


def project_2d(emb: np.ndarray, seed: int = 0, pca_dims: int = PCA_DIMS) -> np.ndarray:
    """2-D map of ``emb`` (N, d): PCA to ``pca_dims`` then UMAP; float32 (N, 2).

    A fixed seed makes UMAP reproducible (and single-threaded). Under 4 rows there is
    nothing to embed, so the first two PCA axes are returned instead."""
    n = emb.shape[0]
    if n < 4:
        out = np.zeros((n, 2), dtype=np.float32)
        out[:, : min(2, emb.shape[1])] = emb[:, :2]
        return out
    import umap

    z = _pca(emb.astype(np.float32), pca_dims, seed)
    reducer = umap.UMAP(
        n_components=2,
        random_state=seed,
        n_neighbors=min(UMAP_PARAMS["n_neighbors"], n - 1),
        min_dist=UMAP_PARAMS["min_dist"],
        metric=UMAP_PARAMS["metric"],
    )
    return reducer.fit_transform(z).astype(np.float32)


def composition(
    values: Sequence[str], labels: np.ndarray, k: int, top: int = TOP
) -> list[dict[str, int]]:
    """For each cluster 0..k-1, its rows counted by value (an empty value is ``NONE``):
    the ``top`` largest first (ties by name), then ``OTHER`` for the rest when there are
    any, so that cluster c's counts sum to its size."""
    per: list[Counter] = [Counter() for _ in range(k)]
    for v, c in zip(values, labels, strict=True):
        per[int(c)][str(v) if v not in (None, "") else NONE] += 1
    out = []
    for counts in per:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = dict(ranked[:top])
        rest = sum(n for _, n in ranked[top:])
        out.append({**kept, OTHER: rest} if rest else kept)
    return out


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def composition_sentence(counts: list[dict[str, int]], noun: str = "source") -> str:
    """One sentence on what each cluster holds: its largest share of ``noun`` (a cluster
    of one value only "holds N x rows and nothing else"), then which values a cluster has
    none of. A cluster whose counts end in ``OTHER`` may hold any value, so it is never
    said to lack one."""
    parts = []
    for c, d in enumerate(counts):
        n = sum(d.values())
        named = {v: m for v, m in d.items() if v != OTHER}
        if not n:
            parts.append(f"cluster {c} is empty")
            continue
        top = min(named, key=lambda v: (-named[v], v)) if named else None
        if top is None:
            parts.append(f"cluster {c} holds {n} rows of many {noun}s")
        elif named[top] == n:
            parts.append(f"cluster {c} holds {n} {top} rows and nothing else")
        else:
            parts.append(f"cluster {c} is {named[top] / n:.0%} {top} ({named[top]} of {n})")
    seen = sorted({v for d in counts for v, m in d.items() if m and v != OTHER})
    lacking: dict[tuple[str, ...], list[int]] = {}
    for c, d in enumerate(counts):
        if d.get(OTHER) or not sum(d.values()):
            continue
        missing = tuple(v for v in seen if not d.get(v))
        if missing:
            lacking.setdefault(missing, []).append(c)
    for missing, clusters in lacking.items():
        who = "cluster" if len(clusters) == 1 else "clusters"
        ids = [str(c) for c in clusters]
        ids_text = ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + " and " + ids[-1]
        have = "has" if len(clusters) == 1 else "have"
        parts.append(f"{who} {ids_text} {have} no {_listed(list(missing))} row")
    if not lacking and len(counts) > 1 and all(sum(d.values()) for d in counts):
        if not any(d.get(OTHER) for d in counts):
            parts.append(f"every cluster holds every {noun}")
    text = "; ".join(parts)
    return f"By {noun}: {text}."
