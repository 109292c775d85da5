"""``python -m dtm ...``: the headless twin of the dashboard.

Length: this module holds the whole command-line contract (every flag, output line and
exit code) in one place on purpose: one ``cmd_*`` per command, each calling one library
function, and one small ``_*_parser`` per command; the stage logic lives in the library.

Exit codes: 0 success; 2 bad input or environment (a message on stderr says what and
where); 3 training stopped on request (a checkpoint was saved: resume it); 1 an
unexpected error (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtm.errors import ConfigError, DTMError


def _progress_bar():
    """A ``(stage, fraction)`` callback drawing one tqdm bar per stage on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, frac: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(
                total=100,
                desc=stage,
                unit="%",
                file=sys.stderr,
                leave=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
            )
        bar.n = round(100 * frac)
        bar.refresh()
        if frac >= 1.0:
            bar.close()

    return update


def cmd_data_check(args: argparse.Namespace) -> int:
    from dtm.data import load_instructions

    res = load_instructions(args.file, split=args.split, count_tokens=False)
    print(res.report.summary(max_examples=args.examples))
    return 0


def cmd_disperse(args: argparse.Namespace) -> int:
    from dtm.disperse import DisperseConfig, run_disperse, write_disperse_outputs
    from dtm.store import Registry

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder.")
    existing = [p for p in (out / "assignments.csv", out / "clusters.json") if p.exists()]
    if existing and not args.force:
        raise ConfigError(
            f"{existing[0]} already exists: choose another --out, or add --force to replace it."
        )
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
    res = run_disperse(cfg, Registry(), project=not args.no_map, progress=_progress_bar())
    csv_path, json_path = write_disperse_outputs(res, out, cfg)
    reused = [k for k, v in res.computed.items() if not v]
    print(res.report.summary(max_examples=3))
    sil = res.clusters["silhouette"]
    print(
        f"clusters (K={cfg.k}, {cfg.method}): sizes {res.clusters['sizes']}, "
        f"silhouette {'n/a' if sil is None else round(sil, 4)}"
    )
    for c, words in enumerate(res.clusters["keywords"]):
        print(f"  cluster {c}: {', '.join(words)}")
    if reused:
        print(f"reused from the registry: {', '.join(reused)}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def cmd_lab_build(args: argparse.Namespace) -> int:
    from dtm.lab.build import build_lab

    bar = _progress_bar()
    progress = bar
    if args.progress_file:
        import os

        from dtm.store import ProgressFile

        file = ProgressFile(args.progress_file, state="building", pid=os.getpid())

        def progress(stage: str, frac: float) -> None:
            bar(stage, frac)
            file.update(force=frac >= 1.0, stage=stage, fraction=frac)

    try:
        summary = build_lab(
            args.out,
            seed=args.seed,
            size=args.size,
            preset=args.preset,
            knobs=_lab_knobs(args),
            rows_per_family=args.rows,
            steps=args.steps,
            dialogues=args.dialogues,
            force=args.force,
            progress=progress,
        )
    except Exception as e:
        if args.progress_file:
            from dtm.store import write_json_atomic

            write_json_atomic(
                args.progress_file, {"state": "failed", "error": f"{type(e).__name__}: {e}"}
            )
        raise
    print(
        f"built the {args.size} {args.preset} lab (seed {args.seed}) in {summary['seconds']} s: "
        f"{summary['world']['facts']} facts, {summary['model']['parameters']:,} parameters, "
        f"{summary['sft']['train_rows']} train / {summary['sft']['val_rows']} val rows"
    )
    print(f"wrote {args.out}")
    return 0


def _lab_knobs(args: argparse.Namespace):
    """The preset's bias knobs with each ``--knob NAME=VALUE`` replaced; None when none."""
    from dataclasses import fields, replace

    from dtm.lab.presets import preset

    if not args.knob:
        return None
    knobs = preset(args.preset).knobs
    types = {f.name: f.type for f in fields(knobs)}
    changes = {}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ConfigError(
                f"--knob {item!r}: expected NAME=VALUE with NAME one of {', '.join(types)}."
            )
        kind = types[name] if isinstance(types[name], str) else types[name].__name__
        try:
            if kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                changes[name] = value.lower() in ("true", "1")
            else:
                changes[name] = {"float": float, "int": int}.get(kind, str)(value)
        except ValueError:
            raise ConfigError(f"--knob {item!r}: {name} takes a {kind} value.") from None
        if kind == "float" and not 0.0 <= changes[name] <= 1.0:
            raise ConfigError(f"--knob {item!r}: {name} is a rate in [0, 1].")
        if kind == "int" and changes[name] < 0:
            raise ConfigError(f"--knob {item!r}: {name} must not be negative.")
    return replace(knobs, **changes)


def _train_config(args: argparse.Namespace):
    """A TrainConfig from ``--config FILE`` (JSON or YAML) overridden by the flags."""
    from dtm.train.flags import config_from_args

    values = _read_mapping(args.config) if args.config else {}
    return config_from_args(args, values, args.config or "")


def _read_mapping(path: str) -> dict:
    import json

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of names to values.")
    return data


def _install_stop_handlers() -> None:
    """SIGTERM, or a first Ctrl-C, asks the trainer to checkpoint and stop."""
    import signal

    from dtm.train import request_stop

    def on_int(signum, frame):
        print("stopping after this step (checkpoint); Ctrl-C again to abort", file=sys.stderr)
        request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    signal.signal(signal.SIGINT, on_int)


def cmd_train(args: argparse.Namespace) -> int:
    from dtm.jobs.runner import run_training as train
    from dtm.train import run_id

    _install_stop_handlers()
    if args.job:
        from dtm.jobs import run_job

        res = run_job(args.job, resume=args.resume)
        out, rid = res["out"], args.job
    else:
        cfg = _train_config(args)
        res = train(cfg, progress=_progress_bar(), resume=args.resume)
        out, rid = cfg.out, run_id(cfg)
    if res["metrics"] and isinstance(res["metrics"][0], list):  # a group: one line each
        for recs, folder in zip(res["metrics"], res.get("members") or [None] * 99, strict=False):
            last = recs[-1]
            print(
                f"{folder or 'member'}: {len(recs)} logged steps; final train "
                f"{last['train_loss']}, val {last['val_loss']:.4f}, loss ratio "
                f"{last['loss_ratio']}"
            )
        print(f"group {rid}: {len(res['metrics'])} members in {res['seconds']} s; wrote {out}")
        return 0
    last = res["metrics"][-1]
    print(
        f"run {rid}: {len(res['metrics'])} logged steps in {res['seconds']} s; final train "
        f"{last['train_loss']}, val {last['val_loss']:.4f}, loss ratio {last['loss_ratio']}"
    )
    print(f"wrote {out}/adapter, {out}/metrics.jsonl")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    import time

    from dtm import jobs

    if args.jobs_command == "list":
        rows = jobs.refresh()
        if args.group:
            rows = [j for j in rows if j.group == args.group]
        if not rows:
            print("no jobs")
        for j in rows:
            eta = j.eta_seconds()
            print(
                f"{j.id[:12]}  {j.state:<11} {j.name:<14} {j.step}/{j.total_steps or '?'}"
                f"{'' if eta is None else f'  eta {eta:.0f}s'}  {j.backend}  {j.run_dir}"
                + (f"  (in group {j.parent[:12]})" if j.parent else "")
                + (f"\n    {j.error}" if j.error and j.state in jobs.RESTARTABLE else "")
            )
        return 0
    if args.jobs_command == "cancel":
        job = jobs.cancel(args.id)
        print(f"{job.id}: {job.state}")
        return 0
    if args.jobs_command in ("resume", "retry"):
        job = jobs.restart(args.id, resume=args.jobs_command == "resume")
        print(f"{job.id}: {job.state}")
        return 0
    if args.jobs_command == "logs":
        store = jobs.JobStore()
        job = store.get(args.id)
        print(jobs.backend_for(job.backend).logs(job, args.tail), end="")
        return 0
    if args.jobs_command == "wait":
        store = jobs.JobStore()
        ids = [store.get(i).id for i in args.ids]
        deadline = time.time() + args.timeout if args.timeout else None
        while True:
            rows = {j.id: j for j in jobs.refresh(store)}
            if all(rows[i].state in jobs.FINAL for i in ids):
                break
            if deadline and time.time() > deadline:
                print("timed out", file=sys.stderr)
                return 1
            time.sleep(args.poll)
        for i in ids:
            print(f"{i}: {rows[i].state}" + (f" ({rows[i].error})" if rows[i].error else ""))
        return 0 if all(rows[i].state == "done" for i in ids) else 1
    raise AssertionError(args.jobs_command)


def cmd_run(args: argparse.Namespace) -> int:
    from dtm.experiment import (
        describe,
        experiment_dir,
        load_experiment,
        plan,
        run_experiment,
    )

    exp = load_experiment(args.experiment)
    if args.backend:
        exp.backend = args.backend
    print(describe(exp, plan(exp)))
    if args.dry_run:
        return 0
    command = f"python -m dtm run {args.experiment}"
    out = experiment_dir(exp.name)
    try:
        res = run_experiment(exp, command=command, wait=not args.no_wait, echo=_progress_bar())
    except DTMError:
        if (out / "results.md").exists():
            print((out / "results.md").read_text(encoding="utf-8"))
        raise
    print(res["jobs_table"])
    if args.no_wait:
        print(f"wrote {out / 'jobs.md'}; the jobs run on")
        return 0
    print(res["results"])
    print(f"wrote {out / 'results.md'} and results.json")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dtm.merge.engine import Merger
    from dtm.merge.methods import merge_params_from_args

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {args.weights}: not comma-separated numbers.") from None
    if weights is not None:  # checked before any model loads, naming the flag
        from dtm.merge.methods import check_weights

        try:
            check_weights(weights, len(args.adapters), normalise=False)
        except ConfigError as e:
            raise ConfigError(f"--weights {args.weights}: {e}") from None
    finding = args.search or args.cocktail
    if finding and weights is not None:
        raise ConfigError("--weights with --search/--cocktail: they find the weights; give one.")
    if args.search and args.cocktail:
        raise ConfigError("--search and --cocktail: choose one way to find the weights.")
    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # checked before a search spends its budget (the export checks it again)
        raise ConfigError(f"--out {args.out}: not empty; choose a new folder.")
    objective = _merge_objective(args) if finding else None
    weights = weights or [1.0 / len(args.adapters)] * len(args.adapters)
    params = merge_params_from_args(args.method, args)
    merger = Merger(
        args.base,
        args.adapters,
        method=args.method,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    found = None
    if args.search:
        found = _search(merger, args, objective, params)
        weights = found["best"]["weights"]
    elif args.cocktail:
        found = _cocktail(merger, args, objective)
        weights = found["best"]["weights"]
    out = merger.export(args.out, args.method, weights, full=args.full, **params)
    from dtm.merge.saved import save_merge

    source = "search" if args.search else "cocktail" if args.cocktail else "exported"
    saved = save_merge(
        args.base,
        [str(a) for a in args.adapters],
        {"method": args.method, "weights": weights, "params": params},
        source=source,
        path=str(out),
    )
    if found is not None:
        from dtm.store import write_json_atomic

        name = "search.json" if args.search else "cocktail.json"
        write_json_atomic(Path(out) / name, found)
        print(f"wrote {out}/{name}")
    kind = "full merged weights" if args.full else "a peft adapter"
    shown = [round(w, 4) for w in weights]
    print(f"merged {len(args.adapters)} adapters ({args.method}, weights {shown}) into {kind}")
    print(f"wrote {out} and {out}/recipe.json; Compare lists it as {saved['label']!r}")
    return 0


def _merge_objective(args):
    """The objective of ``dtm merge --search/--cocktail`` from --tasks, --tasks-dir,
    --heldout and --lab; checked before any model loads."""
    from dtm.merge.objective import Objective
    from dtm.tasks import PROBES, TASKS

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.cocktail:
        if not args.heldout or tasks:
            raise ConfigError(
                "--cocktail weighs each adapter by its held-out loss: give --heldout FILE "
                "(and no --tasks)."
            )
    elif not tasks and not args.heldout:
        raise ConfigError("--search: give --tasks (and --tasks-dir) and/or --heldout FILE.")
    user = {}
    if args.tasks_dir:
        from dtm.evaluate.user import folder_tasks

        user = folder_tasks(args.tasks_dir)
    mine = [t for t in tasks if t in user]
    lab_tasks = [t for t in tasks if t not in user and t in TASKS + PROBES]
    unknown = [t for t in tasks if t not in user and t not in lab_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks {', '.join(unknown)}: the search scores with the quick engine: a lab "
            f"task or a task of --tasks-dir{f' {args.tasks_dir}' if args.tasks_dir else ''}."
        )
    _, lab = _model_and_lab(args.base, args.lab) if lab_tasks else (None, None)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1.")
    if args.cocktail and not args.temperature > 0:
        raise ConfigError(f"--temperature {args.temperature}: must be above 0.")
    from dtm.evaluate import check_heldout

    check_heldout(args.heldout or [])
    k = len(args.adapters)
    if args.search and args.budget < k + 1:
        raise ConfigError(
            f"--budget {args.budget}: needs at least {k + 1} evaluations (the uniform point "
            f"and the {k} vertices come first)."
        )
    return Objective(
        lab=lab,
        lab_tasks=tuple(lab_tasks),
        tasks_dir=args.tasks_dir,
        tasks=tuple(mine),
        heldout=tuple(args.heldout or ()),
        limit=args.limit,
    )


def _search(merger, args, objective, params) -> dict:
    from dtm.merge.landscape import merge_score_fn
    from dtm.merge.search import search_weights

    fn = merge_score_fn(merger, args.method, objective, **params)
    bar = _progress_bar()
    found = search_weights(fn, len(args.adapters), args.budget, seed=args.param_seed, progress=bar)
    uniform = found["points"][0]
    best = found["best"]
    print(
        f"searched {len(found['points'])} points: best {best['score']:.4f} at "
        f"{[round(w, 3) for w in best['weights']]} (uniform {uniform['score']:.4f})"
    )
    return found


def _cocktail(merger, args, objective) -> dict:
    from dtm.merge.search import cocktail_weights

    k = len(args.adapters)
    losses = []
    for i in range(k):
        one = [1.0 if j == i else 0.0 for j in range(k)]
        scores = objective.score(merger.apply("linear", one), merger.tokenizer)
        losses.append(sum(scores.values()) / len(scores))  # mean held-out loss
    weights = cocktail_weights(losses, args.temperature)
    print(
        f"held-out losses {[round(x, 4) for x in losses]} -> weights "
        f"{[round(w, 4) for w in weights]} (T={args.temperature})"
    )
    return {
        "method": "lm-cocktail",
        "temperature": args.temperature,
        "losses": losses,
        "best": {"weights": weights},
    }


def _model_and_lab(model: str, lab: str | None) -> tuple[str, str | None]:
    """``--model lab`` is the default lab's base model; a lab's ``model/`` folder brings
    its benchmarks along; otherwise the default lab (when built) scores the lab tasks."""
    from dtm.lab import default_lab_dir

    if model == "lab":
        lab_dir = Path(lab) if lab else default_lab_dir()
        if not (lab_dir / "model" / "config.json").exists():
            raise ConfigError(
                f"--model lab: the lab {lab_dir} is not built; run `python -m dtm lab build "
                f"--out {lab_dir}` or open the dashboard once."
            )
        return str(lab_dir / "model"), str(lab_dir)
    if lab is None:
        here = Path(model).expanduser()
        if (here.parent / "benchmarks").is_dir() and (here.parent / "lab.json").exists():
            lab = str(here.parent)
        elif (default_lab_dir() / "benchmarks").is_dir():
            lab = str(default_lab_dir())
    return model, lab


def _check_results_file(out: Path) -> None:
    """An existing ``--out`` is replaced only when it is a results file as ``dtm eval``
    writes it (``{task: {metric: number}}``); anything else (a hand-edited or foreign
    file) is reported and left as it is."""
    import json

    if not out.exists():
        return
    keep = "it was left as it is: move it aside or choose another --out."
    try:
        data = json.loads(out.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--out {out}: exists and is not UTF-8 text ({e.reason}); {keep}"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--out {out}: exists and is not a results file (not valid JSON: {e.msg} at line "
            f"{e.lineno} column {e.colno}); {keep}"
        ) from None
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot read it ({e.strerror}); {keep}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--out {out}: exists and is not a results file (a JSON {type(data).__name__}, "
            f"not {{task: {{metric: value}}}}); {keep}"
        )
    for task, metrics in data.items():
        if not isinstance(metrics, dict):
            raise ConfigError(
                f"--out {out}: exists and is not a results file ({task!r} holds a "
                f"{type(metrics).__name__}, not {{metric: value}}); {keep}"
            )
        for metric, value in metrics.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ConfigError(
                    f"--out {out}: exists and is not a results file ({task}.{metric} is "
                    f"{value!r}, not a number); {keep}"
                )


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from dtm.evaluate import evaluate, known_tasks
    from dtm.evaluate.harness import check_code_opt_in
    from dtm.score import ModelRef, load_model, record
    from dtm.store import write_json_atomic

    if args.list_tasks:
        print("\n".join(known_tasks(args.tasks_dir)))
        return 0
    if not args.model or not (args.tasks or args.heldout) or not args.out:
        raise ConfigError("give --model, --tasks (or --heldout) and --out (or --list-tasks).")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.engine == "quick":
        unknown = [t for t in tasks if t not in known_tasks(args.tasks_dir)]
        if unknown:
            raise ConfigError(
                f"unknown task(s) {', '.join(unknown)}; `python -m dtm eval --list-tasks` "
                "prints the known ones."
            )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1.")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as results.json.")
    _check_results_file(out)
    check_code_opt_in(tasks, args.allow_code_execution)
    from dtm.evaluate import check_heldout

    check_heldout(args.heldout or [])
    if args.tasks_dir:
        from dtm.evaluate.user import folder_tasks

        folder_tasks(args.tasks_dir)  # a malformed task file: exit 2 before any model loads
    base, lab = _model_and_lab(args.model, args.lab)
    ref = ModelRef(
        base=base,
        adapters=list(args.adapter or []),
        label=args.label or "",
        group=args.group,
        seed=args.seed,
    )
    if len(ref.adapters) > 1:
        ref.recipe = {"method": "average", "weights": None, "params": {}}
    model, tok = load_model(
        ref, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle
    )
    results = evaluate(
        model,
        tok,
        tasks,
        engine=args.engine,
        lab=lab,
        tasks_dir=args.tasks_dir,
        heldout=list(args.heldout or []),
        limit=args.limit,
        batch_size=args.batch_size,
        allow_code=args.allow_code_execution,
        seed=args.seed,
    )
    write_json_atomic(out, results)
    record(ref, results, engine=args.engine, limit=args.limit)
    for task, metrics in results.items():
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k.startswith(("acc", "exact_match", "loss", "bits_per_byte"))
            and not k.endswith("_stderr")
        }
        print(f"{task}: {json.dumps(shown)} (n={metrics.get('n')})")
    print(f"wrote {out}; the scores are in the registry too")
    return 0


