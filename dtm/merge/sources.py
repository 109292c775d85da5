"""What there is to merge: the groups a merge is made of.

``merge_sources(store)``: one ``MergeSource`` per launch, clustering and seed (the
registry records each sub-model's clustering at submit, its seed in its config), named
``k-means, seed 0, K=4`` (``MergeSource.name``; ``.id`` adds the launch); a group still
training is listed with what has finished and says so (``.state()``). A mix of
clusterings or seeds is never one group. ``folder_source``: adapter folders named by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtm.cluster import NAMES as CLUSTERINGS
from dtm.errors import ConfigError
from dtm.merge.lora import check_compatible, read_adapter
from dtm.models import check_base_path, lab_of
from dtm.store import input_key
from dtm.train.config import SOUP_MEMBER

OPEN = ("queued", "starting", "running", "stopping")  # a job that may still finish


@dataclass
class MergeSource:
    """One group of sub-models that make one merge: one launch (the jobs' group), one
    clustering, one seed, on one base model; its finished sub-models (by cluster), and
    the launch's finished baselines of that seed."""

    group: str  # the launch (the jobs' group)
    base: str
    subs: list[tuple[str, Path]]  # (name, adapter folder), by cluster
    baselines: dict[str, tuple[str, Path]]  # job name -> (run kind, e.g. "sft"; adapter folder)
    lab: str | None  # the lab whose benchmarks score it, when trained on the lab
    clustering: str | None = None  # the sub-models' clustering, as recorded at submit
    seed: int | None = None  # the sub-models' seed (their jobs' config)
    k: int = 0  # the sub-models the group was launched with (finished or not); 0: len(subs)
    training: int = 0  # of those, queued or running
    clusters: list[int] | None = None  # each finished sub-model's cluster, as ``subs``

    @property
    def adapters(self) -> tuple[str, ...]:
        """The sub-models' adapter folders, as strings."""
        return tuple(str(p) for _, p in self.subs)

    @property
    def identity(self) -> tuple:
        """What a score, a search or a landscape was computed on."""
        return (self.base, self.adapters)

    @property
    def planned(self) -> int:
        """K: the sub-models the group has, finished or not."""
        return max(self.k, len(self.subs))

    @property
    def complete(self) -> bool:
        """Every sub-model the group was launched with has finished."""
        return len(self.subs) >= self.planned

    @property
    def name(self) -> str:
        """``k-means, seed 0, K=4``: what the group is (stable while its jobs finish)."""
        if self.clustering is None and self.seed is None:
            return f"{self.group}, K={self.planned}"
        how = CLUSTERINGS.get(self.clustering or "", self.clustering or "clustering not recorded")
        return f"{how}, seed {self.seed}, K={self.planned}"

    @property
    def id(self) -> str:
        """The group's name with its launch's: the key its merges and scores go under."""
        if self.clustering is None and self.seed is None:
            return self.group
        return f"{self.group} · {self.name}"

    @property
    def cluster_names(self) -> list[str]:
        """``c0``, ``c1``, ...: each finished sub-model by its cluster."""
        clusters = self.clusters or list(range(len(self.subs)))
        return [f"c{c}" for c in clusters]

    def state(self) -> str:
        """What has finished: ``""`` when all have; else e.g. ``3 of 4 finished, still
        training`` (or ``..., 1 did not finish`` when none is left to run)."""
        if self.complete:
            return ""
        done = f"{len(self.subs)} of {self.planned} finished"
        if self.training:
            return f"{done}, still training"
        return f"{done}, {self.planned - len(self.subs)} did not finish"

    def label(self) -> str:
        """The group as the Merge and Compare pages offer it."""
        state = self.state()
        return f"{self.id} ({state})" if state else self.id


def merge_sources(store) -> list[MergeSource]:
    """The groups a merge is made of: a launch's sub-models of one clustering and one
    seed on one base model, with at least two finished (a group still training is listed
    with what has finished), newest first. Each comes with the launch's finished
    baselines of the same seed."""
    subs_of: dict[tuple, list] = {}
    others: dict[tuple, list] = {}
    for j in store.list():
        if j.kind == "group":  # a group job's members have their own rows
            continue
        launch, base, seed = j.group or "", j.config["base"], j.config.get("seed", 0)
        if j.kind == "sub":
            subs_of.setdefault((launch, base, j.clustering, seed), []).append(j)
        elif j.state == "done" and not j.name.endswith(SOUP_MEMBER):  # in its soup only
            others.setdefault((launch, base, seed), []).append(j)
    out = []
    for (launch, base, clustering, seed), jobs in subs_of.items():
        done = sorted((j for j in jobs if j.state == "done"), key=lambda j: j.config["cluster"])
        if len(done) < 2:
            continue
        mine = others.get((launch, base, seed), [])
        lab = next(
            (j.config.get("eval_lab") for j in done + mine if j.config.get("eval_lab")), None
        )
        out.append(
            MergeSource(
                launch,
                base,
                [(j.name, j.run_dir / "adapter") for j in done],
                {j.name: (j.kind, j.run_dir / "adapter") for j in mine},
                lab,
                clustering,
                seed,
                k=len({j.config["cluster"] for j in jobs}),
                training=sum(j.state in OPEN for j in jobs),
                clusters=[int(j.config["cluster"]) for j in done],
            )
        )
    out.sort(key=lambda s: (-max(p.stat().st_mtime for _, p in s.subs), s.id))
    return out


def folder_source(base: str, adapters: list[str]) -> MergeSource:
    """Adapter folders the user names by path, checked against each other before the
    base loads (``Merger`` then checks them against the base): at least two, distinct,
    each a LoRA adapter, all of one shape."""

    base = (base or "").strip()
    if not base:
        raise ConfigError("name the base model folder (or hub id) the adapters were trained on.")
    check_base_path(base)
    paths = [a.strip() for a in adapters if a and a.strip()]
    if len(paths) < 2:
        raise ConfigError(f"{len(paths)} adapter folder(s): name at least two to merge.")
    seen: dict[str, int] = {}
    for i, p in enumerate(paths, 1):
        real = str(Path(p).expanduser().resolve())
        if real in seen:
            raise ConfigError(f"adapter {i} ({p}) is adapter {seen[real]} again.")
        seen[real] = i
    sets = []
    for i, p in enumerate(paths, 1):
        try:
            sets.append(read_adapter(Path(p).expanduser()))
        except ConfigError as e:
            raise ConfigError(f"adapter {i} ({p}): {e}") from None
    check_compatible(sets)
    names = []
    for p in paths:
        q = Path(p).expanduser()
        names.append(q.parent.name if q.name == "adapter" else q.name)
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names, 1)]

    group = "folders-" + input_key("folders", {"base": base, "adapters": paths})[:8]
    return MergeSource(
        group,
        base,
        [(n, Path(p).expanduser()) for n, p in zip(names, paths, strict=True)],
        {},
        lab_of(base),
    )


def run_dir_of(adapter: Path) -> Path | None:
    """The training run an adapter folder came from (``RUN/adapter`` beside
    ``RUN/config.json``), else None."""
    adapter = Path(adapter)
    run = adapter.parent
    return run if adapter.name == "adapter" and (run / "config.json").exists() else None
