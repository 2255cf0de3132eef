"""Building blocks shared by the STATE models: MLP, RMSNorm, SwiGLU, set attention, energy distance.

Sets of cells have no order, so nothing here knows about positions: attention is bidirectional
and there is no positional encoding. A padding mask ``[B, S]`` marks real cells with ``True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 4, dropout: float = 0.1) -> nn.Sequential:
    """``n_layers`` Linear layers: (Linear -> GELU -> Dropout) x (n_layers - 1), then Linear."""
    if n_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got n_layers={n_layers}")
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(n_layers - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.GELU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


def norm_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """(Linear -> LayerNorm -> GELU -> Dropout) for each width in ``hidden``, then Linear to ``out_dim``."""
    dims = [in_dim, *[int(h) for h in hidden]]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no mean subtraction, no bias), as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under bf16 autocast x is bf16; a weight of another dtype makes torch fall back to the unfused kernel
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """Gated feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def _attention_kernels(q: torch.Tensor):
    """Context for SDPA on ``q`` (after :func:`_attention_inputs`).

    On CPU under bf16 autocast, attention runs in float32 with autocast off: the fused CPU
    kernel's backward is faster there in float32 than in bf16 (benchmarks/README.md), and its
    softmax exact. On CPU with bf16 matmuls ("medium"/"high"
    float32 matmul precision) only the reference (math) kernel, whose batched matmuls then run in
    bf16 while the fused kernel stays in float32 and is slower there. Elsewhere no change.
    """
    stack = ExitStack()
    if q.device.type == "cpu":
        if torch.is_autocast_enabled("cpu"):
            stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.get_float32_matmul_precision() != "highest":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _attention_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` as float32 on CPU (see :func:`_attention_kernels`), unchanged elsewhere."""
    if tensors[0].device.type == "cpu" and tensors[0].dtype != torch.float32:
        return tuple(t.float() for t in tensors)
    return tensors


class SetAttention(nn.Module):
    """Multi-head self-attention over an unordered set: every cell sees every real cell."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # Only keys are masked: padded queries still get a (meaningless) output, which the
        # caller ignores; masking their rows too would leave softmax with nothing and give NaN.
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        dtype = q.dtype
        q, k, v = _attention_inputs(q, k, v)
        with _attention_kernels(q):
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=False
            )
        y = y.to(dtype).transpose(1, 2).reshape(B, S, D)
        return self.resid_dropout(self.proj(y))


class TransformerBlock(nn.Module):
    """Llama-style block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, dim: int, n_heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = SetAttention(dim, n_heads, dropout)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = SwiGLU(dim, ffn_mult * dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.ffn(self.ffn_norm(x))


def _set_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Uniform weights over the real cells of each set: ``[B, S]``, rows summing to 1."""
    if mask is None:
        return x.new_full(x.shape[:2], 1.0 / x.shape[1])
    w = mask.to(x.dtype)
    return w / w.sum(1, keepdim=True).clamp_min(1.0)


def _safe_distances(a: torch.Tensor, b: torch.Tensor, eps: float, zero_diagonal: bool) -> torch.Tensor:
    """Pairwise Euclidean distances ``[B, Sa, Sb]`` with a finite gradient where points coincide.

    The squared distances use ``|a|^2 + |b|^2 - 2 a.b`` (memory ``B*Sa*Sb``, not ``*D``), whose
    round-off is about ``eps * (|a|^2 + |b|^2)``. Squared distances below 8 times that are
    indistinguishable from 0 and are set to exactly 0 with a zero gradient: ``sqrt`` has an
    infinite derivative at 0 (the inner ``where`` keeps the NaN out of backward). A point's
    distance to itself is known to be 0 and is set so.
    """
    sq_a, sq_b = a.pow(2).sum(-1)[:, :, None], b.pow(2).sum(-1)[:, None, :]
    d2 = (sq_a + sq_b - 2 * a @ b.transpose(1, 2)).clamp_min(0.0)
    if zero_diagonal:
        d2 = d2 * (1 - torch.eye(a.shape[1], dtype=a.dtype, device=a.device))
    far = d2 > 8 * eps * (sq_a + sq_b)
    return torch.where(far, torch.sqrt(torch.where(far, d2, torch.ones_like(d2))), torch.zeros_like(d2))


def energy_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Energy distance between two sets of points, one value per batch element.

    ``2 E|x - y| - E|x - x'| - E|y - y'|``, with the expectations over all pairs of real cells,
    self-pairs included (the biased V-statistic, always >= 0, exactly 0 for identical sets).
    This is twice geomloss ``SamplesLoss("energy")``, whose kernel is ``-|x - y|`` and whose
    loss carries a factor 1/2; halve it to compare with values reported by arc-state.

    Parameters
    ----------
    x, y
        ``[B, Sx, D]`` and ``[B, Sy, D]``; the set sizes may differ.
    x_mask, y_mask
        Optional ``[B, S]`` bool, ``True`` = real cell; padded cells get weight 0.
    eps
        Relative round-off: squared distances below ``8 * eps * (|a|^2 + |b|^2)`` (after
        centring) count as 0, which keeps the gradient finite for coinciding points; default:
        the machine epsilon of the dtype (about 1e-7 in float32, 2e-16 in float64).

    Returns
    -------
    ``[B]`` tensor, differentiable in ``x`` and ``y``.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    wx, wy = _set_weights(x, x_mask), _set_weights(y, y_mask)
    # Distances do not change under a shift; centring on the pooled mean keeps the norms in the
    # expansion small and so the float32 cancellation error small.
    centre = ((wx[:, :, None] * x).sum(1, keepdim=True) + (wy[:, :, None] * y).sum(1, keepdim=True)) / 2
    x, y = x - centre, y - centre
    dxy = _safe_distances(x, y, eps, zero_diagonal=False)
    dxx = _safe_distances(x, x, eps, zero_diagonal=True)
    dyy = _safe_distances(y, y, eps, zero_diagonal=True)

    def mean_pair(w1: torch.Tensor, d: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,bij,bj->b", w1, d, w2)

    return 2 * mean_pair(wx, dxy, wy) - mean_pair(wx, dxx, wx) - mean_pair(wy, dyy, wy)
