"""How several LoRA adapters share one forward of a frozen base (``dtm.train.group``):
each LoRA layer adds to each member's rows its own adapter only (``Routing``, ``route``);
one member seen alone (``MemberView``); and the
group's wall-time accounting (``Timer``)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


class Timer:
    """Seconds spent per part (exclusive: a part's time leaves out the parts inside it)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.stack: list[float] = []

    @contextlib.contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        self.stack.append(0.0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total[key] = self.total.get(key, 0.0) + dt - self.stack.pop()
            if self.stack:
                self.stack[-1] += dt


class Routing:
    """Which rows of the current batch go through which adapter: ``segments`` is a list
    of ``(adapter, start, stop)`` over the batch dimension (``stop`` None: to the end);
    None leaves peft's own forward (the active adapter) in place."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int | None]] | None = None

    def only(self, name: str) -> None:
        self.segments = [(name, 0, None)]


def route(model, routing: Routing) -> None:
    """Make every LoRA layer of the peft ``model`` follow ``routing``: the base layer on
    all rows, then each segment's rows plus that adapter's delta, as peft's own
    ``Linear.forward`` computes it for one adapter."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    def routed(layer, original):
        def forward(x, *args, **kwargs):
            segs = routing.segments
            if segs is None:
                return original(x, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            parts = []
            for name, s, e in segs:
                a, b = layer.lora_A[name], layer.lora_B[name]
                xs = layer._cast_input_dtype(x[s:e], a.weight.dtype)
                delta = b(a(layer.lora_dropout[name](xs))) * layer.scaling[name]
                parts.append(result[s:e] + delta)
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)

        return forward

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = routed(module, module.forward)


class MemberView:
    """What ``records.MetricsLogger`` sees as the model of one member: the eval hook's model
    with this member's adapter on every row, and ``save_pretrained`` of its adapter."""

    def __init__(self, model, routing: Routing, name: str) -> None:
        self.model, self.routing, self.name = model, routing, name

    def save_pretrained(self, folder) -> None:
        save_adapter(self.model, self.name, Path(folder))


def save_adapter(model, name: str, folder: Path) -> None:
    """One member's adapter as the standard peft folder (``adapter_model.safetensors``,
    ``adapter_config.json``), as a separate run's ``save_pretrained`` writes it."""
    model.save_pretrained(folder, selected_adapters=[name])
    sub = folder / name  # peft writes an adapter that is not "default" into a subfolder
    for p in sub.iterdir():
        p.replace(folder / p.name)
    sub.rmdir()
