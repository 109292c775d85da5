"""What there is to merge: the finished sub-models of each group of jobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtm.errors import ConfigError
from dtm.merge.lora import check_compatible, read_adapter
from dtm.models import check_base_path, lab_of
from dtm.store import input_key
from dtm.train.config import SOUP_MEMBER


@dataclass
class MergeSource:
    """One launch's sub-models (by cluster), its base model, and its finished baselines."""

    group: str
    base: str
    subs: list[tuple[str, Path]]  # (name, adapter folder), by cluster
    baselines: dict[str, tuple[str, Path]]  # job name -> (run kind, e.g. "sft"; adapter folder)
    lab: str | None  # the lab whose benchmarks score it, when trained on the lab
    clustering: str | None = None  # the sub-models' clustering, as recorded at submit

    @property
    def adapters(self) -> tuple[str, ...]:
        """The sub-models' adapter folders, as strings."""
        return tuple(str(p) for _, p in self.subs)

    @property
    def identity(self) -> tuple:
        """What a score, a search or a landscape was computed on."""
        return (self.base, self.adapters)


def merge_sources(store) -> list[MergeSource]:
    """Groups with at least two finished ``sub`` jobs on one base model, newest first."""
    by_group: dict[tuple[str, str], list] = {}
    for j in store.list(states=("done",)):
        if j.kind != "group":  # a group job's members have their own rows
            by_group.setdefault((j.group or "", j.config["base"]), []).append(j)
    out = []
    for (group, base), jobs in by_group.items():
        subs = sorted((j for j in jobs if j.kind == "sub"), key=lambda j: j.config["cluster"])
        if len(subs) < 2:
            continue
        baselines = {
            j.name: (j.kind, j.run_dir / "adapter")
            for j in jobs
            if j.kind != "sub" and not j.name.endswith(SOUP_MEMBER)  # in its soup only
        }
        lab = next((j.config.get("eval_lab") for j in jobs if j.config.get("eval_lab")), None)
        out.append(
            MergeSource(
                group,
                base,
                [(j.name, j.run_dir / "adapter") for j in subs],
                baselines,
                lab,
                subs[0].clustering,
            )
        )
    out.sort(key=lambda s: -max(p.stat().st_mtime for _, p in s.subs))
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
