"""The Disperse steps as registered, cached functions: file -> table -> embeddings ->
assignment, and embeddings -> 2-D map.

Each step returns an ``Artifact`` (a registry row and its folder) keyed by a hash of its
inputs, so the same work is never done twice and every result names what produced it:

=============  ==========================================  ==========================
kind           inputs                                      files
=============  ==========================================  ==========================
dataset        content hash (or hub id + fingerprint)      table.parquet, report.json
embedding      dataset key, model identity, field          embeddings.npy (N, d) f32
assignment     embedding key, k, method, seed              labels.npy (N,), clusters.json
projection     embedding key, seed, PCA dims, UMAP params  xy.npy (N, 2) f32
=============  ==========================================  ==========================

clusters.json holds, per cluster, its rows counted by ``source`` (``sources[i]``: the 10
largest, then ``(other)``, so it sums to ``sizes[i]``) and, for a lab's data, by task
(``tasks[i]``, the same shape, from the lab's ledger beside the data file). A file written
before these counts existed still loads: ``assignment_info`` counts them again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dtm import cluster, data, embed, threads
from dtm.errors import ConfigError
from dtm.models import lab_of
from dtm.store import (
    Artifact,
    Registry,
    file_digest,
    input_key,
    write_json_atomic,
    write_text_atomic,
)

_noop = lambda stage, frac: None  # noqa: E731


def dataset_step(
    source: str | Path,
    registry: Registry,
    *,
    split: str = "train",
    progress: embed.Progress = _noop,
) -> Artifact:
    """Load and normalise ``source`` once per distinct content."""
    src = str(source)
    progress("loading data", 0.0)
    if Path(src).expanduser().exists() and not Path(src).expanduser().is_dir():
        inputs: dict[str, Any] = {
            "content": file_digest(Path(src).expanduser()),
            "format": Path(src).suffix.lower(),
        }
        loaded = None
    else:
        loaded = data.load_instructions(src, split=split)  # a hub id (or an error)
        inputs = {
            "hub": src,
            "split": split,
            "rows": pd.util.hash_pandas_object(loaded.table, index=False).sum().item(),
        }
    inputs["loader"] = data.LOADER_VERSION

    def build(folder: Path) -> dict[str, Any]:
        res = loaded or data.load_instructions(src, split=split)
        res.table.to_parquet(folder / "table.parquet", index=False)
        (folder / "report.json").write_text(json.dumps(res.report.to_dict()))
        return {"source": src, "n_rows": len(res.table), "n_dropped": len(res.report.dropped)}

    art, _ = registry.produce("dataset", inputs, build)
    progress("loading data", 1.0)
    return art


def read_table(ds: Artifact) -> pd.DataFrame:
    return pd.read_parquet(ds.path / "table.parquet")


def read_report(ds: Artifact) -> data.LoadReport:
    return data.LoadReport.from_dict(json.loads((ds.path / "report.json").read_text()))


def embedding_step(
    ds: Artifact,
    registry: Registry,
    *,
    field: str = "instruction",
    model: str = embed.DEFAULT_MODEL,
    precision: str = "auto",
    progress: embed.Progress = _noop,
) -> tuple[Artifact, bool]:
    """Embed one field of the dataset; ``(artifact, computed)``."""
    embed.check_field(field)
    precision = embed.resolve_precision(precision)
    inputs = {
        "dataset": ds.key,
        "model": embed.model_identity(model),
        "field": field,
        "precision": precision,
    }

    def build(folder: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        texts = embed.field_texts(read_table(ds), field)
        emb = embed.encode(texts, model, precision=precision, progress=progress)
        secs = time.perf_counter() - t0
        np.save(folder / "embeddings.npy", emb)
        return {
            "model": model,
            "field": field,
            "precision": precision,
            "dim": int(emb.shape[1]),
            "seconds": round(secs, 3),
            "sentences_per_s": round(len(emb) / secs, 1),
        }

    return registry.produce("embedding", inputs, build)


def read_embeddings(emb: Artifact) -> np.ndarray:
    return np.load(emb.path / "embeddings.npy", mmap_mode="r")


def assignment_step(
    ds: Artifact,
    emb: Artifact,
    registry: Registry,
    *,
    k: int,
    method: str = "kmeans",
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> tuple[Artifact, bool]:
    """Cluster the embeddings into K subsets, with sizes, keywords, a silhouette and what
    each cluster holds (by source; by task too when ``tasks`` gives each row's)."""
    inputs = _assignment_inputs(emb, k, method, seed)
    x = read_embeddings(emb)
    cluster.check_k(k, x.shape[0])
    cluster.check_method(method)

    def build(folder: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        labels = cluster.disperse(np.asarray(x), k, method, seed)
        table = read_table(ds)
        texts = embed.field_texts(table, emb.inputs["field"])
        info = {
            "k": int(k),
            "method": method,
            "seed": int(seed),
            "field": emb.inputs["field"],
            "model": emb.meta["model"],
            "n": int(len(labels)),
            "sizes": np.bincount(labels, minlength=k).tolist(),
            "silhouette": cluster.silhouette(np.asarray(x), labels, seed),
            "keywords": cluster.cluster_keywords(texts, labels, k),
            **_composition(table, labels, k, tasks),
            "dataset": ds.key,
            "embedding": emb.key,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        np.save(folder / "labels.npy", labels)
        (folder / "clusters.json").write_text(json.dumps(info, indent=2))
        return {
            "k": int(k),
            "method": method,
            "seed": int(seed),
            "dataset": ds.key,
            "field": emb.inputs["field"],
            "silhouette": info["silhouette"],
        }

    return registry.produce("assignment", inputs, build)


def _assignment_inputs(emb: Artifact, k: int, method: str, seed: int) -> dict[str, Any]:
    return {"embedding": emb.key, "k": int(k), "method": method, "seed": int(seed)}


def _composition(
    table: pd.DataFrame, labels: np.ndarray, k: int, tasks: Sequence[str] | None
) -> dict[str, list[dict[str, int]]]:
    """``sources`` (and ``tasks`` when known): each cluster's rows by value."""
    out = {"sources": cluster.composition(table["source"].tolist(), labels, k)}
    if tasks is not None:
        out["tasks"] = cluster.composition(list(tasks), labels, k)
    return out


def ledger_path(data_file: str | Path) -> Path:
    """Where a lab keeps the ledger of a data file's rows: ``train.jsonl`` ->
    ``train_biases.jsonl`` (one JSON line per row: id, source, task, biases)."""
    p = Path(data_file).expanduser()
    return p.with_name(f"{p.stem}_biases.jsonl")


def row_tasks(data_file: str | Path, ids: Sequence[str]) -> list[str] | None:
    """Each row's task from the ledger beside its data file (``cluster.NONE`` for a row
    the ledger does not list), or None when there is no ledger or it lists none of the
    rows: only a lab's data knows its rows' tasks."""
    path = ledger_path(data_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return None
    task: dict[str, str] = {}
    for line in lines:
        try:
            row = json.loads(line)
            task[str(row["id"])] = str(row["task"])
        except (ValueError, KeyError, TypeError):
            continue  # a line that is not a ledger row tells nothing
    if not task:
        return None
    out = [task.get(str(i), cluster.NONE) for i in ids]
    return out if any(t != cluster.NONE for t in out) else None


def assignment_info(
    asg: Artifact, table: pd.DataFrame, tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """An assignment's clusters.json with its composition counted from ``table`` (the
    dataset's rows) and its labels: a file written before ``(other)`` and ``tasks``
    existed reads as a new one. Without ``tasks``, a stored ``tasks`` is kept."""
    info = json.loads((asg.path / "clusters.json").read_text())
    labels = np.load(asg.path / "labels.npy")
    info.update(_composition(table, labels, int(info["k"]), tasks))
    return info


def projection_step(
    emb: Artifact, registry: Registry, *, seed: int = 0, progress: embed.Progress = _noop
) -> tuple[Artifact, bool]:
    inputs = {
        "embedding": emb.key,
        "seed": int(seed),
        "pca_dims": cluster.PCA_DIMS,
        "umap": cluster.UMAP_PARAMS,
    }

    def build(folder: Path) -> dict[str, Any]:
        progress("projecting (UMAP)", 0.0)
        t0 = time.perf_counter()
        xy = cluster.project_2d(np.asarray(read_embeddings(emb)), seed)
        np.save(folder / "xy.npy", xy)
        progress("projecting (UMAP)", 1.0)
        return {"seconds": round(time.perf_counter() - t0, 3)}

    return registry.produce("projection", inputs, build)


@dataclass
class DisperseConfig:
    """One Disperse request: the data, the text field, the model, the clusterer, K."""

    data: str
    k: int = 4
    method: str = "kmeans"
    field: str = "instruction"
    model: str = embed.DEFAULT_MODEL
    seed: int = 0
    split: str = "train"
    precision: str = "auto"


@dataclass
class DisperseResult:
    """``table``: the normalised rows plus ``cluster``, ``x``, ``y`` (and ``task`` for a
    lab's data); ``clusters``: the assignment's clusters.json (``assignment_info``);
    ``artifacts``: the four steps' artifacts by kind;
    ``computed``: which steps ran now (False: reused from the registry)."""

    table: pd.DataFrame
    clusters: dict[str, Any]
    report: data.LoadReport
    artifacts: dict[str, Artifact]
    computed: dict[str, bool] = field(default_factory=dict)


def run_disperse(
    cfg: DisperseConfig,
    registry: Registry | None = None,
    *,
    project: bool = True,
    progress: embed.Progress = _noop,
) -> DisperseResult:
    """Every Disperse step for ``cfg``, each reused from the registry when it exists. It
    claims its share of the cores while it runs (``dtm.threads``: the dashboard's server
    disperses beside the jobs it runs)."""
    with threads.computing("dispersal"):
        return _disperse(cfg, registry, project=project, progress=progress)


def _disperse(cfg: DisperseConfig, registry, *, project: bool, progress) -> DisperseResult:
    registry = registry or Registry()
    embed.check_field(cfg.field)
    cluster.check_method(cfg.method)
    ds = dataset_step(cfg.data, registry, split=cfg.split, progress=progress)
    cluster.check_k(cfg.k, ds.meta["n_rows"])
    emb, emb_new = embedding_step(
        ds, registry, field=cfg.field, model=cfg.model, precision=cfg.precision, progress=progress
    )
    progress("clustering", 0.0)
    table = read_table(ds)
    tasks = row_tasks(cfg.data, table["id"].tolist())
    asg, asg_new = assignment_step(
        ds, emb, registry, k=cfg.k, method=cfg.method, seed=cfg.seed, tasks=tasks
    )
    progress("clustering", 1.0)
    clusters = assignment_info(asg, table, tasks)
    table["cluster"] = np.load(asg.path / "labels.npy")
    if tasks is not None:
        table["task"] = tasks
    arts = {"dataset": ds, "embedding": emb, "assignment": asg}
    computed = {"embedding": emb_new, "assignment": asg_new}
    if project:
        proj, proj_new = projection_step(emb, registry, seed=cfg.seed, progress=progress)
        xy = np.load(proj.path / "xy.npy")
        table["x"], table["y"] = xy[:, 0], xy[:, 1]
        arts["projection"] = proj
        computed["projection"] = proj_new
    return DisperseResult(table, clusters, read_report(ds), arts, computed)


def write_disperse_outputs(
    res: DisperseResult, out: str | Path, cfg: DisperseConfig
) -> tuple[Path, Path]:
    """``out/assignments.csv`` (id, cluster, x, y) and ``out/clusters.json``."""
    out = Path(out)
    cols = ["id", "cluster"] + (["x", "y"] if "x" in res.table else [])
    csv_path = out / "assignments.csv"
    write_text_atomic(csv_path, res.table[cols].to_csv(index=False, float_format="%.5f"))
    info = dict(res.clusters)
    info["config"] = asdict(cfg)
    info["artifacts"] = {k: a.key for k, a in res.artifacts.items()}
    json_path = write_json_atomic(out / "clusters.json", info)
    return csv_path, json_path


def disperse_to_folder(
    cfg: DisperseConfig,
    out: str | Path,
    *,
    force: bool = False,
    project: bool = True,
    progress: embed.Progress = _noop,
    registry: Registry | None = None,
) -> tuple[DisperseResult, Path, Path]:
    """``python -m dtm disperse``: ``run_disperse`` then ``write_disperse_outputs``; an
    ``out`` that is a file, or holds outputs (without ``force``), is refused first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder.")
    existing = [p for p in (out / "assignments.csv", out / "clusters.json") if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{existing[0]} already exists: choose another --out, or add --force to replace it."
        )
    res = run_disperse(cfg, registry or Registry(), project=project, progress=progress)
    csv_path, json_path = write_disperse_outputs(res, out, cfg)
    return res, csv_path, json_path


def other_clustering(
    res: DisperseResult, method: str, registry: Registry, *, compute: bool = True
) -> dict[str, Any] | None:
    """The clusters.json (``assignment_info``) of the same rows, embeddings, K and seed
    as ``res`` clustered by ``method`` instead: computed now (the embeddings are reused)
    or, without ``compute``, None unless the registry already holds it."""
    ds, emb = res.artifacts["dataset"], res.artifacts["embedding"]
    k, seed = int(res.clusters["k"]), int(res.clusters["seed"])
    inputs = _assignment_inputs(emb, k, method, seed)
    if not compute and registry.get("assignment", input_key("assignment", inputs)) is None:
        return None
    tasks = res.table["task"].tolist() if "task" in res.table else None
    asg, _ = assignment_step(ds, emb, registry, k=k, method=method, seed=seed, tasks=tasks)
    return assignment_info(asg, read_table(ds), tasks)


def saved_assignments(registry: Registry) -> list[Artifact]:
    """Assignments a user saved (named) on the Disperse page, newest first."""
    return [a for a in registry.list("assignment") if a.name]


def training_inputs(asg: Artifact, registry: Registry) -> dict[str, Any]:
    """What a training run needs from a saved assignment: the data file it clustered
    (``data``), an ``assignments.csv`` of it (written once under ``<cache>/exports``),
    and ``k``."""
    ds = registry.get("dataset", asg.meta["dataset"])
    if ds is None:
        raise data.DataError(f"assignment {asg.key}: its dataset is no longer in the registry.")
    csv = registry.root / "exports" / f"assignment-{asg.key}" / "assignments.csv"
    if not csv.exists():
        table = read_table(ds)
        labels = np.load(asg.path / "labels.npy")
        frame = pd.DataFrame({"id": table["id"], "cluster": labels})
        write_text_atomic(csv, frame.to_csv(index=False))
    return {"data": ds.meta["source"], "assignments": str(csv), "k": int(asg.meta["k"])}


def cluster_sizes(assignments: str | Path, k: int) -> list[int]:
    """The row count of each cluster 0 .. k-1 of an ``assignments.csv``."""
    counts = pd.read_csv(assignments)["cluster"].value_counts()
    return [int(counts.get(c, 0)) for c in range(k)]


def data_lab(data_file: str) -> str | None:
    """The lab a data file belongs to (``<lab>/data/<file>``, any size or seed), or None."""
    return lab_of(os.path.join(os.path.dirname(os.path.dirname(data_file)), "model"))
