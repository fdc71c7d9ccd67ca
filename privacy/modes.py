"""The grad-sample modes DP-SGD can run in (no torch here: configs name them).

All clip each patient's whole gradient to the same norm and add the same noise; they
differ only in how per-sample gradient norms are had, so in time and memory.
"""

from __future__ import annotations

from typing import Literal, get_args

GradSampleMode = Literal["bk", "hooks", "functorch", "ew", "ghost"]
"""`bk` book-keeping (`privacy/bookkeeping.py`: norms from activations and output
gradients, the clipped sum as one product, one backward pass), or Opacus 1.6's backward
hooks per layer type, functorch's vmap over every layer, torch's expanded weights, or
ghost clipping (norms without per-sample gradients, at the cost of a second backward)."""

GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = get_args(GradSampleMode)

DEFAULT_GRAD_SAMPLE_MODE: GradSampleMode = "bk"
"""Book-keeping: equal to Opacus's clipped, noised gradient on every layer of the network
(tests/unit/privacy/test_privacy_bookkeeping*.py) at a fraction of its time and memory."""
