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

from ltm_convert.baselines.common import RoundsMask, bipartite_match, merge_round, positions_after
from ltm_convert.methods import MaskSpec


class ToMeMask(RoundsMask):
    def merge_round(self, x, s, metric, r, m, track):
        match = bipartite_match(metric, r)
        x, s, metric = merge_round(x, s, metric, match)
        if not track:
            return x, s, metric, None
        pos, rep = positions_after(match, m)
        return x, s, metric, (pos, None, rep)


def build_mask(spec: MaskSpec) -> nn.Module:
    return ToMeMask(spec)
