"""Block layouts the block matcher cannot cut, each with the precise reason and what would make it work.

Blocks are found by what they compute (tracer.py); a block whose residual stream changes shape inside
it is no "attention residual, then MLP residual" and is not found at all. Where such a layout is known,
the refusal names it instead of the generic "found no residual branch containing attention".
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


def divided_space_time(modules: Iterable[nn.Module]) -> str | None:
    """HF TimeSformer with divided space-time attention (its default and every published checkpoint)."""
    layer = next((m for m in modules if type(m).__name__ == "TimesformerLayer"
                  and getattr(m, "attention_type", None) == "divided_space_time"), None)
    if layer is None:
        return None
    return ("TimeSformer's divided space-time attention (attention_type='divided_space_time') reshapes every "
            "layer's tokens to (batch x patches, frames, dim) for its temporal attention and to (batch x frames, "
            "1 + patches, dim) for its spatial attention, so no layer can take a merged sequence; merging only "
            "inside each layer's MLP (layernorm_after .. output) and unmerging after it, as the ffn-grid family does "
            "for Swin, would make it work")


KNOWN_LAYOUTS = (divided_space_time,)


def known_layout_reason(modules: Iterable[nn.Module]) -> str | None:
    """The reason of the first known layout the model's modules show, or None."""
    modules = list(modules)
    return next((r for r in (check(modules) for check in KNOWN_LAYOUTS) if r), None)
