"""Merging methods: which module decides the merge inside a converted block.

Every method plugs into the same LtmBlock, the same FLOPs-target schedule and the same save/load;
only the mask module differs. A mask module is called as
``mask(z, sizes, prefix, keep, record) -> (merged tokens, merged sizes)`` (see ltm_block.LtmMask).
Methods are named here as "module:function" and imported only when used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ltm_convert.errors import LtmError

if TYPE_CHECKING:  # importing this module stays torch-free: config.py checks method names with it
    from torch import nn

DEFAULT_TOPK = 2  # targets each merged-away token may reach (local and cheap; 2 keeps what 4 kept on
# 350 photos at half the merge work, benchmarks/README.md)


@dataclass
class MaskSpec:
    """What a mask factory may look at: the block being converted and its position."""

    dim: int
    block: nn.Module
    attn: nn.Module
    pre_norm: str | None
    first: bool
    topk: int
    index: int = 0  # position among the converted blocks (ToFu prunes in the first few)
    version: int = 2  # mask version ("ltm": 1 replays files written by ltm_convert 0.1.0)


_METHODS: dict[str, str] = {
    "ltm": "ltm_convert.merge.ltm_mask:build_mask",
    "tome": "ltm_convert.merge.baselines.tome:build_mask",
    "tofu": "ltm_convert.merge.baselines.tofu:build_mask",
    "ltmp": "ltm_convert.merge.baselines.ltmp:build_mask",
    "tome_odd": "ltm_convert.merge.baselines.tome:build_mask_odd",  # ToMe with A = odd, B = even tokens
}


def register_method(name: str, target: str | Callable[[MaskSpec], nn.Module]) -> None:
    """Add a method: ``target`` is a factory or its "module:function" path."""
    _METHODS[name] = target  # type: ignore[assignment]


def method_names() -> list[str]:
    return sorted(_METHODS)


def mask_factory(method: str) -> Callable[[MaskSpec], nn.Module]:
    if method not in _METHODS:
        raise LtmError(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    target = _METHODS[method]
    if callable(target):
        return target
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)
