"""LoRAMoE (Dou et al. 2023, "LoRAMoE: Alleviating World Knowledge Forgetting in Large
Language Models via MoE-Style Plugin"): several LoRA experts on each adapted linear layer
with a token-level router, trained with the localized balancing constraint.

Each adapted ``nn.Linear`` W becomes ``LoRAMoELinear``:

    y = W x + (alpha / r) * sum_e g_e(x) * B_e A_e dropout(x),    g(x) = softmax(W_g x)

with E experts (A_e: r x in, B_e: out x r, B_e = 0 at the start, so the model starts as
the base) and a dense softmax router W_g (E x in) per layer, as in the paper. The
experts are split into two groups: the first ``groups`` experts for world knowledge, the
rest for the downstream tasks. The localized balancing constraint, per layer: for a batch
of M rows, Q[e, m] = sum over row m's tokens of g_e, the expert's importance for that row;
I[e, m] = 1 + delta when expert e's group is row m's type, else 1 - delta; Z = I * Q;

    L_lbc = Var(Z) / Mean(Z)

(the variance and mean over all E x M entries). The training loss adds ``balance`` times
the mean of L_lbc over the adapted layers. A row's type is knowledge or task
(``moe_type`` 1 or 0 in the batch; rows without a type are task rows).

The router mixes experts per token, so the experts cannot be folded into the base
weights: a LoRAMoE adapter is scored as it is and never merged. Its folder holds
``loramoe_config.json`` and ``loramoe_model.safetensors`` (the router and expert weights
under each layer's module name); ``load_adapter(model, folder)`` puts it on a base model.

No maintained library implements LoRAMoE on current transformers/peft; this module is the
project's own, small on purpose. The peft-like surface (``save_pretrained``,
``print_trainable_parameters``, the base frozen) lets the training loop and the
evaluation treat it like a peft model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dtm.adapters import MOE_CONFIG
from dtm.errors import ConfigError

CONFIG = MOE_CONFIG
WEIGHTS = "loramoe_model.safetensors"


@dataclass
class LoRAMoEConfig:
    experts: int
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]  # the full module names adapted
    groups: int  # experts in the first (world-knowledge) group
    delta: float
    balance: float
    base_model: str = ""
    peft_type: str = "LORAMOE"


class LoRAMoELinear(nn.Module):
    """One adapted linear layer: the frozen base, E LoRA experts and the router. The last
    forward's gates (``..., E``) are kept in ``gates`` for the balancing constraint."""

    def __init__(self, base: nn.Linear, experts: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.experts, self.r, self.scaling = experts, r, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.router = nn.Linear(base.in_features, experts, bias=False, device=dev, dtype=dt)
        self.lora_A = nn.Parameter(torch.empty(experts, r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, r, device=dev, dtype=dt))
        for a in self.lora_A:  # peft's LoRA A init, per expert
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gates: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that reads a linear layer's weight sees the base
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gates = torch.softmax(self.router(x).float(), dim=-1)
        self.gates = gates
        a = torch.einsum("...i,eri->...er", self.dropout(x), self.lora_A)  # (..., E, r)
        mixed = (a * gates.to(a.dtype)[..., None]).flatten(-2)  # (..., E*r): g_e A_e x
        b = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)  # (out, E*r)
        return y + self.scaling * (mixed @ b.T)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def inject(model, config: LoRAMoEConfig):
    """``model`` (in place) with ``config.target_modules`` wrapped in ``LoRAMoELinear``,
    every base parameter frozen; a ``_LoRAMoEState`` on it collects each forward's
    attention mask and row types. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in config.target_modules:
        parent, leaf = _parent(model, name)
        layer = getattr(parent, leaf)
        if not isinstance(layer, nn.Linear):
            raise ConfigError(
                f"loramoe: {name} is a {type(layer).__name__}, not a linear layer; "
                "target linear projections (e.g. gate_proj,up_proj,down_proj)."
            )
        setattr(
            parent,
            leaf,
            LoRAMoELinear(layer, config.experts, config.r, config.alpha, config.dropout),
        )
    state = _LoRAMoEState(config)
    model.loramoe = state
    model.register_forward_pre_hook(state.capture, with_kwargs=True)
    return model


class _LoRAMoEState:
    """What the balancing constraint needs from the last forward: the attention mask and
    the rows' types (``moe_type``, taken out of the inputs before the model sees them)."""

    def __init__(self, config: LoRAMoEConfig) -> None:
        self.config = config
        self.mask: torch.Tensor | None = None
        self.types: torch.Tensor | None = None

    def capture(self, module, args, kwargs):
        self.types = kwargs.pop("moe_type", None)
        self.mask = kwargs.get("attention_mask")
        return args, kwargs


