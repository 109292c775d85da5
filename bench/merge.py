"""Merge benchmarks, side by side in one run, of the code users run.

(a) Slider-to-score latency on the lab model (needs a lab; skipped when there is none):
    K=4 sub-models of the lab (trained here for a few steps), then for random weight
    vectors: ``Merger.apply`` + quick score of the lab's knowledge, reasoning and
    instruction subsets; p50 and p95. The average's slider also side by side through the
    page's ``live_score``: quiet, beside a ``dtm train`` job (each claims its share of the
    cores, ``dtm.threads``), and beside a plain torch process on every core.
(b) Merging K=4 rank-16 LoRA adapters (random; lora_alpha 16, 32, 16 with rslora, 8, so
    the scales s_k are 1, 2, 4 and 0.5) on gate/up/down_proj of a random Llama written to
    disk: a small shape by default (seconds on a 2-core CPU), ``--shape 1b`` (TinyLlama's)
    or ``--shape 7b`` (Llama-2-7b's, for a GPU). Each method runs in its own process (its
    own peak memory), ``--repeats`` times (median):
      engine_live    ``dtm.merge.engine.Merger(base, adapters).apply("linear", w)``
      engine_avg     ``Merger.apply("average", raw)`` (raw weights normalised to w)
      engine_concat  ``dtm.merge.lora.linear_concat(adapters, w, out)`` (the exact merged
                     adapter, read from and written to disk), then loaded with peft
      peft_svd/_cat  peft ``add_weighted_adapter(..., combination_type="svd"|"cat")``
                     (svd: ``svd_full_matrices=False``, the faster baseline; peft's
                     default ``True`` with ``--svd-full``)
      dense          mergekit-style: each sub-model materialised, averaged
    Check, independent of the engine: the reference is computed here from the files,
    W_ref = W0 + sum_k w_k s_k B_k A_k (s_k = lora_alpha/r, or lora_alpha/sqrt(r) with
    rslora; float64), and loaded into a plain ``transformers`` model for reference logits on
    a fixed input. Each method's merged model is compared with it: its effective weights
    (each adapted module applied to the identity, on a sample of layers) and its logits.
    A control applies the engine with one wrong weight and must fail the same check.

(c) Weights by block of layers on the lab (needs a lab; K=4 sub-models as in (a), B=3):
    the live score (``average`` + quick score) with one-number weights and with a K x B
    table, interleaved trial by trial, p50 and p95 side by side; then the learned weights
    (``dtm.merge.learn.learn_weights``, ``--steps``) on the lab's validation rows (``--limit``
    rows): its wall time and held-out loss against the uniform merge's and against the
    CMA-ES search over the same K x B weights with the same number of model evaluations
    (``search_merge(..., blocks=3)``, seed 0).

    .venv/bin/python -m bench.merge [--lab DIR] [--trials 40] [--shape small|1b|7b]
                                    [--repeats 5] [--skip-latency] [--svd-full]
                                    [--blocks-only] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.labsubs import train_lab_subs
from bench.shapes import LLAMA2_7B, LLAMA_SMALL, TINYLLAMA_1B
from bench.usertasks import write_user_tasks

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"small": LLAMA_SMALL, "1b": TINYLLAMA_1B, "7b": LLAMA2_7B}
TARGETS = ["gate_proj", "up_proj", "down_proj"]
K, R = 4, 16
ADAPTERS = [(16, False), (32, False), (16, True), (8, False)]  # (lora_alpha, use_rslora)
WEIGHTS = [0.1, 0.2, 0.3, 0.4]
RAW = [1.0, 2.0, 3.0, 4.0]  # "average" normalises these to WEIGHTS
WRONG = [0.2, 0.2, 0.3, 0.4]  # the control: one weight off by 0.1
METHODS = ["engine_live", "engine_concat", "peft_svd", "peft_cat", "dense"]
EXACT_TOL = 1e-3  # an exact method's error must be below this fraction of the merge's effect
SAMPLE_LAYERS = 12


def lab_adapters(lab: Path, tmp: Path) -> list[Path]:
    """K=4 sub-models of the lab (round-robin clusters, 40 steps each)."""
    ids = [json.loads(x)["id"] for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
    return train_lab_subs(lab, {i: n % K for n, i in enumerate(ids)}, 40, tmp)


def by_block(lab: Path, adapters: list[Path], trials: int, limit: int, steps: int) -> dict:
    """(c): the live score with one-number and K x 3 weights, and the learned weights
    against uniform and CMA-ES at the same number of evaluations."""
    import numpy as np

    from dtm.merge.engine import Merger
    from dtm.merge.landscape import quick_score
    from dtm.merge.learn import learn_weights
    from dtm.merge.objective import Objective
    from dtm.merge.search import search_merge

    blocks = 3
    merger = Merger(str(lab / "model"), adapters)
    bench = lab / "benchmarks"
    rng = np.random.default_rng(0)
    quick_score(merger.apply("average", [1] * K), merger.tokenizer, bench, limit)  # warm-up
    times = {"one number per sub-model": [], f"K x {blocks} table": []}
    for _ in range(trials):
        flat = list(map(float, rng.dirichlet(np.ones(K))))
        table = rng.dirichlet(np.ones(K), size=blocks).T.tolist()
        for name, w in zip(times, (flat, table), strict=True):
            t0 = time.perf_counter()
            quick_score(merger.apply("average", w), merger.tokenizer, bench, limit)
            times[name].append(time.perf_counter() - t0)
    out = {"live": {n: _percentiles(t) for n, t in times.items()}}
    objective = Objective(heldout=(str(lab / "data" / "val.jsonl"),), limit=limit)
    t0 = time.perf_counter()
    learned = learn_weights(merger, "average", objective, blocks, steps)
    learn_s = time.perf_counter() - t0
    evals = learned["evaluations"]
    t0 = time.perf_counter()
    found = search_merge(merger, "average", objective, evals, blocks=blocks, seed=0)
    search_s = time.perf_counter() - t0
    out["learn"] = {
        "steps": steps,
        "evaluations": evals,
        "rows": limit,
        "seconds": learn_s,
        "uniform": learned["path"][0]["loss"],
        "learned": learned["best"]["loss"],
        "weights": learned["best"]["weights"],
        "search": -found["best"]["score"],
        "search_seconds": search_s,
    }
    return out


def latency(lab: Path, trials: int, limit: int, adapters: list[Path]) -> dict:
    import numpy as np

    from dtm.merge.engine import Merger
    from dtm.merge.landscape import live_score, quick_score
    from dtm.merge.objective import Objective
    from dtm.tasks import QUICK_TASKS

    with tempfile.TemporaryDirectory() as tmp:
        merger = Merger(str(lab / "model"), adapters)
        bench = lab / "benchmarks"
        rng = np.random.default_rng(0)
        quick_score(merger.apply("average", [1] * K), merger.tokenizer, bench, limit)  # warm-up
        out = {}
        for method, params in [("average", {}), ("ties", {"density": 0.5})]:
            times = []
            for _ in range(trials):
                w = list(map(float, rng.dirichlet(np.ones(K))))
                t0 = time.perf_counter()
                quick_score(merger.apply(method, w, **params), merger.tokenizer, bench, limit)
                times.append(time.perf_counter() - t0)
            out[method] = _percentiles(times)
        # The same slider moves, through the page's own call (``live_score``, which claims
        # the server's share of the cores), quiet and beside a busy process: a real
        # training job (``dtm train``, which takes its share), and a plain torch process
        # on every core (which takes no notice of the others).
        live = Objective(lab=str(lab), lab_tasks=tuple(QUICK_TASKS.values()), limit=limit)
        for label, start in (
            ("quiet", None),
            ("beside a training job", lambda: _training_job(lab, Path(tmp) / "job")),
            ("beside a torch process on every core", _busy_process),
        ):
            proc = start() if start else None
            try:
                times = []
                for _ in range(trials):
                    w = list(map(float, rng.dirichlet(np.ones(K))))
                    times.append(live_score(merger, "average", w, live)[1] / 1000)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            out[f"average, {label}"] = _percentiles(times)
        # a user task (a task YAML in a folder, bench.usertasks): the live score of the
        # Merge page on a tasks folder, the first ``limit`` items
        folder = write_user_tasks(lab, Path(tmp) / "tasks")
        objective = Objective(tasks_dir=str(folder), tasks=("user_knowledge",), limit=limit)
        objective.score(merger.apply("average", [1] * K), merger.tokenizer)  # builds the task
        times = []
        for _ in range(trials):
            w = list(map(float, rng.dirichlet(np.ones(K))))
            t0 = time.perf_counter()
            objective.score(merger.apply("average", w), merger.tokenizer)
            times.append(time.perf_counter() - t0)
        out["average, user task"] = _percentiles(times)
        return out


BUSY = (
    "import torch\n"
    "x = torch.randn(512, 512)\n"
    "print('busy', flush=True)\n"
    "while True:\n"
    "    x = torch.tanh(x @ x.T / 512)\n"
)


def _training_job(lab: Path, out: Path) -> subprocess.Popen:
    """``dtm train`` on the lab, far longer than the measurement (training when this
    returns)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtm", "train", "--base", str(lab / "model"),
         "--data", str(lab / "data" / "train.jsonl"), "--steps", "100000",
         "--log-every", "100000", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(15)  # loaded and training
    return proc