def cmd_lab_measure(args: argparse.Namespace) -> int:
    from dtm.lab.measure import measure_lab

    if not (Path(args.lab) / "lab.json").exists():
        raise ConfigError(f"--lab {args.lab}: not a built lab (no lab.json).")
    overrides = {"lr": args.lr} if args.lr else {}
    summary = measure_lab(
        args.lab,
        args.out,
        steps=args.steps,
        log_every=args.log_every,
        seed=args.seed,
        progress=_progress_bar(),
        **overrides,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"SFT took {summary['sft_seconds']} s; wrote {args.out}/results.json, report.md")
    return 0


def _model_permissions(p: argparse.ArgumentParser) -> None:
    """The two switches that let a model folder run code: both off unless given."""
    p.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        help="run the Python code a model folder ships (its auto_map); off by default",
    )
    p.add_argument(
        "--allow-pickle-weights",
        dest="allow_pickle",
        action="store_true",
        help="load a base model that has only pickle (.bin) weights (a pickle can run code)",
    )


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="inspect instruction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="load a file and report kept and dropped rows")
    check.add_argument("file", help="JSONL, JSON, CSV or Parquet file, or a hub dataset id")
    check.add_argument("--split", default="train", help="split of a hub dataset")
    check.add_argument("--examples", type=int, default=20, help="dropped rows to list")
    check.set_defaults(func=cmd_data_check)


