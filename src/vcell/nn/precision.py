"""Numeric precision settings shared by training and prediction.

``"32"``: float32 throughout. ``"bf16-mixed"``: matmuls and the elementwise work around them run
in bfloat16 under ``torch.autocast`` (CPU or GPU); weights, optimiser state and losses stay
float32, and so does attention on CPU (see ``layers._attention_kernels``). ``"16-mixed"``: the
same with float16 and a gradient scaler, GPU only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from vcell.errors import VcellError

#: vcell's precision names -> Lightning's.
PRECISIONS = {"32": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def check_precision(precision: str, on_cpu: bool) -> None:
    """One-line :class:`VcellError` for an unknown precision or fp16 on CPU."""
    if precision not in PRECISIONS:
        raise VcellError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "16-mixed" and on_cpu:
        raise VcellError("--precision 16-mixed needs a GPU; on CPU use 32 or bf16-mixed")


def half_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None`` for ``"32"``)."""
    import torch  # not at module level: the CLI checks precision names without loading torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast context for inference at ``precision`` on ``device`` (a no-op for ``"32"``).

    Wrap a whole prediction loop in one context, under ``torch.no_grad()``: autocast caches its
    weight casts for the context, but not under ``torch.inference_mode()``.
    """
    import torch

    check_precision(precision, device.type == "cpu")
    dtype = half_dtype(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
