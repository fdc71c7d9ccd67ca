"""Book-keeping taps: per-sample gradient norms and clipped sums from one backward pass.

Book-keeping DP-SGD (Bu et al., ICML 2023) never runs a second backward pass and never
builds every layer's per-sample gradients. Each supported layer runs through an autograd
function that keeps the layer's input `a` (which autograd keeps anyway) and, in the
backward pass, records the gradient `g` of its output and returns only the gradient of
its input: the plain weight gradient is never computed. From (a, g) a tap then gives

- each sample's squared gradient norm, either as a *ghost norm*
  ||a_i^T g_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is) (cost and memory ~ T^2 per
  sample) or from the *explicit* per-sample gradient a_i^T g_i (~ p d per sample),
  chosen per layer by the BK paper's layerwise rule: ghost when 2 T^2 < p d;
- the clipped sum sum_i c_i a_i^T g_i as one matrix product (c scales g's rows).

Products run in the layer's compute dtype (bf16 under autocast, accumulated in fp32 by
the matmul); norms, clip factors and the sums they feed are held in fp32.
Only plain torch ops: any backend torch runs on (cpu, cuda, rbln) runs these.
"""

from __future__ import annotations

import abc
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

GhostCache = dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], torch.Tensor]
"""Gram matrices a a^T per recorded activation: the query, key and value projections read
the same normalised input, so its Gram matrix is computed once for the three."""

GHOST_CHUNK_ELEMENTS = 1 << 24
"""Most (sample, T, T) elements one batched Gram product makes at once (bounds memory)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's where it is on for x's device, else x's."""
    try:
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
    except RuntimeError:  # a device type autocast does not know
        pass
    return x.dtype


def ghost_preferred(tokens: int, inputs: int, outputs: int) -> bool:
    """The BK layerwise rule: a ghost norm (T^2 per sample) beats the explicit per-sample
    gradient (p x d per sample) when 2 T^2 < p d."""
    return 2 * tokens * tokens < inputs * outputs


