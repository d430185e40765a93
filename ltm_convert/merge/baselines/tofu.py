"""ToFu (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging",
WACV'24) as a mask module, written from the paper's description.

ToFu's observation: averaging tokens is safe where a layer responds almost linearly to
interpolated inputs and harmful where it does not (the early layers); there pruning is better.
It also notes that averaging shrinks the norm of the merged token and shifts the feature
distribution, and merges with MLERP instead: the size-weighted average direction, rescaled to the
largest norm among the tokens merged.

Here: the same bipartite matching and key-derived metric as the ToMe baseline; in the first
``PRUNE_BLOCKS`` converted blocks the matched A token is dropped (pruning-like: its partner keeps
its value and size), later blocks merge with MLERP. The number of tokens removed per block comes
from the converter's FLOPs-target static schedule. Training-free.
"""
from __future__ import annotations

import torch
from torch import nn

from ltm_convert.merge.baselines.common import (
    RoundsMask,
    bipartite_match,
    dropped_mask,
    merge_round,
    positions_after,
)
from ltm_convert.merge.methods import MaskSpec, merge_method

PRUNE_BLOCKS = 3  # converted blocks (counted from the first) that prune instead of merging

class ToFuMask(RoundsMask):
    def __init__(self, spec: MaskSpec, prune: bool) -> None:
        super().__init__(spec)
        self.prune = prune

    def extra_repr(self) -> str:
        return f"mode={'prune' if self.prune else 'mlerp'}"

    def merge_round(self, x, s, metric, r, m, track):
        match = bipartite_match(metric, r)
        x, s, metric = merge_round(x, s, metric, match, prune=self.prune, mlerp=not self.prune)
        if not track:
            return x, s, metric, None
        pos, rep = positions_after(match, m)
        dropped = dropped_mask(match, torch.ones_like(match.src, dtype=torch.bool), m) if self.prune else None
        return x, s, metric, (pos, dropped, rep)


@merge_method("tofu")
def build_mask(spec: MaskSpec) -> nn.Module:
    return ToFuMask(spec, prune=spec.index < PRUNE_BLOCKS)
