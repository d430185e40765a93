"""The merge metric every mask builds on: phi(z) = normalize(W LN(z)), started as the block's key.

Token merging works best when it merges tokens the attention itself finds alike (ToMe's finding:
keys are a good metric). Every mask here (LTM, the grid merges, the ToMe / ToFu / LTMP
baselines) therefore owns one :class:`MergeMetric`: a LayerNorm and a projection to the head
dimension, initialised from the block's own pre-attention norm and its mean-over-heads key
projection, so an untrained mask already compares tokens the way the attention does.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_KEY_NAMES = ("k_proj", "key", "k", "to_k", "wk")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "heads", "n_heads")


def num_heads(attn: nn.Module, dim: int) -> int:
    for holder in [attn, *attn.modules()]:
        for name in _HEAD_ATTRS:
            value = getattr(holder, name, None)
            if isinstance(value, int) and value > 0:
                return value
    config = getattr(attn, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else max(1, dim // 64)


def key_projection(attn: nn.Module, dim: int) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """The attention's key projection as (weight (H*hd, D), bias, H), or None if none is found."""
    linears = [(n, m) for n, m in attn.named_modules() if isinstance(m, nn.Linear) and m.in_features == dim]
    heads = num_heads(attn, dim)
    for name, lin in linears:
        if name.split(".")[-1] in _KEY_NAMES:
            return lin.weight, lin.bias, heads
    for name, lin in linears:
        per_head = _per_head_keys(attn, lin, heads) if "qkv" in name.split(".")[-1] else None
        if per_head is not None:
            return per_head
        if lin.out_features % 3 == 0 and "qkv" in name.split(".")[-1]:
            inner = lin.out_features // 3
            bias = lin.bias[inner:2 * inner] if lin.bias is not None else None
            return lin.weight[inner:2 * inner], bias, heads
    return None


def _per_head_keys(attn: nn.Module, qkv: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """The key rows of a qkv projection laid out head by head, [q_h | k_h | v_h] for each head h
    (TinyViT, LeViT and EfficientFormer split ``qkv(x).view(B, N, heads, -1)`` at ``key_dim``), or
    None where the attention has no ``key_dim`` (the ViT layout [q | k | v]). Taking the middle third
    of such a projection would mix keys, values and queries of different heads."""
    kd = getattr(attn, "key_dim", None)
    if not isinstance(kd, int) or kd < 1 or qkv.out_features % heads or qkv.out_features // heads <= 2 * kd:
        return None
    per = qkv.out_features // heads
    rows = (torch.arange(heads)[:, None] * per + kd + torch.arange(kd)[None, :]).flatten().to(qkv.weight.device)
    return qkv.weight[rows], (qkv.bias[rows] if qkv.bias is not None else None), heads


def metric_dim(attn: nn.Module, dim: int) -> int:
    """The head dimension of the block's attention (the size of one head's key)."""
    found = key_projection(attn, dim)
    if found is not None:
        weight, _, heads = found
        return weight.shape[0] // heads
    return max(16, dim // num_heads(attn, dim))


def _as(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


def no_autocast(x: torch.Tensor):
    """A context that switches autocast off for x's device if it is on (else does nothing)."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


class MergeMetric(nn.Module):
    """LayerNorm + projection: ``norm`` and ``phi``. Masks subclass it, so that every mask's metric
    lives under the same state-dict names (``ltm_mask.norm.*``, ``ltm_mask.phi.*``)."""

    def __init__(self, dim: int, metric_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.phi = nn.Linear(dim, metric_dim)

    def metric(self, z: torch.Tensor) -> torch.Tensor:
        """Unit-length merge features of z (..., D) -> (..., d).

        Computed in float32 when z is half precision (autocast or a half model): merge decisions
        are discrete, and bf16 rounding of near-equal cosines flips them (measured on the bundled
        DINOv2: cosine to its own fp32 output 0.9962 in bf16, against 1.0000 for the original).
        A projection swapped for another module (``quantize_dynamic``) is called as a module.
        """
        x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        with no_autocast(z):
            x = F.layer_norm(x, self.norm.normalized_shape, _as(self.norm.weight, x), _as(self.norm.bias, x),
                             self.norm.eps)
            if type(self.phi) is nn.Linear:
                y = F.linear(x, _as(self.phi.weight, x), _as(self.phi.bias, x))
            else:
                y = self.phi(x)
        return F.normalize(y, dim=-1)

    def metric_and_score(self, z: torch.Tensor, score: nn.Module, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit metric rows (B, M, d), one-output ``score`` projection (B, M)) of the tokens after
        ``prefix``, in float32 for half-precision inputs (as :meth:`metric`); one GEMM for both when
        the projections are plain Linears, module calls when they were swapped (quantize_dynamic)."""
        x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        with no_autocast(z):
            n = F.layer_norm(x, self.norm.normalized_shape, _as(self.norm.weight, x), _as(self.norm.bias, x),
                             self.norm.eps)
            if type(self.phi) is nn.Linear and type(score) is nn.Linear:
                weight = torch.cat([self.phi.weight, score.weight], dim=0).to(x.dtype)
                extra = score.bias if score.bias is not None else self.phi.bias.new_zeros(1)
                bias = torch.cat([self.phi.bias, extra], dim=0).to(x.dtype)
                both = F.linear(n, weight, bias)[:, prefix:]
                phi, learned = both[..., :-1], both[..., -1]
            else:
                n = n[:, prefix:]
                phi, learned = self.phi(n), score(n)[..., 0]
        return F.normalize(phi, dim=-1), learned

    @torch.no_grad()
    def init_from_block(self, block: nn.Module, attn: nn.Module, pre_norm: str | nn.Module | None, dim: int) -> None:
        """Copy the block's pre-attention LayerNorm and its mean-over-heads key projection."""
        norm = getattr(block, pre_norm, None) if isinstance(pre_norm, str) else pre_norm
        if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,):
            if norm.weight is not None:
                self.norm.weight.copy_(norm.weight)
            if norm.bias is not None:
                self.norm.bias.copy_(norm.bias)
            self.norm.eps = norm.eps
        found = key_projection(attn, dim)
        if found is not None:
            weight, bias, heads = found
            head_dim = weight.shape[0] // heads
            if head_dim == self.phi.out_features:
                self.phi.weight.copy_(weight.reshape(heads, head_dim, dim).mean(0))
                self.phi.bias.copy_(bias.reshape(heads, head_dim).mean(0) if bias is not None else 0.0)
                return
        nn.init.orthogonal_(self.phi.weight)
        self.phi.bias.zero_()
