"""The merge engine: K LoRA sub-models of one base, merged in memory or exported.

In memory, the K adapters are loaded once into one peft model and all kept active. A
linear merge (``average``, ``linear``, ``task_arithmetic``) only sets each adapter's
per-layer scale to c_k * s_k: the output is W0 x + sum_k c_k s_k B_k A_k x, which is
exactly the merged model, and moving a slider changes K numbers per layer and copies no
weights. Dense and factor methods compute each layer's merged delta (the sub-models'
dense deltas are cached, as they do not depend on the weights), write W0 + delta into
the base layer with the adapters switched off, and restore W0 before the next linear
merge.

Export: ``export(out)`` writes one peft adapter folder (linear: the concatenated factors,
exact, rank sum(r_k); factor methods: rank r; dense methods: the exact SVD of each delta
at full rank, min(out, in), which differs between layers of different shapes and is
written as a per-layer ``rank_pattern``/``alpha_pattern`` with scale 1) or, with
``full=True``, the merged weights as a ``transformers`` model folder (safetensors),
plus ``recipe.json`` (method, weights, parameters and the source adapters' hashes).

Weights by block (``dtm.merge.blocks``): ``weights`` may be K numbers (the same in every
layer) or a K x B table, one column per block of layers from the bottom up. A linear
method maps each block's column to coefficients and sets each layer's scales to its
block's (still exact, still K numbers per layer); a dense or factor method merges each
layer with its block's weights; the linear export scales each layer's concatenated
factors by its block's coefficients, so it stays exact.

The adapters may have different ranks, lora_alpha and rslora: linear and dense methods
merge the exact deltas s_k B_k A_k. Factor methods combine A and B entry by entry and need
one rank; ``check_method`` refuses them otherwise.

Length: one class holds the in-memory merge and the export of every method kind, which
share its loaded layers, caches and per-layer (per-block) weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from dtm.errors import ConfigError
from dtm.merge.blocks import (
    block_of,
    check_blocks,
    column,
    compact,
    is_table,
    layer_index,
    n_blocks,
)
from dtm.merge.lora import (
    WEIGHTS,
    check_compatible,
    check_fits_base,
    linear_concat,
    rank_config,
    read_adapter,
)
from dtm.merge.methods import METHODS, check_merge_weights
from dtm.models import load_base, load_tokenizer
from dtm.store import file_digest, publish_dir, write_json_atomic


def check_method(method: str, sets) -> None:
    """ConfigError unless ``method`` can merge the adapters ``sets`` (``AdapterSet``s):
    a factor method needs the same rank in every adapter, layer by layer."""
    m = METHODS.get(method)
    if m is None:
        raise ConfigError(f"merge method {method!r}: choose one of {', '.join(METHODS)}.")
    if m.kind != "factor":
        return
    per_adapter = [s.ranks() for s in sets]
    if all(r == per_adapter[0] for r in per_adapter[1:]):
        return
    found = sorted({r for ranks in per_adapter for r in ranks.values()})
    each = ", ".join(
        f"{s.path.name}: r={'/'.join(map(str, sorted(set(r.values()))))}"
        for s, r in zip(sets, per_adapter, strict=True)
    )
    others = ", ".join(n for n, x in METHODS.items() if x.kind != "factor")
    raise ConfigError(
        f"{method} combines the LoRA factors A and B themselves, which needs one rank in all "
        f"adapters, but these have ranks {', '.join(map(str, found))} ({each}). Use "
        f"{others} instead (average, ties or dare merge the exact deltas of any rank)."
    )


class Merger:
    """``Merger(base, adapters)``; ``apply(method, weights, **params)`` -> the merged model
    (in place); ``export(out, method, weights, full=False, **params)``."""

    def __init__(
        self,
        base: str,
        adapters: list[str | Path],
        *,
        trust_remote_code=False,
        allow_pickle: bool = False,
        method: str | None = None,
    ):
        """``method``, when given, is checked against the adapters (``check_method``)
        before the base model loads; ``apply`` and ``export`` check theirs in any case."""
        import torch
        from peft import PeftModel

        if len(adapters) < 1:
            raise ConfigError("give at least one adapter to merge.")
        self.base = base
        self.sets = [read_adapter(a) for a in adapters]
        check_compatible(self.sets)
        if method is not None:
            check_method(method, self.sets)
        # A merge needs no tokenizer: it is loaded only when a caller asks for it.
        self._trust = trust_remote_code
        self._tokenizer = None
        model, _ = load_base(
            base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, tokenizer=False
        )
        check_fits_base(self.sets[0], model, base)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(self.device)
        self.names = [f"sub{k}" for k in range(len(self.sets))]
        self.model = PeftModel.from_pretrained(model, self.sets[0].path, adapter_name="sub0")
        for name, s in zip(self.names[1:], self.sets[1:], strict=True):
            self.model.load_adapter(s.path, adapter_name=name)
        self.model.base_model.set_adapter(self.names)
        self.model.eval()
        self.layers = {}  # adapter layer prefix -> the peft LoraLayer module
        for mod_name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and "sub0" in getattr(mod, "lora_A", {}):
                self.layers[mod_name] = mod
        self.base_scaling = {n: dict(m.scaling) for n, m in self.layers.items()}
        found = [i for i in map(layer_index, self.layers) if i is not None]
        self.n_layers = int(
            getattr(model.config, "num_hidden_layers", None) or (max(found) + 1 if found else 1)
        )
        self.w0 = {n: m.base_layer.weight.detach().clone() for n, m in self.layers.items()}
        self._dense_cache: dict[str, list] = {}
        # Cache the K dense deltas of every layer only when they fit the budget; a 7B
        # model's would not, and is then recomputed layer by layer and freed.
        numel = sum(m.base_layer.weight.numel() for m in self.layers.values())
        budget = float(os.environ.get("DTM_MERGE_CACHE_MB", "2048")) * 2**20
        self._cache_dense = numel * 4 * len(self.sets) <= budget
        self._written = False  # whether base weights currently hold a merged delta

    @property
    def tokenizer(self):
        """The base model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base, trust_remote_code=self._trust)
        return self._tokenizer

    def _key(self, mod_name: str) -> str:
        """The adapter-file prefix of a module name."""
        return (
            mod_name if mod_name.startswith("base_model.model.") else f"base_model.model.{mod_name}"
        )

    def blocks_of_layers(self, blocks: int) -> dict[str, int]:
        """Each adapted module's block (0 = bottom) when the layers are split in
        ``blocks`` (``dtm.merge.blocks``)."""
        check_blocks(blocks, self.n_layers)
        return {n: block_of(layer_index(n), self.n_layers, blocks) for n in self.layers}

    def layer_weights(self, weights) -> dict[str, list[float]]:
        """Each adapted module's K weights: its block's column of a K x B table (or the
        K weights themselves in every layer)."""
        if not is_table(weights):
            w = [float(x) for x in weights]
            return {n: w for n in self.layers}
        which = self.blocks_of_layers(n_blocks(weights))
        cols = [column(weights, b) for b in range(n_blocks(weights))]
        return {n: cols[b] for n, b in which.items()}

    def linear_coefs(self, method: str, weights, params: dict) -> dict[str, list[float]]:
        """A linear method's K coefficients of every adapted module (per block)."""
        fn = METHODS[method].fn
        if not is_table(weights):
            c = fn(list(weights), params)
            return {n: c for n in self.layers}
        which = self.blocks_of_layers(n_blocks(weights))
        per_block = [fn(column(weights, b), params) for b in range(n_blocks(weights))]
        return {n: per_block[b] for n, b in which.items()}

    def _set_scales(self, coefs) -> None:
        """Each adapter's scale in every layer: ``coefs`` is None (all off), K numbers
        (the same in every layer) or ``{module: K numbers}`` (``linear_coefs``); a number
        may be a 0-d tensor (the learned finder's, to carry a gradient)."""
        for n, m in self.layers.items():
            c = coefs.get(n) if isinstance(coefs, dict) else coefs
            for k, name in enumerate(self.names):
                m.scaling[name] = 0.0 if c is None else c[k] * self.base_scaling[n][name]

    def _restore_base(self) -> None:
        if self._written:
            for n, m in self.layers.items():
                m.base_layer.weight.data.copy_(self.w0[n])
            self._written = False

    def dense_deltas(self, mod_name: str) -> list:
        """The K sub-models' dense deltas s_k B_k A_k of one layer (cached)."""
        hit = self._dense_cache.get(mod_name)
        if hit is None:
            key = self._key(mod_name)
            dev = self.device
            hit = [
                s.layers[key][2]
                * (s.layers[key][1].to(dev).float() @ s.layers[key][0].to(dev).float())
                for s in self.sets
            ]
            if self._cache_dense:
                self._dense_cache[mod_name] = hit
        return hit

    def layer_deltas(self, method: str, weights, params: dict):
        """Yield (module name, merged dense delta (out x in)) one layer at a time, for a
        dense or factor method, so only one layer's delta is alive at once (each layer
        merged with its block's weights)."""
        m = METHODS[method]
        per_layer = self.layer_weights(weights)
        for i, n in enumerate(self.layers):
            if m.kind == "dense":
                seed = int(params.get("seed", 0)) * 100003 + i
                yield n, m.fn(self.dense_deltas(n), per_layer[n], params, seed)
            else:
                a, b = self.merged_factors(method, per_layer[n], params, n)
                yield n, b @ a

    def merged_factors(self, method: str, weights, params, mod_name: str):
        """One layer's merged (A, B) by a factor method; ``weights``: K numbers, or a
        table (this layer's block's column is used)."""
        if is_table(weights):
            weights = self.layer_weights(weights)[mod_name]
        key = self._key(mod_name)
        dev = self.device
        factors = [
            (s.layers[key][0].to(dev).float(), s.layers[key][2] * s.layers[key][1].to(dev).float())
            for s in self.sets
        ]
        fishers = self._fishers(key) if method == "fisher" else None
        return METHODS[method].fn(factors, weights, params, fishers)

    def _fishers(self, key: str):
        from safetensors.torch import load_file

        if not hasattr(self, "_fisher_files"):
            self._fisher_files = []
            for s in self.sets:
                f = s.path / "fisher.safetensors"
                if not f.exists():
                    raise ConfigError(
                        f"{s.path}: no fisher.safetensors; the fisher merge needs the Fisher "
                        "that `dtm train --kind sub` saves (or choose another method)."
                    )
                self._fisher_files.append(load_file(f))
        out = []
        for s, f in zip(self.sets, self._fisher_files, strict=True):
            scale = s.layers[key][2]
            # the Fisher of s*B is the Fisher of B over s^2
            out.append(
                (
                    f[f"{key}.lora_A.weight"].to(self.device).float(),
                    f[f"{key}.lora_B.weight"].to(self.device).float() / scale**2,
                )
            )
        return out

    def check_weights(self, weights) -> list:
        """``weights`` checked (K numbers or a K x B table, ``check_merge_weights``) with
        at most as many blocks as the model has layers."""
        weights = check_merge_weights(list(weights), len(self.sets))
        if is_table(weights):
            check_blocks(n_blocks(weights), self.n_layers)
        return weights

    def apply(self, method: str, weights, **params: Any):
        """Make ``self.model`` the merged model (``weights``: K numbers or a K x B table)
        and return it."""
        import torch

        check_method(method, self.sets)
        m = METHODS[method]
        weights = self.check_weights(weights)
        if m.kind == "linear":
            coefs = self.linear_coefs(method, weights, params)
            self._restore_base()
            self._set_scales(coefs)
            return self.model
        with torch.no_grad():
            self._set_scales(None)
            self._written = True
            for n, delta in self.layer_deltas(method, weights, params):
                w = self.layers[n].base_layer.weight
                w.copy_(self.w0[n] + delta.to(self.w0[n].dtype))
                del delta
        return self.model

    @contextlib.contextmanager
    def base_only(self):
        """The base model itself (every adapter off, no merged delta written), without
        loading it again."""
        self._restore_base()
        with self.model.disable_adapter():
            yield self.model

    def recipe(self, method: str, weights, params: dict) -> dict:
        """``weights``: K numbers, or a K x B table (rows: sub-models, columns: blocks from
        the bottom layer up); a table with equal columns is written as K numbers."""
        return {
            "method": method,
            "weights": compact(weights),
            "params": params,
            "base": self.base,
            "adapters": [
                {"path": str(s.path), "sha256": file_digest(s.path / WEIGHTS)} for s in self.sets
            ],
        }

    def export(self, out: str | Path, method: str, weights, *, full: bool = False, **params):
        """Write the merged model to ``out`` (a new folder) with ``recipe.json``."""
        import torch
        from safetensors.torch import save_file

        out = Path(out)
        check_method(method, self.sets)
        m = METHODS[method]
        weights = self.check_weights(weights)
        recipe = self.recipe(method, weights, params)

        def write(tmp: Path) -> None:
            if full:
                self.apply(method, weights, **params)
                merged = self._merged_plain_model()
                merged.save_pretrained(tmp, safe_serialization=True)
                _copy_tokenizer(self.base, tmp)
            elif m.kind == "linear":
                coefs = self.linear_coefs(method, weights, params)
                by_key = {self._key(n): c for n, c in coefs.items()}
                linear_concat([s.path for s in self.sets], by_key, tmp)
            else:
                tensors, ranks = {}, {}
                with torch.no_grad():
                    if m.kind == "factor":
                        pairs = (
                            (n, self.merged_factors(method, weights, params, n))
                            for n in self.layers
                        )
                    else:  # the exact SVD of each dense delta at full rank: B = U S, A = V^T
                        pairs = (
                            (n, _svd_factors(delta))
                            for n, delta in self.layer_deltas(method, weights, params)
                        )
                    for n, (a, b) in pairs:
                        key = self._key(n)
                        tensors[f"{key}.lora_A.weight"] = a.contiguous().cpu()
                        tensors[f"{key}.lora_B.weight"] = b.contiguous().cpu()
                        ranks[key] = int(a.shape[0])
                save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
                # per-layer ranks (a k_proj of GQA has a smaller full rank than q_proj)
                cfg = rank_config(self.sets[0].config, ranks)
                (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            write_json_atomic(tmp / "recipe.json", recipe)

        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out}: not empty; choose a new folder.")
        if out.exists():
            out.rmdir()
        return publish_dir(out, write)

    def _merged_plain_model(self):
        """A plain ``transformers`` model with the current merge folded into its weights."""
        import copy

        import torch

        plain = _strip_lora(copy.deepcopy(self.model.get_base_model()))
        with torch.no_grad():
            for n, mod in self.layers.items():
                w = mod.base_layer.weight.detach().clone()
                if not self._written:  # a linear merge lives in the adapters' scales
                    for name in self.names:
                        if mod.scaling[name]:
                            w += mod.scaling[name] * (
                                mod.lora_B[name].weight @ mod.lora_A[name].weight
                            )
                plain.get_submodule(n.removeprefix("base_model.model.")).weight.copy_(w)
        return plain


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _copy_tokenizer(base: str, out: Path) -> None:
    """Copy the base folder's tokenizer files, when it has any, beside the merged weights
    (a base of weights only is merged all the same)."""
    import shutil

    src = Path(base).expanduser()
    if not src.is_dir():  # a hub id: its tokenizer is fetched only if there is one
        try:
            load_tokenizer(base).save_pretrained(out)
        except ConfigError:
            pass
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _svd_factors(delta):
    """(A, B) with B @ A == delta exactly (up to rounding): A = V^T, B = U S."""
    import torch

    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh, u * sv


def _strip_lora(model):
    """Replace peft LoRA wrappers in a deep copy by their base layers."""
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if hasattr(child, "base_layer") and hasattr(child, "lora_A"):
                setattr(mod, child_name, child.base_layer)
    return model
