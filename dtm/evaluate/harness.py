"""The full evaluation engine: EleutherAI's lm-evaluation-harness on a model object.

``run_harness(model, tokenizer, tasks, include_path=LAB/benchmarks)`` ->
``{task: {metric: value, metric + "_stderr": se, "n": items}}``. The lab's task configs
are found through ``include_path``; the paper's benchmarks are the harness's own tasks,
whose datasets come from the Hugging Face hub or its local cache. A dataset that cannot
be had is a ``ConfigError`` naming the task and the dataset, never a traceback.

Metric names: the harness's ``"acc,none"`` becomes ``acc``; a metric under a filter
(``"exact_match,strict-match"``) becomes ``exact_match_strict-match``. Every task also
gets ``acc``, its headline score in the paper's sense, when the harness reports none
under that name (GSM8K's strict exact match, HumanEval's pass@1, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dtm.errors import ConfigError

# The paper's benchmarks (Table 1) and IFEval for instruction following, with the
# harness metric taken as each one's headline ``acc``.
PAPER_TASKS = {
    "gsm8k": "exact_match,strict-match",
    "mmlu": "acc,none",
    "bbh": "exact_match,get-answer",
    "arc_challenge": "acc,none",
    "openbookqa": "acc,none",
    "race": "acc,none",
    "humaneval": "pass@1,create_test",
    "mbpp": "pass_at_1,none",
    "truthfulqa_mc2": "acc,none",
    "ifeval": "prompt_level_strict_acc,none",
}
CODE_TASKS = ("humaneval", "mbpp")  # they execute the code the model writes


def task_manager(include_path: str | Path | None = None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def check_code_opt_in(tasks: list[str], allow_code: bool) -> None:
    risky = [t for t in tasks if t in CODE_TASKS]
    if risky and not allow_code:
        raise ConfigError(
            f"{', '.join(risky)} run the code the model generates on this machine. Give "
            "--allow-code-execution (or tick the box on the Compare page) to run them."
        )


def load_tasks(names: list[str], tm) -> dict:
    """The harness's task objects, loading each task's dataset; a missing one is named."""
    from lm_eval.tasks import get_task_dict

    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)}: `python -m dtm eval --list-tasks` prints "
            "the tasks this tool knows (any lm-evaluation-harness task name works with "
            "--engine full)."
        )
    out = {}
    for name in names:
        try:
            out.update(get_task_dict([name], tm))
        except Exception as e:  # datasets raises many types for one cause: no data here
            raise ConfigError(_missing_dataset(name, e)) from None
    return out


def _missing_dataset(task: str, err: Exception) -> str:
    m = re.search(r"'([\w.-]+/[\w.-]+|[\w.-]+)' on the Hub", str(err)) or re.search(
        r"dataset[^']*'([^']+)'", str(err), re.I
    )
    ds = m.group(1) if m else None
    env = os.environ
    where = env.get("HF_DATASETS_CACHE") or env.get("HF_HOME") or "~/.cache/huggingface"
    fetch = (
        f"python -c \"import datasets; datasets.load_dataset('{ds}')\""
        if ds
        else f"lm_eval --tasks {task} --limit 1 --model dummy"
    )
    return (
        f"task {task}: its dataset{f' {ds!r}' if ds else ''} is not in the local Hugging Face "
        f"cache ({where}) and could not be downloaded ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}). Fetch it once on a machine with network "
        f"(e.g. `{fetch}`, with the subset the task names if it has one) and copy the "
        "cache here, or run with network access."
    )


def _flatten(raw: dict, headline: str | None) -> dict:
    out: dict = {}
    for key, v in raw.items():
        if key == "alias" or "," not in key or not isinstance(v, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}_{filt}"
        if metric.endswith("_stderr"):
            base = metric.removesuffix("_stderr")
            name = (base if filt == "none" else f"{base}_{filt}") + "_stderr"
        out[name] = float(v)
    if "acc" not in out and headline and headline in raw:
        out["acc"] = float(raw[headline])
        metric, filt = headline.split(",", 1)
        se = raw.get(f"{metric}_stderr,{filt}")
        if isinstance(se, (int, float)):
            out["acc_stderr"] = float(se)
    return out


def user_headline(raw: dict, output_type: str) -> str | None:
    """The harness key of a folder task's headline: ``acc`` for multiple choice and
    log-likelihood tasks, ``exact_match`` (unfiltered, else under the first filter) for
    ``generate_until``; a rolling log-likelihood task has none (its metrics are
    perplexities and bits per byte)."""
    want = "exact_match" if output_type == "generate_until" else "acc"
    keys = [k for k in raw if isinstance(k, str) and k.split(",", 1)[0] == want]
    if f"{want},none" in keys:
        return f"{want},none"
    return keys[0] if keys else None


def flatten_user(raw: dict, output_type: str) -> dict:
    """A folder task's results: every metric flattened as ``_flatten`` does, its headline
    also under ``acc`` (and under ``exact_match`` for ``generate_until``)."""
    head = user_headline(raw, output_type)
    out = _flatten(raw, head)
    if head and output_type == "generate_until":
        out["exact_match"] = float(raw[head])
        out["acc"] = float(raw[head])
    return out


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    allow_code: bool = False,
    seed: int = 0,
    tm=None,
    prepared: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` through ``lm_eval.simple_evaluate``. ``prepared`` maps task names to
    harness task objects built here (a ``--tasks-dir``'s tasks, ``dtm.evaluate.user``); the
    other names are found through the task manager (``include_path`` and the harness's
    own tasks)."""
    check_code_opt_in(tasks, allow_code)
    # The opt-in holds for this call only: a long-lived process (the dashboard) must not
    # keep code execution switched on for the next evaluation.
    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        return _simple_evaluate(
            model,
            tokenizer,
            tasks,
            include_path,
            limit,
            batch_size,
            allow_code,
            seed,
            tm,
            prepared or {},
        )
    finally:
        if before is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = before


def _simple_evaluate(
    model, tokenizer, tasks, include_path, limit, batch_size, allow_code, seed, tm, prepared
):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    named = [t for t in tasks if t not in prepared]
    if tm is None:
        tm = (
            task_manager(include_path)
            if named
            else TaskManager(include_defaults=False, include_path=None)
        )
    if named:
        load_tasks(named, tm)  # each dataset present, or a message naming it
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[prepared.get(t, t) for t in tasks],
            task_manager=tm,
            limit=limit,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            confirm_run_unsafe_code=allow_code,
            log_samples=False,
            verbosity="WARNING",
        )
    finally:
        model.train(was_training)
    out = {}
    for task in tasks:
        raw = res["results"].get(task) or res.get("groups", {}).get(task) or {}
        if task in prepared:
            flat = flatten_user(raw, prepared[task].OUTPUT_TYPE)
        else:
            flat = _flatten(raw, PAPER_TASKS.get(task, "acc,none"))
        n = res.get("n-samples", {}).get(task, {})
        if n:
            flat["n"] = int(n.get("effective", n.get("original", 0)))
        out[task] = flat
    return out
