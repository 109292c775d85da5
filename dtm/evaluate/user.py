"""A user's evaluation sets: lm-evaluation-harness task YAMLs in a folder.

A task file is a harness task config (``task``, ``dataset_path: json`` with local
``dataset_kwargs.data_files``, ``output_type``, ``doc_to_text`` / ``doc_to_target`` /
``doc_to_choice``, ``metric_list``, ``filter_list``, ``include``, ``!function`` ...).
Relative ``data_files`` are read from the task file's own folder (the harness would read
them from the working directory).

- ``folder_tasks(dir)`` -> ``{name: path}``, each file checked first
  (``TaskFileError`` names the file and the field).
- ``build_task(dir, name)`` -> the harness's own ``ConfigurableTask`` for it.
- The quick engine, ``quick_evaluate(model, tokenizer, [task objects])``, builds the
  harness's requests and filters and runs its ``process_results`` and aggregations, so it
  follows the harness's conventions by construction. Only the model calls are its own:
  ``QuickLM`` is the harness's ``HFLM`` with a log-likelihood that encodes each distinct
  context once (``dtm.evaluate.scoring.continuation_scores``).
- The full engine passes the same task objects to ``lm_eval.simple_evaluate``
  (``dtm.evaluate.harness.run_harness(..., prepared=...)``).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections import defaultdict
from pathlib import Path

from dtm.tasks.files import (  # noqa: F401  (the task files are read there)
    OUTPUT_TYPES,
    TaskFileError,
    folder_tasks,
    read_task_file,
)

_CAPPED = ("bleu", "chrf", "chrf++", "ter")  # the harness bootstraps these 100 times at most
QUICK_BATCH = 256  # rows per batch of the quick engine (the harness default here: 64)


_BUILT: dict[str, tuple] = {}  # task file -> (its mtime, its data files' stamps, task)


def _stamps(files: list[str]) -> tuple:
    return tuple(Path(f).stat().st_mtime_ns for f in files)


def build_task(path: Path):
    """The harness's ``ConfigurableTask`` of a task file (its dataset loaded), kept while
    neither the file nor its data files change (a repeat call only stats them)."""
    import logging

    from lm_eval.api.task import ConfigurableTask

    where = str(path.resolve())
    kept = _BUILT.get(where)
    if kept is not None:
        mtime, files, stamps, task = kept
        try:
            if mtime == path.stat().st_mtime_ns and stamps == _stamps(files):
                return task
        except OSError:
            pass  # a data file went away: read the task file again, which says so
    cfg = read_task_file(path, resolve_functions=True)
    data = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    files = [f for v in data.values() for f in (v if isinstance(v, list) else [v])]
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        task = ConfigurableTask(config=copy.deepcopy(cfg))
    except Exception as e:
        raise TaskFileError(
            f"{path}: the harness cannot build this task ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]})."
        ) from None
    _BUILT[where] = (path.stat().st_mtime_ns, files, _stamps(files), task)
    return task


@contextlib.contextmanager
def _compiled_templates():
    """The harness compiles a task's Jinja template anew for every document; within the
    quick engine each template string is compiled once (the same string, the same
    template: the rendered text is unchanged)."""
    from lm_eval import utils

    plain = utils.apply_template
    compiled: dict[str, object] = {}

    def apply_template(template: str, doc: dict) -> str:
        t = compiled.get(template)
        if t is None:
            t = compiled[template] = utils.env.from_string(template)
        return t.render(**doc)

    from lm_eval.api import task as task_module

    bar = task_module.tqdm
    utils.apply_template = apply_template
    task_module.tqdm = lambda iterable=None, *a, **k: iterable  # no bar per request build
    try:
        yield
    finally:
        utils.apply_template = plain
        task_module.tqdm = bar


# Requests depend on the task and the limit only, and token ids on the tokenizer only:
# both are kept between calls (the live score, the landscape and the search score one
# task many times).
_REQUESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> pairs
_MAX_ENCODED = 500_000


_LOCK = threading.Lock()  # task objects and their requests are shared by the threads


def _requests(task, limit, seed):
    built = _REQUESTS.setdefault(task, {})
    if (limit, seed) not in built:
        task.set_fewshot_seed(seed)  # as simple_evaluate does before building
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        built[(limit, seed)] = list(task.instances)
    return built[(limit, seed)]


class _Quick:
    """Made on first use: ``QuickLM`` subclasses the harness's HFLM (a heavy import)."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import torch  # lazy: torch
            from lm_eval.models.huggingface import HFLM

            from dtm.evaluate.scoring import continuation_scores, greedy  # lazy: torch

            class QuickLM(HFLM):
                """HFLM, with each distinct context encoded once for all its
                continuations (multiple-choice options, rolling windows)."""

                def _encode_pair(self, context, continuation):
                    mine = _ENCODED.setdefault(self.tokenizer, {})
                    got = mine.get((context, continuation))
                    if got is None:
                        if len(mine) > _MAX_ENCODED:
                            mine.clear()
                        got = super()._encode_pair(context, continuation)
                        mine[(context, continuation)] = got
                    return got

                def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                    limit = self.max_length + 1
                    short = [i for i, (_, c, k) in enumerate(requests) if len(c) + len(k) <= limit]
                    res: list = [None] * len(requests)
                    if len(short) < len(requests):  # the harness's truncation, as it does it
                        kept = set(short)
                        rest = [i for i in range(len(requests)) if i not in kept]
                        for i, r in zip(
                            rest,
                            super()._loglikelihood_tokens([requests[i] for i in rest]),
                            strict=True,
                        ):
                            res[i] = r
                    pad = self.tokenizer.pad_token_id
                    if pad is None:
                        pad = self.tokenizer.eos_token_id or 0
                    scores = continuation_scores(
                        self.model,
                        [(requests[i][1], requests[i][2]) for i in short],
                        pad,
                        batch_size=int(self.batch_size),
                    )
                    for i, s in zip(short, scores, strict=True):
                        res[i] = s
                    return res

                def _model_generate(self, context, max_length, stop, **generation_kwargs):
                    # greedy requests: the same argmax decoding on the key/value cache,
                    # without generate()'s per-step machinery; anything else: the harness's
                    kw = dict(generation_kwargs)
                    mask = kw.pop("attention_mask", None)
                    kw.pop("temperature", None)
                    is_greedy = kw.pop("do_sample", False) is False and not kw
                    tok = self.tokenizer
                    if is_greedy and mask is not None and tok.eos_token_id is not None:
                        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                        new = greedy(
                            self.model,
                            context,
                            mask,
                            max_length - context.shape[1],
                            tok.eos_token_id,
                            pad,
                        )
                        if new is not None:
                            return torch.cat([context, new], dim=1)
                    return super()._model_generate(context, max_length, stop, **generation_kwargs)

            cls.cls = QuickLM
        return cls.cls


