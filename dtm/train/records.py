"""The records of a run (``metrics.jsonl``): what ``MetricsLogger`` measures at each
eval, for a run on the Trainer (``dtm.train.loop``) and a group's member
(``dtm.train.member``)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from dtm import threads
from dtm.store import publish_dir
from dtm.train.setup import Run


def _mem_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def save_adapter(model, folder: Path) -> None:
    """The trained adapter: peft's folder, or a LoRAMoE's own (``dtm.moe``)."""
    from dtm import moe  # lazy: torch

    if moe.is_loramoe(model):
        moe.save_adapter(model, folder)
    else:
        model.save_pretrained(folder)


def _save_early(model, folder: Path, step: int) -> None:
    save_adapter(model, folder)
    (folder / "early.json").write_text(json.dumps({"step": step}) + "\n")


def _ratio(ref: dict, rec: dict) -> float | None:
    """ΔL_probe / ΔL_val from ``ref`` to ``rec``; None when the val loss did not move."""
    d_val = ref["val_loss"] - rec["val_loss"]
    d_train = ref["probe_loss"] - rec["probe_loss"]
    return d_train / d_val if abs(d_val) > 1e-9 else None


class MetricsLogger:
    """The records of one run. Each eval measures the train probe and the validation split
    at the same weights (as nanoGPT's ``estimate_loss`` does both splits), and ``record``
    adds the loss ratios since the first and the previous record, tokens/s over the
    training time since the previous record, peak memory, the eval hook's scores and the
    early checkpoint, then appends the record to ``metrics.jsonl`` and ``records``."""

    def __init__(
        self, run: Run, out: Path, steps: int, records: list[dict], eval_hook, eval_every, on_record
    ) -> None:
        self.run, self.out, self.steps, self.records = run, out, steps, records
        self.eval_hook, self.eval_every, self.on_record = eval_hook, eval_every, on_record
        self.t0 = self.began = time.perf_counter()
        # training seconds, real tokens and computed positions (pads included) since the
        # last record
        self.busy, self.tokens, self.padded = 0.0, 0, 0

    def step_begin(self) -> None:
        self.began = time.perf_counter()

    def step_end(self) -> None:
        self.busy += time.perf_counter() - self.began
        threads.rebalance()  # the share of the cores, as processes come and go

    def record(self, rec: dict) -> None:
        """``rec``: step, epoch, lr, train_loss, val_loss, probe_loss; completed in place."""
        records, step = self.records, rec["step"]
        rec["loss_ratio"] = _ratio(records[0], rec) if records else None
        rec["loss_ratio_interval"] = _ratio(records[-1], rec) if records else None
        rec["tokens_per_s"] = round(self.tokens / self.busy, 1) if self.busy else None
        rec["tokens"], rec["padded_tokens"] = self.tokens, self.padded
        rec["mem_mb"] = _mem_mb()
        rec["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.busy, self.tokens, self.padded = 0.0, 0, 0
        model = self.run.model
        if self.eval_hook is not None and (step % self.eval_every == 0 or step == self.steps):
            rec["bench"] = self.eval_hook(model, self.run.tok, step)
        early = self.out / "early"
        if 0 < step < self.steps and step >= self.steps / 10 and not early.exists():
            # The early checkpoint the token-level bias analysis compares the end with.
            publish_dir(early, lambda tmp: _save_early(model, tmp, step))
        records.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_record:
            self.on_record(rec)
