"""Training precision: fp32, or bf16 autocast (matmuls in bf16, fp32 weights and sums).

No torch at import: configs name precisions without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype autocast runs matmuls in, or None for plain fp32."""
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def precision_problem(precision: Precision, device: torch.device) -> str | None:
    """Why `precision` cannot train on `device`, or None when it can (never a fallback)."""
    import torch

    if precision == "fp32":
        return None
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pass
    except RuntimeError as exc:
        return f"bf16 autocast is not available on {device.type}: {str(exc).splitlines()[0]}"
    return None
