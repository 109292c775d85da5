"""Merge benchmarks, side by side in one run.

(a) Slider-to-score latency on the lab model: K=4 sub-models of the lab (trained here for
    a few steps), then for random weight vectors: merge (this engine) + quick score of the
    lab's knowledge, reasoning and instruction subsets; p50 and p95.
(b) Merging 4 rank-16 LoRA adapters (random) on gate/up/down_proj of a large Llama shape:
    Llama-2-7b's on a GPU, else a ~1.1B shape (TinyLlama's) on the CPU. Each method runs in
    its own process (its own peak RSS): this engine's live update (K scales per layer) and
    its exact merged adapter (concatenated factors), peft ``add_weighted_adapter`` with
    ``svd`` and ``cat``, and a dense full-model merge (materialise each sub-model, average).
    Error: max |delta - reference| over the layers, reference = sum_k w_k s_k B_k A_k.

    .venv/bin/python bench/merge.py [--lab DIR] [--trials 40] [--shape 1b|7b]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes import LLAMA2_7B, TINYLLAMA_1B  # noqa: E402 (bench/ is the script's folder)

SHAPES = {"1b": TINYLLAMA_1B, "7b": LLAMA2_7B}
TARGETS = ["gate_proj", "up_proj", "down_proj"]
K, R = 4, 16
WEIGHTS = [0.1, 0.2, 0.3, 0.4]


def latency(lab: Path, trials: int, limit: int) -> dict:
    import numpy as np

    from dtm.lab.measure import LAB_SFT
    from dtm.merge.engine import Merger
    from dtm.merge.landscape import quick_score
    from dtm.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        ids = [json.loads(x)["id"] for x in (lab / "data" / "train.jsonl").read_text().splitlines()]
        asg = Path(tmp) / "asg.csv"
        asg.write_text("id,cluster\n" + "".join(f"{i},{n % K}\n" for n, i in enumerate(ids)))
        adapters = []
        for c in range(K):
            out = Path(tmp) / f"s{c}"
            train(
                TrainConfig(
                    base=str(lab / "model"),
                    data=str(lab / "data" / "train.jsonl"),
                    val_data=str(lab / "data" / "val.jsonl"),
                    out=str(out),
                    kind="sub",
                    assignments=str(asg),
                    cluster=c,
                    steps=40,
                    log_every=40,
                    fisher_size=8,
                    **LAB_SFT,
                )
            )
            adapters.append(out / "adapter")
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
            times.sort()
            out[method] = {
                "p50_ms": 1000 * statistics.median(times),
                "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
            }
        return out


def _model(shape: str, device: str):
    """A Llama of the shape with uninitialised (then zeroed) weights and K random adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    cfg = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, cfg, adapter_name="a0")
    for k in range(1, K):
        model.add_adapter(f"a{k}", cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "a0" in m.lora_A}


def _reference(m):
    """sum_k w_k s_k B_k A_k with s_k = alpha / r = 1 (read before any method changes it)."""
    return sum(
        w * (m.lora_B[f"a{k}"].weight @ m.lora_A[f"a{k}"].weight) for k, w in enumerate(WEIGHTS)
    )


def worker(method: str, shape: str) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(shape, dev)
    layers = _layers(model)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deltas = {}
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "engine_live":  # what a slider move does: K scales per layer
            for m in layers.values():
                for k, w in enumerate(WEIGHTS):
                    m.scaling[f"a{k}"] = w * (R / R)
        elif method == "engine_concat":  # the exact merged adapter, rank K*R
            for n, m in layers.items():
                a = torch.cat([m.lora_A[f"a{k}"].weight for k in range(K)], 0)
                b = torch.cat(
                    [
                        w * m.scaling[f"a{k}"] * m.lora_B[f"a{k}"].weight
                        for k, w in enumerate(WEIGHTS)
                    ],
                    1,
                )
                deltas[n] = (a, b)
        elif method in ("peft_svd", "peft_cat"):
            model.add_weighted_adapter(
                [f"a{k}" for k in range(K)],
                WEIGHTS,
                "merged",
                combination_type=method.split("_")[1],
            )
        elif method == "dense":  # mergekit-style: each sub-model materialised, averaged
            for n, m in layers.items():
                w0 = m.base_layer.weight
                acc = torch.zeros_like(w0)
                for k, w in enumerate(WEIGHTS):
                    full = w0 + m.scaling[f"a{k}"] * (
                        m.lora_B[f"a{k}"].weight @ m.lora_A[f"a{k}"].weight
                    )
                    acc += w * full
                deltas[n] = acc - w0
    sync()
    secs = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    err = 0.0
    with torch.no_grad():
        for n, m in list(layers.items())[:: max(1, len(layers) // 12)]:  # a sample of layers
            ref = _reference(m)
            if method == "engine_live":
                got = sum(
                    m.scaling[f"a{k}"] * (m.lora_B[f"a{k}"].weight @ m.lora_A[f"a{k}"].weight)
                    for k in range(K)
                )
            elif method == "engine_concat":
                got = deltas[n][1] @ deltas[n][0]
            elif method.startswith("peft"):
                got = m.scaling["merged"] * (m.lora_B["merged"].weight @ m.lora_A["merged"].weight)
            else:
                got = deltas[n]
            err = max(err, float((got - ref).abs().max()))
    return {"seconds": secs, "peak_extra_mb": peak, "max_abs_err": err, "device": dev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", default=None)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--limit", type=int, default=40, help="items per task in the live score")
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument(
        "--methods",
        default="engine_live,engine_concat,peft_svd,peft_cat,dense",
        help="comma-separated subset of part (b)",
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    import torch

    from dtm.lab import default_lab_dir

    if not args.skip_latency:
        lab = Path(args.lab) if args.lab else default_lab_dir()
        if not (lab / "lab.json").exists():
            sys.exit(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
        lat = latency(lab, args.trials, args.limit)
        print(
            f"(a) slider -> merged model -> quick score ({args.limit} items x 3 tasks), "
            f"K={K}, {args.trials} random weights:"
        )
        for method, v in lat.items():
            print(f"  {method:<8} p50 {v['p50_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms")
    shape = args.shape or ("7b" if torch.cuda.is_available() else "1b")
    print(
        f"(b) merging {K} rank-{R} adapters on a Llama {shape} shape "
        f"({'GPU' if torch.cuda.is_available() else 'CPU'}), each in its own process:"
    )
    rows = {}
    for method in args.methods.split(","):
        r = subprocess.run(
            [sys.executable, __file__, "--worker", method, shape], capture_output=True, text=True
        )
        if r.returncode != 0:
            print(f"  {method}: failed: {r.stderr[-500:]}")
            continue
        rows[method] = json.loads(r.stdout.strip().splitlines()[-1])
        v = rows[method]
        print(
            f"  {method:<14} {v['seconds'] * 1000:>10.1f} ms  peak +{v['peak_extra_mb']:>8.0f} MB"
            f"  max |err| {v['max_abs_err']:.2e}"
        )
    if "peft_svd" in rows and "engine_concat" in rows:
        print(
            f"  exact merged adapter vs peft svd: "
            f"{rows['peft_svd']['seconds'] / rows['engine_concat']['seconds']:.0f}x faster; "
            f"live update vs peft svd: "
            f"{rows['peft_svd']['seconds'] / max(rows['engine_live']['seconds'], 1e-9):.0f}x"
        )


if __name__ == "__main__":
    main()