def _disperse_parser(sub) -> None:
    from dtm.cluster import METHODS
    from dtm.embed import DEFAULT_MODEL, FIELDS, PRECISIONS

    d = sub.add_parser("disperse", help="embed, cluster into K subsets, and map the data")
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


def _train_parser(sub) -> None:
    from dtm.train.flags import add_arguments

    t = sub.add_parser(
        "train", help="LoRA SFT of a causal LM: vanilla SFT, a sub-model, or a baseline"
    )
    t.add_argument(
        "--config", default=None, help="JSON or YAML file of TrainConfig values (flags win)"
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --out"
    )
    t.add_argument("--job", default=None, help=argparse.SUPPRESS)  # run a registry job
    add_arguments(t)  # one flag per TrainConfig field, with its help
    t.set_defaults(func=cmd_train)


def _curate_parser(sub) -> None:
    c = sub.add_parser(
        "curate", help="select a Deita-style subset of the data (no training): selection.csv"
    )
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


def cmd_curate(args: argparse.Namespace) -> int:
    from dtm.curate import save_selection, selection
    from dtm.data import load_instructions
    from dtm.train.config import TrainConfig, check_curate

    cfg = TrainConfig(
        base=args.base or "", data=args.data, out=args.out, kind="curate",
        curate_budget=args.curate_budget, curate_score=args.curate_score,
        curate_threshold=args.curate_threshold, max_length=args.max_length,
    )  # fmt: skip
    check_curate(cfg)
    if cfg.curate_score == "ifd" and not args.base:
        raise ConfigError("--curate-score ifd needs --base MODEL (the model that scores).")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder.")
    table = load_instructions(args.data, count_tokens=False).table
    model = tok = None
    if cfg.curate_score == "ifd":
        from dtm.models import load_base

        model, tok = load_base(args.base)
    sel = selection(cfg, table, tok, model)
    out.mkdir(parents=True, exist_ok=True)
    save_selection(cfg, sel, out)
    print(f"selection: kept {int(sel['kept'].sum())} of {len(sel)} rows; wrote {out}/selection.csv")
    return 0


