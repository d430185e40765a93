"""The generic rewriter for blocks that work on a (batch, tokens, dim) sequence.

It covers every "x + attn(...); x + mlp(...)" block whose halves can be cut by graph analysis
(block_graph.py): timm ViT / DeiT / DeiT-III / DINOv2 / SigLIP blocks and the HF ViT, DeiT,
Dinov2, CLIP and SigLIP layers, without a per-class table.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltm_convert.block_graph import bind_call, split_block
from ltm_convert.config import DEFAULT_TOPK
from ltm_convert.ltm_block import LtmBlock, LtmContext, LtmMask
from ltm_convert.methods import MaskSpec, mask_factory
from ltm_convert.tracer import BlockMatch

_KEY_NAMES = ("k_proj", "key", "k", "to_k", "wk")


def _num_heads(attn: nn.Module, dim: int) -> int:
    for holder in [attn, *attn.modules()]:
        for name in ("num_heads", "num_attention_heads", "heads", "n_heads"):
            value = getattr(holder, name, None)
            if isinstance(value, int) and value > 0:
                return value
    config = getattr(attn, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else max(1, dim // 64)


def key_projection(attn: nn.Module, dim: int) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """The attention's key projection as (weight (H*hd, D), bias, H), or None if not found."""
    linears = [(n, m) for n, m in attn.named_modules() if isinstance(m, nn.Linear) and m.in_features == dim]
    heads = _num_heads(attn, dim)
    for name, lin in linears:
        if name.split(".")[-1] in _KEY_NAMES:
            return lin.weight, lin.bias, heads
    for name, lin in linears:
        if lin.out_features % 3 == 0 and "qkv" in name.split(".")[-1]:
            inner = lin.out_features // 3
            bias = lin.bias[inner:2 * inner] if lin.bias is not None else None
            return lin.weight[inner:2 * inner], bias, heads
    return None


def init_mask(mask: LtmMask, block: nn.Module, attn: nn.Module, pre_norm: str | None, dim: int) -> None:
    """Start the merge metric as the mean-over-heads key of the block's own attention."""
    with torch.no_grad():
        norm = getattr(block, pre_norm, None) if pre_norm else None
        if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,):
            if norm.weight is not None:
                mask.norm.weight.copy_(norm.weight)
            if norm.bias is not None:
                mask.norm.bias.copy_(norm.bias)
            mask.norm.eps = norm.eps
        found = key_projection(attn, dim)
        if found is not None:
            weight, bias, heads = found
            head_dim = weight.shape[0] // heads
            if head_dim == mask.phi.out_features:
                mask.phi.weight.copy_(weight.reshape(heads, head_dim, dim).mean(0))
                if bias is not None:
                    mask.phi.bias.copy_(bias.reshape(heads, head_dim).mean(0))
                else:
                    mask.phi.bias.zero_()
                return
        nn.init.orthogonal_(mask.phi.weight)
        mask.phi.bias.zero_()


def metric_dim(attn: nn.Module, dim: int) -> int:
    found = key_projection(attn, dim)
    if found is not None:
        weight, _, heads = found
        return weight.shape[0] // heads
    return max(16, dim // _num_heads(attn, dim))


class SequenceBlockRewriter:
    name = "sequence"

    def reason_unsupported(self, block: nn.Module, match: BlockMatch) -> str | None:
        if not isinstance(getattr(block, match.attn_child, None), nn.Module):
            return f"no attention child {match.attn_child!r}"
        return None

    def rewrite(self, block: nn.Module, match: BlockMatch, call: tuple[tuple, dict], *, context: LtmContext,
                prefix: int, first: bool, topk: int = DEFAULT_TOPK, method: str = "ltm", **_: Any) -> LtmBlock:
        args, kwargs = call
        bound = bind_call(block, args, kwargs)
        split = split_block(block, match.attn_child, bound)
        attn = getattr(block, match.attn_child)
        spec = MaskSpec(dim=match.dim, block=block, attn=attn, pre_norm=split.pre_norm, first=first, topk=topk)
        mask = mask_factory(method)(spec)
        param = next(block.parameters())
        mask = mask.to(device=param.device, dtype=param.dtype)
        new = LtmBlock(block, split, mask, context=context, prefix=prefix, tokens_in=match.tokens,
                       keep=match.tokens - prefix, first=first)
        new.ltm_name = match.name
        return new


def build_ltm_mask(spec: MaskSpec) -> LtmMask:
    """The learnable LTM mask, starting as the block's own key similarity (usable untrained)."""
    mask = LtmMask(spec.dim, metric_dim(spec.attn, spec.dim), topk=spec.topk, use_sizes=not spec.first)
    init_mask(mask, spec.block, spec.attn, spec.pre_norm, spec.dim)
    return mask