def _sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) as (B, T, d); a 2-D (B, d) is one token per sample."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x x^T per sample (B, T, T) in fp32, in chunks of samples."""
    batch, tokens = x.shape[0], x.shape[1]
    per_chunk = max(1, GHOST_CHUNK_ELEMENTS // max(1, tokens * tokens))
    parts = [
        torch.bmm(x[start : start + per_chunk], x[start : start + per_chunk].transpose(1, 2))
        for start in range(0, batch, per_chunk)
    ]
    if not parts:
        return x.new_zeros((0, tokens, tokens), dtype=torch.float32)
    return torch.cat(parts).float()


def _cached_gram(x: torch.Tensor, cache: GhostCache, *, shared: bool) -> torch.Tensor:
    if not shared:
        return _gram(x)
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
    if key not in cache:
        cache[key] = _gram(x)
    return cache[key]


class Tap(abc.ABC):
    """What one layer recorded in the current physical batch's backward pass."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, activation: torch.Tensor, output_grad: torch.Tensor) -> None:
        if activation.shape[0] > 0:  # an empty Poisson batch has nothing to clip
            self.records.append((activation.detach(), output_grad.detach()))

    def clear(self) -> None:
        self.records.clear()

    def pending(self) -> bool:
        """Whether this layer recorded anything since it was last cleared."""
        return bool(self.records)

    @abc.abstractmethod
    def norms_sq(self, cache: GhostCache) -> torch.Tensor:
        """Each sample's squared gradient norm over this layer's parameters, (B,) fp32."""

    @abc.abstractmethod
    def add_clipped(self, factors: torch.Tensor, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add sum_i factors_i * (sample i's gradient) into `sums`, per parameter, in fp32."""


def _add(sums: dict[nn.Parameter, torch.Tensor], parameter: Any, value: torch.Tensor) -> None:
    if not isinstance(parameter, nn.Parameter) or not parameter.requires_grad:
        return
    if parameter in sums:
        sums[parameter] += value
    else:
        sums[parameter] = value.to(torch.float32).clone()


def explicit_preferred(tokens: int, inputs: int, outputs: int) -> bool:
    """Whether a Linear layer's per-sample gradients (p x d per sample) are built.

    Time never favours the ghost norm: the per-sample gradients cost the plain weight
    gradient's products and then make the clipped sum almost free, while a ghost norm
    adds T^2 (d + p) per sample on top. So the per-sample gradient is built, right in
    the backward pass (its input and output gradient are then let go), unless it would
    hold more memory than what it replaces: BK's layerwise rule (ghost when 2 T^2 < p d)
    *and* p d > T (d + p), the activation and output gradient kept until the step.
    """
    if tokens == 1:
        return False  # the ghost norm of one token is ||a||^2 ||g||^2: nothing to build
    return not ghost_preferred(tokens, inputs, outputs) or inputs * outputs <= tokens * (
        inputs + outputs
    )


class LinearTap(Tap):
    """`nn.Linear` on (B, d) or token sequences (B, ..., d)."""

    def __init__(self, module: nn.Linear, name: str) -> None:
        super().__init__(module, name)
        self.linear = module
        self._explicit: torch.Tensor | None = None
        self._explicit_bias: torch.Tensor | None = None

    def pending(self) -> bool:
        return bool(self.records) or self._explicit is not None

    def clear(self) -> None:
        super().clear()
        self._explicit = self._explicit_bias = None

    def record(self, activation: torch.Tensor, output_grad: torch.Tensor) -> None:
        if activation.shape[0] == 0:  # an empty Poisson batch has nothing to clip
            return
        a, g = _sequence(activation.detach()), _sequence(output_grad.detach())
        if explicit_preferred(a.shape[1], a.shape[2], g.shape[2]):
            self._add_explicit(a, g)
        else:
            self.records.append((a, g))

    def _add_explicit(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Add a^T g per sample (and the bias's sum of g) to the explicit gradients."""
        weight = torch.bmm(g.transpose(1, 2), a)
        bias = g.sum(1, dtype=torch.float32)
        if self._explicit is None or self._explicit_bias is None:
            self._explicit, self._explicit_bias = weight, bias
        else:
            self._explicit = self._explicit + weight
            self._explicit_bias = self._explicit_bias + bias

    def _joined(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(a, g) as (B, T, d), (B, T, p); True when `a` is a recorded tensor (cacheable)."""
        if len(self.records) == 1:
            a, g = self.records[0]
            return a, g, True
        a = torch.cat([a for a, _ in self.records], dim=1)
        g = torch.cat([g for _, g in self.records], dim=1)
        return a, g, False

    def norms_sq(self, cache: GhostCache) -> torch.Tensor:
        if self._explicit is not None and self.records:  # calls of both kinds: fold in
            for a, g in self.records:
                self._add_explicit(a, g)
            self.records.clear()
        bias_used = self.linear.bias is not None and self.linear.bias.requires_grad
        if self._explicit is not None and self._explicit_bias is not None:
            squared = self._explicit.float().pow(2).sum((1, 2))
            return squared + self._explicit_bias.pow(2).sum(1) if bias_used else squared
        a, g, shared = self._joined()
        if a.shape[1] == 1:
            squared = a[:, 0].float().pow(2).sum(1) * g[:, 0].float().pow(2).sum(1)
        else:
            squared = (_cached_gram(a, cache, shared=shared) * _gram(g)).sum((1, 2))
        if bias_used:
            squared = squared + g.sum(1, dtype=torch.float32).pow(2).sum(1)
        return squared

    def add_clipped(self, factors: torch.Tensor, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        if self._explicit is not None and self._explicit_bias is not None:
            weight = torch.einsum("b,bpd->pd", factors, self._explicit.float())
            bias = factors @ self._explicit_bias
        else:
            a, g, _ = self._joined()
            scale = factors.to(g.dtype)[:, None, None]
            # Scale the narrower of the two: fewer elements to multiply.
            scaled_a, scaled_g = (a * scale, g) if a.shape[2] <= g.shape[2] else (a, g * scale)
            weight = scaled_g.reshape(-1, g.shape[2]).t() @ scaled_a.reshape(-1, a.shape[2])
            bias = factors @ g.sum(1, dtype=torch.float32)
        if self.linear.weight.requires_grad:
            _add(sums, self.linear.weight, weight.float())
        if self.linear.bias is not None:
            _add(sums, self.linear.bias, bias)


class EmbeddingTap(Tap):
    """`nn.Embedding` of ids (B, ...): the activation is the one-hot of the ids."""

    def __init__(self, module: nn.Embedding, name: str) -> None:
        super().__init__(module, name)
        self.embedding = module
        self._explicit: torch.Tensor | None = None

    def _joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([a.reshape(a.shape[0], -1) for a, _ in self.records], dim=1)
        g = torch.cat([_sequence(g) for _, g in self.records], dim=1)
        padding = self.embedding.padding_idx
        if padding is not None:  # the padding row's gradient is always zero
            g = g.masked_fill((ids == padding).unsqueeze(-1), 0)
        return ids, g

    def norms_sq(self, cache: GhostCache) -> torch.Tensor:
        ids, g = self._joined()
        batch, tokens = ids.shape
        rows, width = self.embedding.num_embeddings, g.shape[2]
        if ghost_preferred(tokens, rows, width):
            self._explicit = None
            same = (ids.unsqueeze(2) == ids.unsqueeze(1)).float()
            return (same * _gram(g)).sum((1, 2))
        flat = (ids + rows * torch.arange(batch, device=ids.device).unsqueeze(1)).reshape(-1)
        explicit = g.new_zeros((batch * rows, width), dtype=torch.float32)
        explicit.index_add_(0, flat, g.reshape(-1, width).float())
        self._explicit = explicit.view(batch, rows, width)
        return self._explicit.pow(2).sum((1, 2))

    def add_clipped(self, factors: torch.Tensor, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        if self._explicit is not None:
            weight = torch.einsum("b,bvp->vp", factors, self._explicit)
        else:
            ids, g = self._joined()
            weight = torch.zeros_like(self.embedding.weight, dtype=torch.float32)
            scaled = (g.float() * factors[:, None, None]).reshape(-1, g.shape[2])
            weight.index_add_(0, ids.reshape(-1), scaled)
        _add(sums, self.embedding.weight, weight)
        self._explicit = None


class AffineTap(Tap):
    """`nn.LayerNorm`'s affine part, y = x_hat * weight + bias over the last dims.

    Its per-sample gradients are small (2 x d per sample): they are reduced right in the
    backward pass, so neither x_hat nor the output gradient is kept."""

    def __init__(self, module: nn.LayerNorm, name: str) -> None:
        super().__init__(module, name)
        self.norm = module
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    def pending(self) -> bool:
        return self._weight is not None

    def clear(self) -> None:
        super().clear()
        self._weight = self._bias = None

    def record(self, activation: torch.Tensor, output_grad: torch.Tensor) -> None:
        if activation.shape[0] == 0:
            return
        width = math.prod(self.norm.normalized_shape)
        x_hat = activation.detach().float().reshape(activation.shape[0], -1, width)
        g = output_grad.detach().float().reshape(output_grad.shape[0], -1, width)
        weight, bias = (x_hat * g).sum(1), g.sum(1)
        if self._weight is None or self._bias is None:
            self._weight, self._bias = weight, bias
        else:
            self._weight, self._bias = self._weight + weight, self._bias + bias

    def norms_sq(self, cache: GhostCache) -> torch.Tensor:
        assert self._weight is not None and self._bias is not None  # only when pending
        squared = torch.zeros(
            self._weight.shape[0], dtype=torch.float32, device=self._weight.device
        )
        if self.norm.weight is not None and self.norm.weight.requires_grad:
            squared = squared + self._weight.pow(2).sum(1)
        if self.norm.bias is not None and self.norm.bias.requires_grad:
            squared = squared + self._bias.pow(2).sum(1)
        return squared

    def add_clipped(self, factors: torch.Tensor, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        assert self._weight is not None and self._bias is not None  # only when pending
        if self.norm.weight is not None:
            _add(sums, self.norm.weight, (factors @ self._weight).view_as(self.norm.weight))
        if self.norm.bias is not None:
            _add(sums, self.norm.bias, (factors @ self._bias).view_as(self.norm.bias))


# The autograd functions. Parameters are inputs (so the function is in the graph) whose
# gradient is returned as None: autograd never computes or accumulates a plain gradient.


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tap: Tap
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        x_c, weight_c = x.to(dtype), weight.to(dtype)
        out = F.linear(x_c, weight_c, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight_c)
        ctx.tap, ctx.x_dtype = tap, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x_c, weight_c = ctx.saved_tensors
        ctx.tap.record(x_c, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad.matmul(weight_c.to(grad.dtype)).to(ctx.x_dtype), None, None, None


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, tap: Tap
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tap = tap
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        ctx.tap.record(ids, grad)
        return None, None, None, None


class _LayerNormFunction(torch.autograd.Function):
    """torch's own layer norm forward and input backward; x_hat for the tap is rebuilt
    from the saved input, mean and rstd in the backward pass (nothing more is kept)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        shape: tuple[int, ...],
        eps: float,
        tap: Tap,
    ) -> torch.Tensor:
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, list(shape), weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.tap, ctx.shape = tap, shape
        return cast(torch.Tensor, out)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        ctx.tap.record((x - mean) * rstd, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, list(ctx.shape), mean, rstd, weight, bias, [True, False, False]
        )
        return grad_x, None, None, None, None, None


def _recording() -> bool:
    return torch.is_grad_enabled()


def linear_forward(module: nn.Linear, tap: Tap, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, recording for book-keeping when gradients are being taken."""
    if not _recording():
        return F.linear(x, module.weight, module.bias)
    out: torch.Tensor = _LinearFunction.apply(x, module.weight, module.bias, tap)  # type: ignore[no-untyped-call]
    return out


def embedding_forward(module: nn.Embedding, tap: Tap, ids: torch.Tensor) -> torch.Tensor:
    """`module(ids)`, recording for book-keeping when gradients are being taken."""
    if not _recording():
        return F.embedding(ids, module.weight, module.padding_idx)
    out: torch.Tensor = _EmbeddingFunction.apply(ids, module.weight, module.padding_idx, tap)  # type: ignore[no-untyped-call]
    return out


def layer_norm_forward(module: nn.LayerNorm, tap: Tap, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, recording its affine part for book-keeping when gradients are taken."""
    shape = tuple(module.normalized_shape)
    if not _recording():
        return F.layer_norm(x, shape, module.weight, module.bias, module.eps)
    out: torch.Tensor = _LayerNormFunction.apply(
        x, module.weight, module.bias, shape, module.eps, tap
    )  # type: ignore[no-untyped-call]
    return out
