"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR'23) as a mask module.

Written from the paper, not from the authors' code: bipartite soft matching (A = even tokens,
B = odd tokens, every A token's best B partner, the r strongest edges merge), size-weighted
averaging and proportional attention (the log-size bias LtmBlock already adds). Differences from
the paper, all so that it plugs into the same converter:

* the similarity is the key-derived metric the LTM mask starts from (the block's mean-over-heads
  key of the pre-attention LayerNorm of the post-attention tokens), not the keys of the attention
  call itself, which the block does not expose;
* r per block comes from the same FLOPs-target static schedule as LTM; where it exceeds ToMe's 50%
  cap the matching runs several rounds;
* prefix tokens (class, distillation, registers) are never merged.

Training-free: the module's tensors are frozen (requires_grad False).
"""
from __future__ import annotations

from torch import nn

from ltm_convert.merge.baselines.common import (
    RoundsMask,
    bipartite_match,
    merge_round,
    positions_after,
)
from ltm_convert.merge.methods import MaskSpec, merge_method


class ToMeMask(RoundsMask):
    """``parity=1`` swaps the bipartite split (A = odd tokens, B = even tokens), method ``tome_odd``:
    a control that shows how much of a quality difference the arbitrary A/B split alone makes."""

    def __init__(self, spec: MaskSpec, parity: int = 0) -> None:
        super().__init__(spec)
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.parity = parity

    def extra_repr(self) -> str:
        return "parity=odd" if self.parity else ""

    def merge_round(self, x, s, metric, r, m, track):
        match = bipartite_match(metric, r, parity=self.parity)
        x, s, metric = merge_round(x, s, metric, match)
        if not track:
            return x, s, metric, None
        pos, rep = positions_after(match, m)
        return x, s, metric, (pos, None, rep)


@merge_method("tome")
def build_mask(spec: MaskSpec) -> nn.Module:
    return ToMeMask(spec)


@merge_method("tome_odd")
def build_mask_odd(spec: MaskSpec) -> nn.Module:
    return ToMeMask(spec, parity=1)
