"""Merging methods: which module decides the merge inside a converted block.

Every method plugs into the same LtmBlock, the same FLOPs-target schedule and the same save/load;
only the mask module differs. A method is a factory ``MaskSpec -> mask module`` registered under
its name from its own file with ``@merge_method("name")`` (merge/ltm_mask.py, merge/baselines/*.py;
those modules are imported on the first look-up). The module it builds keeps the contract of
:class:`ltm_convert.merge.state.SequenceMask`:
``forward(z, sizes, prefix, keep, track) -> (tokens, sizes, dest)``, with ``flops``, ``soft``,
``topk`` and ``prune`` given defaults there.
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


Factory = Callable[[MaskSpec], "nn.Module"]
_METHODS: dict[str, Factory] = {}
_HOMES = ("ltm_convert.merge.ltm_mask", "ltm_convert.merge.baselines")  # where built-in methods live
_LOADED = False


def merge_method(name: str) -> Callable[[Factory], Factory]:
    """Decorator of a mask factory: registers it under ``name`` (from the method's own file)."""
    def register(factory: Factory) -> Factory:
        _METHODS[name] = factory
        return factory
    return register


def register_method(name: str, factory: Factory) -> None:
    """Add a method of your own (its factory must build a ``SequenceMask``)."""
    _load()
    _METHODS[name] = factory


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pkgutil

    for home in _HOMES:
        module = importlib.import_module(home)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            importlib.import_module(f"{home}.{info.name}")


def method_names() -> list[str]:
    _load()
    return sorted(_METHODS)


def mask_factory(method: str) -> Factory:
    _load()
    if method not in _METHODS:
        raise LtmError(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    factory = _METHODS[method]

    def build(spec: MaskSpec) -> nn.Module:
        from ltm_convert.merge.state import SequenceMask

        mask = factory(spec)
        if not isinstance(mask, SequenceMask):
            raise LtmError(f"method {method!r} built a {type(mask).__name__}, which does not keep the mask contract; "
                           "derive it from ltm_convert.merge.state.SequenceMask")
        return mask
    return build
