"""Rewriters turn one found block into its LTM form; the first one that accepts a block wins.

A rewriter answers ``reason_unsupported(block, match)`` (None when it can handle the block) and
``rewrite(...)``. Families with special needs (2-D grids, rotary tables) register their own
rewriter ahead of the generic sequence rewriter with :func:`register_rewriter`.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from ltm_convert.errors import UnsupportedModelError
from ltm_convert.tracer import BlockMatch


class Rewriter(Protocol):
    name: str

    def reason_unsupported(self, block: nn.Module, match: BlockMatch) -> str | None: ...

    def rewrite(self, block: nn.Module, match: BlockMatch, call: tuple[tuple, dict], **options: Any) -> nn.Module: ...


_REGISTRY: list[Rewriter] = []


def register_rewriter(rewriter: Rewriter, *, first: bool = True) -> Rewriter:
    """Add a rewriter; ``first=True`` lets it claim blocks before the ones already registered."""
    rewriters()  # seed the built-in rewriter first, so registering never hides it
    if first:
        _REGISTRY.insert(0, rewriter)
    else:
        _REGISTRY.append(rewriter)
    return rewriter


def rewriters() -> list[Rewriter]:
    if not _REGISTRY:
        from ltm_convert.rewriters.sequence import SequenceBlockRewriter

        _REGISTRY.append(SequenceBlockRewriter())
    return list(_REGISTRY)


def pick_rewriter(block: nn.Module, match: BlockMatch) -> Rewriter:
    reasons = []
    for rewriter in rewriters():
        reason = rewriter.reason_unsupported(block, match)
        if reason is None:
            return rewriter
        reasons.append(f"{rewriter.name}: {reason}")
    raise UnsupportedModelError(f"not supported yet: block {match.name} ({type(block).__name__}): " + "; ".join(reasons))
