"""Experiment files: YAML -> a validated ``Experiment`` (``python -m dtm run FILE.yaml``).

An experiment names its data and base model (or the lab, which provides both), how to
disperse (K, the clustering methods), the training values shared by every run, the
baselines, the seeds, how to merge and how to evaluate. ``load_experiment`` checks all of
it before any work starts: every error names the file and the key, and exits 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dtm.cluster import METHODS
from dtm.errors import ConfigError
from dtm.lab import default_lab_dir
from dtm.lab.presets import DEFAULT_PRESET, PRESETS
from dtm.merge.methods import METHODS as MERGE_METHODS
from dtm.merge.methods import check_params
from dtm.models import check_base_path
from dtm.store import cache_dir, safe_name
from dtm.tasks import PROBES, TASKS
from dtm.tasks.files import folder_tasks
from dtm.train.config import BASELINES, TrainConfig, check_config

_TOP = {
    "name",
    "description",
    "lab",
    "base",
    "data",
    "val_data",
    "disperse",
    "train",
    "sub_budget",
    "baselines",
    "curate",
    "loramoe",
    "seeds",
    "backend",
    "estimate",
    "evaluate",
    "merge",
}


@dataclass
class Experiment:
    name: str
    base: str | None = None
    data: str | None = None
    val_data: str | None = None
    lab: dict[str, Any] | None = None
    k: int = 4
    methods: list[str] = field(default_factory=lambda: ["kmeans"])
    embed_field: str = "instruction"
    embed_model: str | None = None
    share: str | None = None  # use the dispersal (and so the trained jobs) of this experiment
    train: dict[str, Any] = field(default_factory=dict)
    together: bool = True  # train.together: SFT and the sub-models of a seed in one group job
    sub_budget: str = "epochs"
    baselines: list[str] = field(default_factory=list)
    kind_values: dict[str, dict[str, Any]] = field(default_factory=dict)  # curate:, loramoe:
    seeds: list[int] = field(default_factory=lambda: [0])
    backend: str = "local"
    estimate: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file; every error names the file and the key."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping (name:, lab: or data:, ...).")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}; known: {sorted(_TOP)}.")
    if not raw.get("name"):
        raise ConfigError(f"{path}: needs a name.")
    exp = Experiment(name=str(raw["name"]), source=str(p))
    if raw.get("lab") is not None:
        _lab_section(raw, exp, p, path)
    else:
        if not raw.get("base") or not raw.get("data"):
            raise ConfigError(f"{path}: give either lab: or both base: and data:.")
        exp.base, exp.data = str(raw["base"]), str(raw["data"])
        exp.val_data = raw.get("val_data")
    _disperse_section(raw, exp, path)
    exp.train = dict(raw.get("train") or {})
    together = exp.train.pop("together", True)
    if not isinstance(together, bool):
        raise ConfigError(f"{path}: train.together must be true or false, not {together!r}.")
    exp.together = together
    known = {f.name for f in fields(TrainConfig)} - {"base", "data", "out", "kind", "cluster"}
    known -= {"clusters", "with_sft"}
    unknown = sorted(set(exp.train) - known)
    if unknown:
        raise ConfigError(f"{path}: train: unknown keys {', '.join(unknown)}.")
    exp.sub_budget = raw.get("sub_budget", "epochs")
    if exp.sub_budget not in ("epochs", "steps"):
        raise ConfigError(f"{path}: sub_budget must be epochs or steps.")
    exp.baselines = list(raw.get("baselines") or [])
    bad = [b for b in exp.baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"{path}: baselines {bad}: choose from {list(BASELINES)}.")
    exp.kind_values = {k: _kind_section(raw, k, exp, path) for k in KIND_KEYS}
    exp.seeds = [int(s) for s in (raw.get("seeds") or [0])]
    exp.backend = str(raw.get("backend", "local"))
    exp.estimate = dict(raw.get("estimate") or {})
    exp.evaluate = dict(raw.get("evaluate") or {})
    _check_evaluate(exp, path)
    exp.merge = dict(raw.get("merge") or {})
    _check_merge(exp, path)
    _check_train(exp, path)
    _check_inputs(exp, path)
    return exp


def _lab_section(raw: dict, exp: Experiment, p: Path, path) -> None:
    """``lab:``: a preset, size and seed to build, or the path of a built lab."""
    lab = raw["lab"] if isinstance(raw["lab"], dict) else {}
    unknown = sorted(set(lab) - {"size", "seed", "preset", "path"})
    if unknown:
        raise ConfigError(f"{path}: lab: unknown keys {unknown}; known: preset, size, seed, path.")
    if lab.get("path") is not None:  # a lab built elsewhere (e.g. with other knobs)
        folder = Path(str(lab["path"])).expanduser()
        if not folder.is_absolute():
            folder = (p.parent / folder).resolve()
        if set(lab) != {"path"}:
            raise ConfigError(f"{path}: lab.path names a built lab: give it alone.")
        if not (folder / "lab.json").is_file():
            raise ConfigError(f"{path}: lab.path {folder}: not a built lab (no lab.json).")
        info = json.loads((folder / "lab.json").read_text())
        exp.lab = {
            "path": str(folder),
            "size": info.get("size", "default"),
            "seed": int(info.get("seed", 0)),
            "preset": info.get("preset", "interference"),
        }
        lab = {}
    exp.lab = exp.lab or {
        "size": lab.get("size", "default"),
        "seed": int(lab.get("seed", 0)),
        "preset": lab.get("preset", DEFAULT_PRESET),
    }
    if exp.lab["size"] not in ("small", "default"):
        raise ConfigError(f"{path}: lab.size must be small or default.")
    if exp.lab["preset"] not in PRESETS:
        raise ConfigError(
            f"{path}: lab.preset must be one of {', '.join(PRESETS)} (got {exp.lab['preset']!r})."
        )


def _disperse_section(raw: dict, exp: Experiment, path) -> None:
    """``disperse:``: K, the clustering methods, the embedded field and model."""
    d = raw.get("disperse") or {}
    exp.k = int(d.get("k", 4))
    if exp.k < 1:
        raise ConfigError(f"{path}: disperse.k must be at least 1, not {exp.k}.")
    exp.methods = list(d.get("methods", ["kmeans"]))
    bad = [m for m in exp.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"{path}: disperse.methods {bad}: choose from {list(METHODS)}.")
    exp.embed_field = d.get("field", "instruction")
    exp.embed_model = d.get("model")
    exp.share = d.get("share")
    unknown = sorted(set(d) - {"k", "methods", "field", "model", "share"})
    if unknown:
        raise ConfigError(f"{path}: disperse: unknown keys {', '.join(unknown)}.")


# The sections of the baselines with values of their own: key in the file -> TrainConfig
KIND_KEYS = {
    "curate": {"budget": "curate_budget", "score": "curate_score", "threshold": "curate_threshold"},
    "loramoe": {
        "experts": "experts",
        "balance": "moe_balance",
        "groups": "moe_groups",
        "delta": "moe_delta",
        "knowledge_sources": "moe_knowledge_sources",
    },
}


def _kind_section(raw: dict, kind: str, exp: Experiment, path) -> dict[str, Any]:
    """The TrainConfig values of a ``curate:`` or ``loramoe:`` section. ``curate.budget``
    defaults to 1/K of the rows: the share of the data one DTM sub-model trains on."""
    section = raw.get(kind) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {kind}: expected a mapping of its values.")
    keys = KIND_KEYS[kind]
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ConfigError(
            f"{path}: {kind}: unknown keys {', '.join(unknown)} (known: {', '.join(keys)})."
        )
    if section and kind not in exp.baselines:
        raise ConfigError(f"{path}: a {kind}: section, but {kind} is not in baselines.")
    values = {keys[k]: (str(v) if k == "budget" else v) for k, v in section.items()}
    if kind == "curate":
        values.setdefault("curate_budget", str(round(1 / exp.k, 6)))
    return values


def _check_train(exp: Experiment, path) -> None:
    """The shared training values make a valid run of every planned kind."""

    values = {**exp.train, "base": exp.base or "lab", "data": exp.data or "lab", "out": "-"}
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    for kind in ["sft", *exp.baselines]:
        try:
            cfg = TrainConfig(**{**values, "kind": kind, **exp.kind_values.get(kind, {})})
            if kind in ("ewc", "replay") and exp.lab is not None:
                continue  # the lab's corpus is the default reference; it may not exist yet
            check_config(cfg)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: train ({kind}): {e}") from None


def _check_evaluate(exp: Experiment, path) -> None:
    ev = exp.evaluate
    unknown = sorted(
        set(ev) - {"tasks", "engine", "limit", "tasks_dir", "heldout", "frontier", "hma"}
    )
    if unknown:
        raise ConfigError(f"{path}: evaluate: unknown keys {', '.join(unknown)}.")
    frontier = ev.get("frontier", True)
    if not isinstance(frontier, bool) and not (
        isinstance(frontier, list)
        and frontier
        and all(isinstance(a, int | float) and 0 <= a <= 1 for a in frontier)
    ):
        raise ConfigError(
            f"{path}: evaluate.frontier is true, false, or a list of scales in [0, 1] "
            f"(got {frontier!r})."
        )
    hma = ev.get("hma", False)
    if not isinstance(hma, bool) and not (
        isinstance(hma, list)
        and len(hma) >= 2
        and all(isinstance(a, int | float) and 0 <= a <= 1 for a in hma)
    ):
        raise ConfigError(
            f"{path}: evaluate.hma is true, false, or a list of at least two scales in [0, 1] "
            f"(each block's grid of the per-block frontier; got {hma!r})."
        )
    if ev.get("engine", "quick") not in ("quick", "full"):
        raise ConfigError(f"{path}: evaluate.engine must be quick or full.")
    if not isinstance(ev.get("tasks", []), list):
        raise ConfigError(f"{path}: evaluate.tasks is a list of task names.")
    if not isinstance(ev.get("heldout", []), list):
        raise ConfigError(f"{path}: evaluate.heldout is a list of files.")
    if ev.get("tasks_dir"):  # a user's task YAMLs: each file checked now
        try:
            found = folder_tasks(ev["tasks_dir"])
        except ConfigError as e:
            raise ConfigError(f"{path}: evaluate.tasks_dir: {e}") from None
        ev["tasks_dir"] = str(Path(ev["tasks_dir"]).expanduser().resolve())
        if ev.get("engine", "quick") == "quick":
            bad = [t for t in ev.get("tasks", []) if t not in found and t not in TASKS + PROBES]
            if bad:
                raise ConfigError(
                    f"{path}: evaluate.tasks {bad}: not in evaluate.tasks_dir {ev['tasks_dir']} "
                    "(the quick engine scores the lab's tasks and a tasks folder's)."
                )
    if ev.get("heldout"):
        from dtm.evaluate import check_heldout  # lazy: torch

        try:
            check_heldout(ev["heldout"])
        except ConfigError as e:
            raise ConfigError(f"{path}: evaluate.heldout: {e}") from None
        ev["heldout"] = [str(Path(h).expanduser().resolve()) for h in ev["heldout"]]


def _check_merge(exp: Experiment, path) -> None:
    unknown = sorted(set(exp.merge) - {"methods", "params", "blocks", "learn_steps"})
    if unknown:
        raise ConfigError(f"{path}: merge: unknown keys {', '.join(unknown)}.")
    methods = exp.merge.get("methods") or []
    if not isinstance(methods, list):
        raise ConfigError(f"{path}: merge.methods is a list of method names.")
    bad = [m for m in methods if m not in MERGE_METHODS]
    if bad:
        raise ConfigError(f"{path}: merge.methods {bad}: choose from {list(MERGE_METHODS)}.")
    params = exp.merge.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: merge.params is a mapping of parameter names to values.")
    for m in methods or ["average"]:
        try:
            check_params(m, params, allow_other=True)
        except ConfigError as e:
            raise ConfigError(f"{path}: merge.params: {e}") from None
    # the per-block DTM merge: K x B weights learned on the validation rows
    for key, low in (("blocks", 1), ("learn_steps", 1)):
        v = exp.merge.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"{path}: merge.{key} is a whole number of at least {low}.")
    if exp.merge.get("blocks") and exp.lab is None and not exp.val_data:
        raise ConfigError(
            f"{path}: merge.blocks learns the per-block weights on the validation rows: "
            "give val_data (or use a lab)."
        )


def _check_inputs(exp: Experiment, path) -> None:
    """Without a lab, the base model and the data must be there before anything runs
    (a hub id is fetched only when named, and is not checked here)."""

    if exp.lab is not None:
        return
    try:
        check_base_path(exp.base, allow_pickle=bool(exp.train.get("allow_pickle")))
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    for key in ("data", "val_data"):
        value = getattr(exp, key)
        if value and value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_file():
            raise ConfigError(f"{path}: {key}: {value}: no such file.")
    if not (exp.evaluate.get("tasks") or exp.evaluate.get("heldout")):
        raise ConfigError(
            f"{path}: evaluate.tasks (or evaluate.heldout) is needed when the experiment has "
            "no lab."
        )


def resolve_inputs(exp: Experiment) -> dict[str, str | None]:
    """base, data, val_data and the lab folder (which may not be built yet)."""
    if exp.lab is None:
        return {"base": exp.base, "data": exp.data, "val_data": exp.val_data, "lab": None}

    if exp.lab.get("path"):
        lab = Path(exp.lab["path"])
    else:
        lab = default_lab_dir(exp.lab["seed"], exp.lab["size"], exp.lab["preset"])
    return {
        "base": str(lab / "model"),
        "data": str(lab / "data" / "train.jsonl"),
        "val_data": str(lab / "data" / "val.jsonl"),
        "lab": str(lab),
    }


def experiment_dir(name: str) -> Path:
    """Where an experiment's files go: ``<cache>/experiments/<name>``."""
    return cache_dir() / "experiments" / safe_name(name)


def story_for_lab(template: str | Path, name: str, lab: str | Path, k: int, seeds: list[int]):
    """An experiment file for a lab of one's own: ``template`` (a lab story, e.g.
    experiments/lab.yaml) with ``lab: {path: LAB}``, ``disperse.k`` and ``seeds`` replaced,
    written to ``<experiment dir>/experiment.yaml`` (a file already there is kept under its
    own name: ``experiment-2.yaml``, ...). Returns the file, checked by ``load_experiment``."""
    import yaml

    raw = yaml.safe_load(Path(template).read_text(encoding="utf-8"))
    raw["name"] = name
    raw["lab"] = {"path": str(Path(lab).resolve())}
    raw.setdefault("disperse", {})["k"] = int(k)
    raw["seeds"] = [int(s) for s in seeds]
    folder = experiment_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    out, n = folder / "experiment.yaml", 1
    while out.exists():
        n += 1
        out = folder / f"experiment-{n}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_experiment(out)
    return out
