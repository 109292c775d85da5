"""Training throughput: the lab model on this CPU, and a Llama-2-7b-shaped model on a GPU.

CPU (always): LoRA SFT of the lab's base model with the lab's settings through the
project's trainer; tokens/s (median over logged intervals, the first dropped) and peak
RSS. Side by side: two jobs at once against one after another, which is why the local
queue runs one CPU job at a time by default.

GPU (only when CUDA is present; never in CI): a model of Llama-2-7b's shape with random
weights (its config, no download), LoRA r=16 on gate/up/down_proj, bf16, sequence 1024:
tokens/s, peak memory and model-FLOPs utilisation (6 * N * tokens/s over the GPU's peak
bf16 FLOP/s), plus four sub-model jobs on one GPU at once against one after another.

    .venv/bin/python bench/train.py [--lab DIR] [--steps 60] [--gpu-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes import LLAMA2_7B  # noqa: E402 (bench/ is the script's folder)


def cpu_job(lab: Path, out: Path, steps: int) -> dict:
    from dtm.lab.measure import LAB_SFT
    from dtm.train import TrainConfig, train

    cfg = TrainConfig(
        base=str(lab / "model"),
        data=str(lab / "data" / "train.jsonl"),
        val_data=str(lab / "data" / "val.jsonl"),
        out=str(out),
        steps=steps,
        log_every=10,
        save_every=10**6,
        **LAB_SFT,
    )
    t0 = time.perf_counter()
    res = train(cfg)
    rates = [m["tokens_per_s"] for m in res["metrics"][2:] if m["tokens_per_s"]]
    return {
        "tokens_per_s": statistics.median(rates),
        "peak_rss_mb": max(m["mem_mb"] for m in res["metrics"]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def cpu_parallel(lab: Path, steps: int, n: int, threads: int | None = None) -> float:
    """Wall seconds for n CPU jobs started together (separate processes), each with
    ``threads`` torch threads (default: torch's own choice, all cores)."""
    import os

    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--cpu-worker", str(lab), f"{tmp}/{i}", str(steps)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            for i in range(n)
        ]
        assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - t0


def gpu_peak_flops() -> float:
    import torch

    name = torch.cuda.get_device_name()
    for key, flops in [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12)]:
        if key in name:
            return flops
    return float("nan")


def gpu_job(steps: int, micro_batch: int = 4, seq: int = 1024) -> dict:
    """LoRA training steps on a random Llama-2-7b-shaped model; tokens/s, memory, MFU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["gate_proj", "up_proj", "down_proj"],
        ),
    )
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-4, betas=(0.9, 0.98), eps=1e-6
    )
    ids = torch.randint(0, LLAMA2_7B["vocab_size"], (micro_batch, seq), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tps = steps * micro_batch * seq / secs
    return {
        "params": n_params,
        "tokens_per_s": round(tps, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(6 * n_params * tps / gpu_peak_flops(), 4),
        "gpu": torch.cuda.get_device_name(),
    }


def gpu_parallel(steps: int, n: int) -> float:
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--gpu-worker", str(steps)]) for _ in range(n)
    ]
    assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", default=None, help="a built lab (default: the dashboard's lab)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--cpu-worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_worker:
        lab, out, steps = args.cpu_worker
        cpu_job(Path(lab), Path(out), int(steps))
        return
    if args.gpu_worker:
        print(json.dumps(gpu_job(args.gpu_worker)))
        return
    import torch

    from dtm.lab import default_lab_dir

    lab = Path(args.lab) if args.lab else default_lab_dir()
    if not (lab / "lab.json").exists():
        sys.exit(f"no lab at {lab}: build one with `python -m dtm lab build --out {lab}`")
    with tempfile.TemporaryDirectory() as tmp:
        one = cpu_job(lab, Path(tmp) / "one", args.steps)
    print(f"lab model, CPU ({torch.get_num_threads()} threads), {args.steps} steps:")
    print(f"  tokens/s (median) {one['tokens_per_s']:.0f}; peak RSS {one['peak_rss_mb']:.0f} MB;")
    print(f"  one job: {one['wall_s']} s wall including model load and evaluation")
    seq = 2 * cpu_parallel(lab, args.steps, 1)
    par = cpu_parallel(lab, args.steps, 2)
    print(f"  two jobs at once: {par:.1f} s; one after another: {seq:.1f} s ({par / seq:.2f}x)")
    half = max(1, (os.cpu_count() or 2) // 2)
    par_split = cpu_parallel(lab, args.steps, 2, threads=half)
    print(
        f"  two jobs at once with {half} thread(s) each: {par_split:.1f} s "
        f"({par_split / seq:.2f}x one after another)"
    )
    if torch.cuda.is_available():
        g = gpu_job(args.gpu_steps)
        print(f"Llama-2-7b shape, random weights, LoRA r=16, bf16, seq 1024 on {g['gpu']}:")
        print(
            f"  {g['params'] / 1e9:.2f}B params; tokens/s {g['tokens_per_s']:.0f}; peak memory "
            f"{g['peak_mem_gib']} GiB; MFU {g['mfu']:.1%}"
        )
        t1 = gpu_parallel(args.gpu_steps, 1)
        t4 = gpu_parallel(args.gpu_steps, 4)
        print(
            f"  four sub-model jobs at once: {t4:.1f} s; one after another: {4 * t1:.1f} s "
            f"({t4 / (4 * t1):.2f}x)"
        )
    else:
        print("no GPU here: the Llama-2-7b-shaped figures need one (see docs/benchmarks.md).")


if __name__ == "__main__":
    main()
