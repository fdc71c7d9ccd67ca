"""Book-keeping DP-SGD: per-patient clipping and Gaussian noise with one backward pass.

`attach_taps` routes every trainable `nn.Linear`, `nn.Embedding` and `nn.LayerNorm` of a
model through the recording layers of `bk_layers`; `BookKeepingOptimizer` then turns
each physical batch's records into per-sample norms, clip factors and the clipped sum
(`accumulate`), and at the logical step adds Gaussian noise of std `noise_multiplier x
max_grad_norm` and divides by the expected batch size, exactly as Opacus's `DPOptimizer`
does (same clip formula `min(1, C / (norm + 1e-6))`, same noise draws from the same
generator, parameter by parameter in the optimiser's order). The data loader is
Opacus's Poisson `DPDataLoader`, so the privacy semantics are Opacus's.

A model holding a trainable parameter in any other kind of layer is refused: book-keeping
would not see that parameter's per-sample gradient, and its clipping would be wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from medfed.privacy.bk_layers import (
    AffineTap,
    EmbeddingTap,
    GhostCache,
    LinearTap,
    Tap,
    embedding_forward,
    layer_norm_forward,
    linear_forward,
)
from medfed.privacy.errors import DpConfigError

CLIP_EPSILON = 1e-6
"""Opacus's: clip factor = min(1, C / (norm + 1e-6))."""


def _tap_for(name: str, module: nn.Module) -> Tap | None:
    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    if not trainable:
        return None
    tap: Tap
    if isinstance(module, nn.Linear):
        tap = LinearTap(module, name)
        module.forward = partial(linear_forward, module, tap)  # type: ignore[method-assign]
    elif isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.sparse:
            raise DpConfigError(f"book-keeping: embedding {name!r} uses max_norm or sparse")
        tap = EmbeddingTap(module, name)
        module.forward = partial(embedding_forward, module, tap)  # type: ignore[method-assign]
    elif isinstance(module, nn.LayerNorm):
        tap = AffineTap(module, name)
        module.forward = partial(layer_norm_forward, module, tap)  # type: ignore[method-assign]
    else:
        raise DpConfigError(
            f"book-keeping cannot clip layer {name!r} ({type(module).__name__}): it supports"
            " nn.Linear, nn.Embedding and nn.LayerNorm; freeze it or choose an Opacus mode"
        )
    return tap


def attach_taps(model: nn.Module) -> tuple[Tap, ...]:
    """Route each trainable supported layer of `model` through its recording forward.

    Checks every layer before changing any: a refused model is left as it was.
    """
    modules = [(name, m) for name, m in model.named_modules() if list(m.parameters(False))]
    supported = (nn.Linear, nn.Embedding, nn.LayerNorm)
    for name, module in modules:
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if trainable and not isinstance(module, supported):
            _tap_for(name, module)  # raises, naming the layer
    taps = [_tap_for(name, module) for name, module in modules]
    return tuple(tap for tap in taps if tap is not None)


def detach_taps(taps: tuple[Tap, ...]) -> None:
    """Give each tapped layer its own forward back."""
    for tap in taps:
        tap.clear()
        tap.module.__dict__.pop("forward", None)


class BookKeepingOptimizer(torch.optim.Optimizer):
    """A torch optimiser that steps on book-keeping's clipped, noised, averaged gradient.

    Use: `zero_grad()`; per physical batch, forward and the backward of the mean (or,
    with `loss_reduction="sum"`, the sum) of its per-sample losses, then `accumulate()`
    (not needed after the last one); `step()` adds the noise once and steps. As in
    Opacus, a mean's output gradients are multiplied back by the physical batch's size.
    An empty logical batch steps on noise alone.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        taps: tuple[Tap, ...],
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None,
        loss_reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        # Like Opacus's DPOptimizer: a wrapper sharing the wrapped optimiser's state.
        self.original_optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self.taps = taps
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = max(1, expected_batch_size)
        self.generator = generator
        self.loss_reduction = loss_reduction
        self._summed: dict[nn.Parameter, torch.Tensor] = {}
        self.samples_accumulated = 0
        self.last_norms: torch.Tensor | None = None
        """The per-sample gradient norms of the last physical batch (for tests, stats)."""

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in the wrapped optimiser's order (the noise's order)."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _recorded(self) -> Iterator[Tap]:
        return (tap for tap in self.taps if tap.pending())

    def per_sample_norms(self) -> torch.Tensor | None:
        """Each sample's whole-gradient norm (fp32) of the gradient recorded, or None.

        Under `loss_reduction="mean"` these are 1 / B of the per-sample norms."""
        cache: GhostCache = {}
        total: torch.Tensor | None = None
        for tap in self._recorded():
            squared = tap.norms_sq(cache)
            if total is not None and squared.shape != total.shape:
                raise RuntimeError(
                    f"book-keeping: layer {tap.name!r} saw {squared.shape[0]} samples, the"
                    f" others {total.shape[0]}: inputs must be batch-first"
                )
            total = squared if total is None else total + squared
        return None if total is None else total.sqrt()

    def accumulate(self) -> None:
        """Clip the physical batch just backpropagated and add it to the logical sum."""
        recorded = self.per_sample_norms()
        if recorded is None:
            return
        scale = recorded.shape[0] if self.loss_reduction == "mean" else 1
        norms = recorded * scale
        factors = (self.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        for tap in self._recorded():
            tap.add_clipped(factors * scale, self._summed)
            tap.clear()
        self.samples_accumulated += int(norms.shape[0])
        self.last_norms = norms.detach()

    def clipped_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """The clipped per-sample gradients summed so far (fp32), per trainable parameter:
        what the noise is added to at the step."""
        return {
            p: self._summed.get(p, torch.zeros(p.shape, device=p.device, dtype=torch.float32))
            for p in self.params
        }

    def _noised_grads(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = self._summed.get(p)
            if summed is None:
                summed = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            noise = torch.normal(
                mean=0, std=std, size=p.shape, device=p.device, generator=self.generator
            )
            p.grad = ((summed + noise) / self.expected_batch_size).to(p.dtype)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.accumulate()
        self._noised_grads()
        self._summed.clear()
        self.samples_accumulated = 0
        result: float | None = self.original_optimizer.step()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)
        for tap in self.taps:
            tap.clear()
        self._summed.clear()
        self.samples_accumulated = 0

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)
        self.param_groups = self.original_optimizer.param_groups
        self.state = self.original_optimizer.state

    def __repr__(self) -> str:
        return f"BookKeepingOptimizer({self.original_optimizer!r})"