def quick_lm(model, tokenizer, batch_size: int = QUICK_BATCH):
    return _Quick.get()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def quick_evaluate(
    model,
    tokenizer,
    tasks: dict,
    *,
    limit: int | None = None,
    batch_size: int = QUICK_BATCH,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> dict[str, dict]:
    """``{name: {"metric,filter": value, "metric_stderr,filter": se}}`` of each harness task
    object in ``tasks``, with the evaluation loop of ``lm_eval.evaluator.evaluate``: the
    task's requests, this engine's model calls, the task's filters, ``process_results`` and
    aggregations."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    lm = quick_lm(model, tokenizer, batch_size)
    with _LOCK, _compiled_templates():
        return {
            name: _quick_one(lm, task, limit, bootstrap_iters, seed, mean, stderr_for_metric)
            for name, task in tasks.items()
        }


def _quick_one(lm, task, limit, bootstrap_iters, seed, mean, stderr_for_metric) -> dict:
    instances = _requests(task, limit, seed)
    task._instances = instances
    by_type: dict[str, list] = defaultdict(list)
    for inst in instances:
        inst.resps = []
        inst.filtered_resps = {}
        by_type[inst.request_type].append(inst)
    for reqtype, reqs in by_type.items():
        cloned = [r for r in reqs for _ in range(r.repeats)]
        for x, r in zip(getattr(lm, reqtype)(cloned, disable_tqdm=True), cloned, strict=True):
            r.resps.append(x)
    task.apply_filters()
    by_doc = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    for insts in by_doc.values():
        insts.sort(key=lambda x: x.idx)
    values: dict[tuple[str, str], list] = defaultdict(list)
    for key in task.instances[0].filtered_resps:
        for doc_id, doc in task.doc_iterator(rank=0, limit=limit, world_size=1):
            metrics = task.process_results(doc, [r.filtered_resps[key] for r in by_doc[doc_id]])
            for metric, v in metrics.items():
                values[(metric, key)].append(v)
    raw: dict = {}
    n = 0
    agg = task.aggregation()
    for (metric, key), items in values.items():
        fn = agg.get(metric, mean)
        raw[f"{metric},{key}"] = fn(items)
        se = None
        if isinstance(bootstrap_iters, int) and bootstrap_iters > 0:  # as evaluator_utils
            iters = min(bootstrap_iters, 100) if metric in _CAPPED else bootstrap_iters
            se = stderr_for_metric(metric=fn, bootstrap_iters=iters)
        raw[f"{metric}_stderr,{key}"] = se(items) if se and len(items) > 1 else "N/A"
        n = max(n, len(items))
    raw["_n"] = n
    return raw