def _jobs_parser(sub) -> None:
    j = sub.add_parser("jobs", help="background training jobs")
    j_sub = j.add_subparsers(dest="jobs_command", required=True)
    jl = j_sub.add_parser("list", help="every job with its state and progress")
    jl.add_argument("--group", default=None, help="only the jobs of one experiment")
    for name, text in [
        ("cancel", "stop a job (a running one saves a checkpoint first)"),
        ("resume", "continue a cancelled, interrupted or failed job from its checkpoint"),
        ("retry", "run a cancelled, interrupted or failed job again from scratch"),
    ]:
        c = j_sub.add_parser(name, help=text)
        c.add_argument("id", help="job id (a unique prefix is enough)")
    jg = j_sub.add_parser("logs", help="the tail of a job's log")
    jg.add_argument("id")
    jg.add_argument("--tail", type=int, default=4000, help="bytes from the end")
    jw = j_sub.add_parser("wait", help="wait until jobs end; exit 0 when all are done")
    jw.add_argument("ids", nargs="+")
    jw.add_argument("--timeout", type=float, default=None)
    jw.add_argument("--poll", type=float, default=2.0)
    for c in j_sub.choices.values():
        c.set_defaults(func=cmd_jobs)


def _merge_parser(sub) -> None:
    from dtm.merge.methods import METHODS as MERGE_METHODS
    from dtm.merge.methods import add_merge_arguments

    mg = sub.add_parser("merge", help="merge LoRA sub-models exactly into one adapter or model")
    mg.add_argument("--base", required=True, help="the base model the adapters were trained on")
    mg.add_argument("--adapters", nargs="+", required=True, help="peft adapter folders")
    mg.add_argument("--weights", default=None, help="comma-separated, one per adapter")
    mg.add_argument("--method", default="average", choices=list(MERGE_METHODS))
    add_merge_arguments(mg)
    mg.add_argument("--full", action="store_true", help="write full merged weights (HF format)")
    find = mg.add_argument_group("finding the weights")
    find.add_argument(
        "--search",
        action="store_true",
        help="maximise the mean headline of --tasks (held-out losses as -loss) over the "
        "weight simplex (Optuna CMA-ES); writes OUTDIR/search.json and exports the best",
    )
    find.add_argument(
        "--cocktail",
        action="store_true",
        help="LM-Cocktail's weights: softmax(-loss/T) of each adapter's --heldout loss",
    )
    find.add_argument("--tasks", default=None, help="comma-separated: lab or --tasks-dir tasks")
    find.add_argument("--tasks-dir", dest="tasks_dir", default=None, help="task YAML folder")
    find.add_argument(
        "--heldout",
        action="append",
        default=None,
        metavar="FILE",
        help="instruction data (or a .txt corpus) whose loss enters as -loss",
    )
    find.add_argument("--budget", type=int, default=40, help="evaluations, starts included")
    find.add_argument("--limit", type=int, default=40, help="items per task / held-out rows")
    find.add_argument("--temperature", type=float, default=5.0, help="LM-Cocktail's T")
    find.add_argument("--lab", default=None, help="the lab whose tasks lab_* are")
    _model_permissions(mg)
    mg.add_argument("--out", required=True, help="a new folder")
    mg.set_defaults(func=cmd_merge)


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="a whole experiment from a YAML file, headless")
    r.add_argument("experiment", help="an experiment file, e.g. experiments/lab.yaml")
    r.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan; load nothing"
    )
    r.add_argument("--no-wait", action="store_true", help="submit the jobs and return")
    r.add_argument("--backend", default=None, help="local or ray:ADDRESS (overrides the file)")
    r.set_defaults(func=cmd_run)


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="score a model on the lab's tasks or the paper's benchmarks")
    ev.add_argument("--model", default=None, help="model folder, hub id, or `lab`")
    ev.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="peft adapter folder; give it several times to score their average merge",
    )
    ev.add_argument("--tasks", default=None, help="comma-separated task names")
    ev.add_argument(
        "--tasks-dir",
        dest="tasks_dir",
        default=None,
        help="a folder of lm-evaluation-harness task YAMLs (dataset_path: json, local files)",
    )
    ev.add_argument(
        "--heldout",
        action="append",
        default=None,
        metavar="FILE",
        help="instruction data (or a .txt corpus) whose mean response-token loss is added "
        "as heldout:<file stem>; give it several times",
    )
    ev.add_argument("--engine", choices=["quick", "full"], default="quick")
    ev.add_argument("--limit", type=int, default=None, help="first N items of each task")
    ev.add_argument("--lab", default=None, help="the lab folder whose tasks lab_* are")
    ev.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="rows per batch (default: 64 for the full engine, 256 for the quick one)",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--label", default=None, help="a name for the model in the registry")
    ev.add_argument("--group", default=None, help="the experiment or launch it belongs to")
    ev.add_argument(
        "--allow-code-execution",
        dest="allow_code_execution",
        action="store_true",
        help="run humaneval/mbpp, which execute model code",
    )
    _model_permissions(ev)
    ev.add_argument(
        "--list-tasks",
        dest="list_tasks",
        action="store_true",
        help="print the known task names, the lab's first",
    )
    ev.add_argument("--out", default=None, help="results.json: {task: {metric: value}}")
    ev.set_defaults(func=cmd_eval)


