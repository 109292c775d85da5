"""Task folders as data: a folder of lm-evaluation-harness task files (YAML), each read
and checked (every field its output type needs, local data files that exist) without
running any of its code. The evaluators (``dtm.evaluate.user``) score them; training
and experiment files check the task names they ask for here."""

from __future__ import annotations

from pathlib import Path

from dtm.errors import ConfigError

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
# The fields each output type reads to make its requests.
_NEEDS = {
    "multiple_choice": ("doc_to_text", "doc_to_choice", "doc_to_target"),
    "loglikelihood": ("doc_to_text", "doc_to_target"),
    "loglikelihood_rolling": ("doc_to_target",),
    "generate_until": ("doc_to_text", "doc_to_target"),
}
_SPLITS = ("test_split", "validation_split", "train_split")


class TaskFileError(ConfigError):
    """A task file that cannot be used; the message names the file and the field."""


def _files(tasks_dir: Path) -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in tasks_dir.rglob(ext))


def read_task_file(path: Path, resolve_functions: bool = False) -> dict:
    """The task config of ``path`` (includes merged), checked, with relative
    ``data_files`` made absolute from the file's folder. ``!function`` entries are
    imported only with ``resolve_functions`` (when the task is built to be scored):
    listing and checking a folder runs none of its code."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lazy: lm_eval (seconds to import)

    try:
        cfg = load_yaml(path, resolve_func=resolve_functions)
    except Exception as e:  # yaml, include and !function errors come in many types
        raise TaskFileError(
            f"{path}: cannot read it as a task file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]})."
        ) from None

    def bad(field: str, why: str):
        return TaskFileError(f"{path}: field {field!r}: {why}")

    if "group" in cfg and "task" in cfg and isinstance(cfg["task"], list):
        raise bad("task", "a group of tasks is not supported here; give each task its own file.")
    name = cfg.get("task")
    if not isinstance(name, str) or not name.strip():
        raise bad("task", "missing or not a name (every task file names its task).")
    out = cfg.get("output_type", "generate_until")
    if out not in OUTPUT_TYPES:
        raise bad("output_type", f"{out!r} is not one of {', '.join(OUTPUT_TYPES)}.")
    for field in _NEEDS[out]:
        if cfg.get(field) is None:
            raise bad(field, f"missing (a {out} task needs {', '.join(_NEEDS[out])}).")
    if not cfg.get("dataset_path"):
        raise bad("dataset_path", "missing (use `dataset_path: json` with local data_files).")
    if not any(cfg.get(s) for s in _SPLITS):
        raise bad("test_split", "missing: name the split to score (test_split: test).")
    if cfg["dataset_path"] == "json":
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if not files:
            raise bad("dataset_kwargs.data_files", "missing: a json task names its files.")
        if isinstance(files, str):
            files = {"train": files}
        if not isinstance(files, dict):
            raise bad(
                "dataset_kwargs.data_files", "give a mapping split: file (test: items.jsonl)."
            )
        resolved = {}
        for split, f in files.items():
            many = f if isinstance(f, list) else [f]
            paths = [Path(x) if Path(x).is_absolute() else path.parent / x for x in many]
            for p in paths:
                if not p.is_file():
                    raise bad(f"dataset_kwargs.data_files.{split}", f"{p} does not exist.")
            resolved[split] = (
                [str(p.resolve()) for p in paths]
                if isinstance(f, list)
                else str(paths[0].resolve())
            )
        for s in _SPLITS:
            if cfg.get(s) and cfg[s] not in resolved:
                raise bad(s, f"split {cfg[s]!r} is not among data_files ({', '.join(resolved)}).")
        cfg = {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": resolved}}
    for i, m in enumerate(cfg.get("metric_list") or []):
        if not isinstance(m, dict) or "metric" not in m:
            raise bad(f"metric_list[{i}]", "each entry needs `metric:`.")
    for i, f in enumerate(cfg.get("filter_list") or []):
        if not isinstance(f, dict) or "name" not in f or not isinstance(f.get("filter"), list):
            raise bad(f"filter_list[{i}]", "each entry needs `name:` and a `filter:` list.")
    return cfg


def folder_tasks(tasks_dir: str | Path) -> dict[str, Path]:
    """``{task name: file}`` of every task file under ``tasks_dir``, each one checked."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"--tasks-dir {tasks_dir}: not a folder.")
    out: dict[str, Path] = {}
    for path in _files(tasks_dir):
        cfg = read_task_file(path)
        if cfg.get("task") in out:
            raise TaskFileError(
                f"{path}: field 'task': {cfg['task']!r} is also the task of {out[cfg['task']]}."
            )
        out[cfg["task"]] = path
    return out
