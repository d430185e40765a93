"""Teach ltm_convert a model family of your own: one class, registered with ``register_family``.

A family (ltm_convert/rewriters/base.py) reads the model analysis and returns a plan or the reason
it does not apply (``find``), builds its merge modules into the model (``build``), lists its merge
sites for the schedule solver (``sites``, ``cost_model``), applies a schedule (``apply``) and
describes itself (``describe``). ``register_family(f)`` puts it ahead of the built-in families, so
it claims its models first. Here a home-made ViT whose blocks are "MixerBlock"s (attention in
``mix``) is claimed by a family that reuses the token-sequence family's graph cut and schedule
but gives every mask a wider top-k and logs what it did; any other model falls through to the
built-in families.

Run: python examples/custom_rewriter.py   (random weights, offline, a few seconds)
"""
from __future__ import annotations

import torch
from torch import nn

from ltm_convert.api import convert, describe, ltm_blocks
from ltm_convert.rewriters import register_family, unregister_family
from ltm_convert.rewriters.sequence import SequenceFamily


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MixerBlock(nn.Module):
    """Pre-norm block: x + mix(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mix = SelfAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.ln_a(x))
        return x + self.ffn(self.ln_b(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, img: int = 64, patch: int = 8,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[MixerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.img = img

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class MixerFamily(SequenceFamily):
    """Claims models built from MixerBlocks only; the token-sequence family's cut, top-k 8 for every mask."""

    name = "mixer"

    def __init__(self) -> None:
        self.rewritten: list[str] = []

    def find(self, analysis):
        if not all(isinstance(analysis.modules.get(b.name), MixerBlock) for b in analysis.blocks):
            return f"{analysis.model_class} is not built from MixerBlocks"
        return super().find(analysis)

    def build(self, model, plan, analysis, config):
        config.topk = 8
        self.rewritten += plan.block_names
        super().build(model, plan, analysis, config)


def main() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    family = register_family(MixerFamily())
    try:
        converted = convert(model, ratio=0.6, input_size=64)
    finally:
        unregister_family(family)
    info = describe(converted)
    print(f"rewritten by {family.name!r}: {', '.join(family.rewritten)}")
    for name, blk in ltm_blocks(converted):
        print(f"  {name}: {blk.ltm_in_with_prefix} tokens in -> keeps {blk.ltm_keep_mergeable} (+{blk.ltm_prefix} prefix), "
              f"top-k {blk.ltm_mask.topk}")
    print(f"FLOPs ratio {info['flops_ratio']:.3f} (target 0.6), parameters added {info['params_added']:,}")

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        print("logits", tuple(converted(x).shape), "vs original", tuple(model(x).shape))
    assert family.rewritten == [f"blocks.{i}" for i in range(4)]
    assert all(blk.ltm_mask.topk == 8 for _, blk in ltm_blocks(converted))
    assert abs(info["flops_ratio"] - 0.6) < 0.05
    print("ok")


if __name__ == "__main__":
    main()