def _busy_process() -> subprocess.Popen:
    """A torch process multiplying matrices on every core until killed (started, and
    computing, when this returns)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # torch imported, the loop starting
    time.sleep(1.0)
    return proc


def _percentiles(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
    }


# ---- (b) setup and the reference, computed here from the files --------------------------


def _layer_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.mlp.{t}" for i in range(n_layers) for t in TARGETS]


def build(work: Path, shape: str) -> dict:
    """Write a random base model and K random adapters under ``work``, then the reference
    (``ref.safetensors``) and the run's settings (``meta.json``)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape])
    model = LlamaForCausalLM(cfg).float()  # random init (std 0.02), untied lm_head
    base = work / "base"
    model.save_pretrained(base, safe_serialization=True)
    names = _layer_names(cfg.num_hidden_layers)
    gen = torch.Generator().manual_seed(1)
    adapters = []
    for k, (alpha, rslora) in enumerate(ADAPTERS):
        d = work / f"a{k}"
        LoraConfig(
            r=R,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=TARGETS,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(base),
        ).save_pretrained(d)
        tensors = {}
        for n in names:
            lin = model.get_submodule(n)
            a = torch.randn(R, lin.in_features, generator=gen) * 0.02
            b = torch.randn(lin.out_features, R, generator=gen) * 0.02
            tensors[f"base_model.model.{n}.lora_A.weight"] = a
            tensors[f"base_model.model.{n}.lora_B.weight"] = b
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        adapters.append(str(d))
    del model
    sample = names[:: max(1, len(names) // SAMPLE_LAYERS)]
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = reference(base, adapters, names, sample, WEIGHTS, ids)
    save_file(
        {
            "ids": ids,
            "logits": ref["logits"],
            **{f"W.{n}": ref["W"][n] for n in sample},
        },
        work / "ref.safetensors",
    )
    meta = {
        "shape": shape,
        "base": str(base),
        "adapters": adapters,
        "sample": sample,
        "n_layers": len(names),
        "delta_max": ref["delta_max"],
        "logit_effect": float((ref["logits"] - ref["base_logits"]).abs().max()),
    }
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


def reference(base: Path, adapters: list[str], names: list[str], sample, weights, ids) -> dict:
    """By hand from the safetensors files: delta = sum_k w_k s_k B_k A_k (float64), W_ref =
    W0 + delta, and the logits of a plain ``transformers`` model holding W_ref. One layer's
    delta at a time (a 1B shape's float64 deltas would not all fit a small machine)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    factors = []
    for d in adapters:
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors.append((s, load_file(Path(d) / "adapter_model.safetensors")))
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    w0 = {}
    for f in sorted(base.glob("*.safetensors")):
        w0.update(load_file(f))
    wref, delta_max = {}, 0.0
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.float()
        for n in names:
            delta = 0
            for (s, t), w in zip(factors, weights, strict=True):
                a = t[f"base_model.model.{n}.lora_A.weight"].double()
                b = t[f"base_model.model.{n}.lora_B.weight"].double()
                delta = delta + w * s * (b @ a)
            delta_max = max(delta_max, float(delta.abs().max()))
            w = w0.pop(f"{n}.weight").double() + delta
            model.get_submodule(n).weight.copy_(w.float())
            if n in sample:
                wref[n] = w
        logits = model(input_ids=ids).logits.float()
    return {"W": wref, "delta_max": delta_max, "logits": logits, "base_logits": base_logits}


# ---- (b) one method, in its own process -----------------------------------------------


def _module(model, name: str):
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return root.get_submodule(name)


def check(model, ref: dict, sample: list[str], dev) -> tuple[float, float]:
    """(max |W_eff - W_ref| on the sampled layers, max |logits - reference logits|), where
    W_eff is what each adapted module of ``model`` computes (applied to the identity)."""
    import torch

    err_w = 0.0
    with torch.no_grad():
        logits = model(input_ids=ref["ids"].to(dev)).logits.float().cpu()
        err_l = float((logits - ref["logits"]).abs().max())
        for n in sample:
            mod = _module(model, n)
            wref = ref[f"W.{n}"]
            eye = torch.eye(wref.shape[1], device=dev, dtype=next(mod.parameters()).dtype)
            weff = mod(eye).T.double().cpu()
            err_w = max(err_w, float((weff - wref).abs().max()))
    return err_w, err_l


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_reset_peak() -> int:
    """The current RSS in bytes, with the peak (VmHWM) reset to it where Linux allows, so
    that the model load before the timing does not hide the merge's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss = _status_kb("VmRSS")
    return 1024 * rss if rss is not None else _rss_peak()


def _rss_peak() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def worker(method: str, work: str) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    _quiet()
    work = Path(work)
    meta = json.loads((work / "meta.json").read_text())
    ref = load_file(work / "ref.safetensors")
    repeats = meta["repeats"]
    base, adapters, sample = meta["base"], meta["adapters"], meta["sample"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def mem_start():
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return _rss_reset_peak()

    def mem_peak(start):
        if cuda:
            return (torch.cuda.max_memory_allocated() - start) / 2**20
        return max(0.0, (_rss_peak() - start) / 2**20)

    def timed(fn, between=None):
        start, times = mem_start(), []
        for i in range(repeats):
            if between and i:
                between()
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(i)
            sync()
            times.append(time.perf_counter() - t0)
        return times, mem_peak(start)

    def row(name, call, times, peak, model, control=False):
        err_w, err_l = check(model, ref, sample, dev)
        return {
            "method": name,
            "call": call,
            "times": times,
            "peak_extra_mb": peak,
            "err_w": err_w,
            "err_logits": err_l,
            "control": control,
            "device": dev.type,
        }

    def plain_base():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev).eval()

    rows = []
    if method == "engine_live":
        from dtm.merge.engine import Merger

        merger = Merger(base, adapters)
        times, peak = timed(lambda i: merger.apply("linear", WEIGHTS))
        rows.append(row("engine_live", 'Merger.apply("linear", w)', times, peak, merger.model))
        times, peak = timed(lambda i: merger.apply("average", RAW))
        rows.append(row("engine_avg", 'Merger.apply("average", raw)', times, peak, merger.model))
        times, peak = timed(lambda i: merger.apply("linear", WRONG))
        rows.append(
            row("control", f"apply with w={WRONG}", times, peak, merger.model, control=True)
        )
    elif method == "engine_concat":
        from peft import PeftModel

        from dtm.merge.lora import linear_concat

        outs = [work / "concat" / f"rep{i}" for i in range(repeats)]
        times, peak = timed(lambda i: linear_concat(adapters, WEIGHTS, outs[i]))
        model = PeftModel.from_pretrained(plain_base(), outs[-1]).eval()
        rows.append(row("engine_concat", "linear_concat(adapters, w, out)", times, peak, model))
    elif method in ("peft_svd", "peft_cat"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(plain_base(), adapters[0], adapter_name="a0")
        for k in range(1, K):
            model.load_adapter(adapters[k], adapter_name=f"a{k}")
        names = [f"a{k}" for k in range(K)]
        kind = method.split("_")[1]
        # peft's default svd_full_matrices=True makes the CPU SVD ~30x slower here; the
        # thin SVD gives the same rank-r result, so it is the (faster) baseline by default.
        extra = {"svd_full_matrices": meta["svd_full"]} if kind == "svd" else {}
        times, peak = timed(
            lambda i: model.add_weighted_adapter(
                names, WEIGHTS, "merged", combination_type=kind, **extra
            ),
            between=lambda: model.delete_adapter("merged"),
        )
        model.set_adapter("merged")
        model.eval()
        call = f'add_weighted_adapter(.., "{kind}")'
        if kind == "svd":
            call = f'add_weighted_adapter(.., "svd", full={meta["svd_full"]})'
        rows.append(row(method, call, times, peak, model))
    elif method == "dense":  # mergekit-style: each sub-model materialised, then averaged
        model = plain_base()
        names = _layer_names(model.config.num_hidden_layers)
        w0 = {n: _module(model, n).weight.detach().clone() for n in names}
        factors = []
        for d, (alpha, rslora) in zip(adapters, ADAPTERS, strict=True):
            t = load_file(Path(d) / "adapter_model.safetensors", device=str(dev))
            s = alpha / math.sqrt(R) if rslora else alpha / R
            factors.append(
                {
                    n: (
                        t[f"base_model.model.{n}.lora_A.weight"],
                        t[f"base_model.model.{n}.lora_B.weight"],
                        s,
                    )
                    for n in names
                }
            )

        def dense(i):
            for n in names:
                acc = torch.zeros_like(w0[n])
                for f, w in zip(factors, WEIGHTS, strict=True):
                    a, b, s = f[n]
                    acc += w * (w0[n] + s * (b @ a))
                _module(model, n).weight.copy_(acc)

        times, peak = timed(dense)
        rows.append(row("dense", "sum_k w_k (W0 + s_k B_k A_k)", times, peak, model))
    else:
        raise SystemExit(f"unknown method {method}")
    return rows


# ---- (b) the run and its table --------------------------------------------------------


def merge_table(shape: str, methods: list[str], repeats: int, svd_full: bool = False) -> int:
    """Run part (b); print its table; return the number of failed checks."""
    import torch

    gpu = torch.cuda.is_available()
    sh = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        meta = build(work, shape)
        meta["repeats"], meta["svd_full"] = repeats, svd_full
        (work / "meta.json").write_text(json.dumps(meta))
        print(
            f"(b) merging {K} rank-{R} adapters (s_k = 1, 2, 4 rslora, 0.5; w = {WEIGHTS}) on "
            f"{'/'.join(TARGETS)} of a random Llama '{shape}' shape (hidden "
            f"{sh['hidden_size']}, {sh['num_hidden_layers']} layers, {meta['n_layers']} "
            f"adapted modules), {'GPU' if gpu else 'CPU'}, median of {repeats}, each method "
            f"in its own process (setup and reference {time.perf_counter() - t0:.1f} s)."
        )
        print(
            f"    reference by hand from the files: max |delta W| {meta['delta_max']:.2e}, "
            f"max |logits(merged) - logits(base)| {meta['logit_effect']:.2e}; an exact method "
            f"must be within {EXACT_TOL:g} of these."
        )
        rows = []
        for method in methods:
            r = subprocess.run(
                [sys.executable, "-m", "bench.merge", "--worker", method, str(work)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                print(f"  {method}: failed: {r.stderr[-1500:]}")
                rows.append({"method": method, "failed": True})
                continue
            rows.extend(json.loads(r.stdout.strip().splitlines()[-1]))
    tol_w, tol_l = EXACT_TOL * meta["delta_max"], EXACT_TOL * meta["logit_effect"]
    ok_rows = [v for v in rows if not v.get("failed")]
    for v in ok_rows:
        v["ms"] = 1000 * statistics.median(v["times"])
    concat = next((v["ms"] for v in ok_rows if v["method"] == "engine_concat"), None)
    print(
        f"  {'method':<14} {'timed call':<43} {'median ms':>11} {'min..max ms':>19} "
        f"{'/concat':>9} {'peak +MB':>9} {'max|W err|':>11} {'max|logit err|':>15}  check"
    )
    failures = sum(1 for v in rows if v.get("failed"))
    for v in ok_rows:
        bad = v["err_w"] > tol_w or v["err_logits"] > tol_l
        if v["control"]:
            verdict = "caught (must fail)" if bad else "MISSED"
            failures += not bad
        elif v["method"] == "peft_svd":
            verdict = "lossy (rank-16 truncation)" if bad else "ok"
        else:
            verdict = "FAIL" if bad else "ok"
            failures += bad
        spread = f"{1000 * min(v['times']):.2f}..{1000 * max(v['times']):.2f}"
        ratio = f"{v['ms'] / concat:.2g}" if concat else "-"
        print(
            f"  {v['method']:<14} {v['call']:<43} {v['ms']:>11.2f} {spread:>19} {ratio:>9} "
            f"{v['peak_extra_mb']:>9.0f} {v['err_w']:>11.2e} {v['err_logits']:>15.2e}  {verdict}"
        )
    ms = {v["method"]: v["ms"] for v in ok_rows if not v["control"]}
    if "engine_concat" in ms:
        for other in ("peft_svd", "peft_cat", "dense"):
            if other in ms:
                print(
                    f"  exact merged adapter (linear_concat) vs {other}: "
                    f"{ms[other] / ms['engine_concat']:.1f}x faster"
                )
    if "engine_live" in ms:
        for other in ("engine_concat", "peft_cat"):
            if other in ms:
                print(
                    f"  live update (Merger.apply linear) vs {other}: "
                    f"{ms[other] / max(ms['engine_live'], 1e-9):.0f}x faster"
                )
    print(f"  checks: {'all passed' if not failures else f'{failures} FAILED'}")
    return failures


def print_blocks(res: dict, args) -> None:
    print(
        f"(c) weights by block (K={K}, B=3): live score, average + quick score "
        f"({args.limit} items x 3 lab tasks), {args.trials} random weights each, interleaved:"
    )
    for name, v in res["live"].items():
        print(f"  {name:<26} p50 {v['p50_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms")
    one, table = (v["p95_ms"] for v in res["live"].values())
    print(f"  p95 ratio (table / one number): {table / one:.2f}")
    r = res["learn"]
    print(
        f"  learned weights: {r['steps']} steps ({r['evaluations']} evaluations) on "
        f"{r['rows']} validation rows in {r['seconds']:.1f} s; held-out loss uniform "
        f"{r['uniform']:.4f}, learned {r['learned']:.4f}, CMA-ES at {r['evaluations']} "
        f"evaluations {r['search']:.4f} ({r['search_seconds']:.1f} s)"
    )
    table_text = ";".join(
        ",".join(f"{row[b]:.3f}" for row in r["weights"]) for b in range(len(r["weights"][0]))
    )
    print(f"  learned weights (blocks bottom first): {table_text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", default=None)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--limit", type=int, default=40, help="items per task in the live score")
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per method (>= 3)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--blocks-only", action="store_true", help="run part (c) only")
    ap.add_argument("--steps", type=int, default=30, help="(c): the learned weights' steps")
    ap.add_argument(
        "--svd-full",
        action="store_true",
        help="peft svd with its default svd_full_matrices=True (slower on a CPU)",
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of part (b)"
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.repeats < 3:
        ap.error("--repeats: at least 3")

    from dtm.lab import default_lab_dir

    if not args.skip_latency:
        lab = Path(args.lab) if args.lab else default_lab_dir()
        if not (lab / "lab.json").exists():
            if args.lab:
                sys.exit(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
            print(f"(a) skipped: no lab at {lab} (`python -m dtm lab build --out {lab}`).")
        else:
            tmp = tempfile.TemporaryDirectory()
            adapters = lab_adapters(lab, Path(tmp.name))
            if args.blocks_only:
                print_blocks(by_block(lab, adapters, args.trials, args.limit, args.steps), args)
                return
            lat = latency(lab, args.trials, args.limit, adapters)
            print(
                f"(a) slider -> merged model -> quick score ({args.limit} items x 3 lab tasks; "
                f"the user task: {args.limit} items of user_knowledge), K={K}, "
                f"{args.trials} random weights:"
            )
            for method, v in lat.items():
                print(f"  {method:<20} p50 {v['p50_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms")
            print_blocks(by_block(lab, adapters, args.trials, args.limit, args.steps), args)
    failures = merge_table(args.shape, args.methods.split(","), args.repeats, args.svd_full)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