def _lab_parser(sub) -> None:
    lab = sub.add_parser("lab", help="the embedded alignment-tax lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lb = lab_sub.add_parser("build", help="build the synthetic world, base model, data, benchmarks")
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument(
        "--size",
        default="default",
        choices=["small", "default"],
        help="small: for tests, well under a minute; default: the dashboard's lab",
    )
    lb.add_argument(
        "--preset",
        default="bias",
        choices=["bias", "interference"],
        help="bias: the paper's mechanism by construction (default); interference: the first lab",
    )
    lb.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="replace one of the preset's bias knobs (repeatable), e.g. favourite=0.3",
    )
    lb.add_argument(
        "--rows", type=int, default=None, help="train rows per family (default: the preset's)"
    )
    lb.add_argument("--steps", type=int, default=None, help="pretraining steps (default by size)")
    from dtm.lab.world import DIALOGUES

    lb.add_argument(
        "--dialogues",
        default=None,
        choices=DIALOGUES,
        help="pretraining's chat dialogues answer bare ('7 .') or framed ('it is 7 .'); "
        "conventions: framed, and the corpus also shows the one-word, yes/no and repeat "
        "conventions on sums and passages; default: the preset's (docs/lab.md)",
    )
    lb.add_argument("--force", action="store_true", help="replace a non-empty --out")
    lb.add_argument("--out", required=True, help="folder to write the lab into")
    lb.add_argument(
        "--progress-file",
        default=None,
        help="also write progress as JSON to this file (the dashboard reads it)",
    )
    lb.set_defaults(func=cmd_lab_build)
    lm = lab_sub.add_parser("measure", help="base and SFT figures of a built lab, with curves")
    lm.add_argument("--lab", required=True, help="a folder made by `dtm lab build`")
    lm.add_argument("--steps", type=int, default=None, help="SFT steps (default: the preset's)")
    lm.add_argument("--log-every", type=int, default=40)
    lm.add_argument("--lr", type=float, default=None, help="SFT learning rate (lab default 1e-3)")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--out", required=True)
    lm.set_defaults(func=cmd_lab_measure)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dtm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _data_parser,
        _disperse_parser,
        _train_parser,
        _curate_parser,
        _jobs_parser,
        _merge_parser,
        _run_parser,
        _eval_parser,
        _lab_parser,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DTMError as e:
        print(f"{'stopped' if e.exit_code == 3 else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