def layers(model) -> list[tuple[str, LoRAMoELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def is_loramoe(model) -> bool:
    return hasattr(model, "loramoe")


def balance_term(gates: torch.Tensor, mask, types, groups: int, delta: float) -> torch.Tensor:
    """L_lbc of one layer: ``gates`` (M, T, E), ``mask`` (M, T) or None, ``types`` (M,) of
    1 (knowledge) / 0 (task) or None (all task rows)."""
    m, _, e = gates.shape
    w = mask.to(gates.dtype) if mask is not None else gates.new_ones(gates.shape[:2])
    q = torch.einsum("mte,mt->em", gates, w)  # (E, M): each expert's importance per row
    knowledge_row = (
        types.to(torch.bool) if types is not None else torch.zeros(m, dtype=torch.bool)
    ).to(gates.device)
    knowledge_expert = torch.arange(e, device=gates.device) < groups
    same = knowledge_expert[:, None] == knowledge_row[None, :]
    z = torch.where(same, 1 + delta, 1 - delta).to(gates.dtype) * q
    return z.var(unbiased=False) / z.mean()


def balance_loss(model) -> torch.Tensor:
    """The constraint's weight times the mean L_lbc over the adapted layers, from the last
    forward (``balance`` 0: a zero tensor)."""
    state: _LoRAMoEState = model.loramoe
    cfg = state.config
    terms = [
        balance_term(layer.gates, state.mask, state.types, cfg.groups, cfg.delta)
        for _, layer in layers(model)
        if layer.gates is not None and layer.gates.dim() == 3
    ]
    if not terms or cfg.balance == 0:
        return torch.zeros((), device=next(model.parameters()).device)
    return cfg.balance * torch.stack(terms).mean()


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The router and expert weights, under each layer's module name."""
    out = {}
    for name, layer in layers(model):
        out[f"{name}.router.weight"] = layer.router.weight
        out[f"{name}.lora_A"] = layer.lora_A
        out[f"{name}.lora_B"] = layer.lora_B
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model, folder: str | Path) -> None:
    """``loramoe_config.json`` and ``loramoe_model.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(asdict(model.loramoe.config), indent=2) + "\n")


def read_config(folder: str | Path) -> LoRAMoEConfig:
    folder = Path(folder)
    try:
        values = json.loads((folder / CONFIG).read_text())
        cfg = LoRAMoEConfig(**values)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{folder / CONFIG}: not a readable LoRAMoE config ({e}).") from None
    if not (folder / WEIGHTS).exists():
        raise ConfigError(f"{folder}: a LoRAMoE config without its weights ({WEIGHTS}).")
    return cfg


def load_weights(model, folder: str | Path) -> None:
    """The router and expert weights of ``folder`` into an injected ``model``."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / WEIGHTS))
    own = dict(layers(model))
    expected = {f"{n}.{p}" for n in own for p in ("router.weight", "lora_A", "lora_B")}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise ConfigError(
            f"{folder}: its LoRAMoE weights do not fit this model (missing {missing}, "
            f"unexpected {extra})."
        )
    for name, layer in own.items():
        for param, target in (
            ("router.weight", layer.router.weight),
            ("lora_A", layer.lora_A),
            ("lora_B", layer.lora_B),
        ):
            value = weights[f"{name}.{param}"]
            if target.shape != value.shape:
                raise ConfigError(
                    f"{folder}: {name}.{param} has shape {tuple(value.shape)}, this model "
                    f"needs {tuple(target.shape)} (a LoRAMoE of another base?)."
                )
            with torch.no_grad():
                target.copy_(value.to(target.device, target.dtype))


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG).exists()


def load_adapter(model, folder: str | Path):
    """``model`` with the LoRAMoE adapter of ``folder`` put on it (in eval use)."""
    cfg = read_config(folder)
    missing = [n for n in cfg.target_modules if not _has(model, n)]
    if missing:
        raise ConfigError(
            f"{folder}: adapts {missing[0]}, which this base model does not have "
            "(a LoRAMoE of another base?)."
        )
    inject(model, cfg)
    load_weights(model, folder)
    return model


def _has(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
