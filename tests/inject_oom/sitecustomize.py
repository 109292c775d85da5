"""A GPU that runs out of memory, for a ``dtm train`` subprocess (tests/test_order.py puts
this folder on its PYTHONPATH; Python imports ``sitecustomize`` at start-up).

A forward with gradients over more than ``DTM_TEST_OOM_ROWS`` rows raises the error
CUDA raises (``torch.OutOfMemoryError``, "CUDA out of memory."), once the process has
run ``DTM_TEST_OOM_AFTER`` such forwards (0 by default). Forwards without gradients (the
evaluations) are never refused."""

import os

import torch
import torch.nn.functional as F

_ROWS = int(os.environ["DTM_TEST_OOM_ROWS"])
_AFTER = int(os.environ.get("DTM_TEST_OOM_AFTER", "0"))
_embedding = F.embedding
_seen = [0]


def embedding(input, *args, **kw):
    if torch.is_grad_enabled() and input.dim() == 2:
        _seen[0] += 1
        if _seen[0] > _AFTER and input.shape[0] > _ROWS:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (a test: {input.shape[0]} "
                f"rows in one forward, the limit is {_ROWS})."
            )
    return _embedding(input, *args, **kw)


F.embedding = embedding
