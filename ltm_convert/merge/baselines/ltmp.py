"""LTMP (Bonnaerens & Dambre, "Learned Thresholds Token Merging and Pruning for Vision
Transformers", TMLR'23) as a mask module, written from the paper's description.

LTMP learns two scalars per block: a merge threshold (a ToMe pair merges when its similarity is
above it) and a prune threshold (a token is dropped when its importance, the mean attention it
receives, is below it), through ``sigmoid((v - theta) / tau)`` masks with a straight-through
gradient. Because the thresholds make the token count depend on the image, the authors' inference
model runs at batch 1.

Here the thresholds are compiled into the converter's static schedule: the number of tokens a
block removes is fixed by the FLOPs target, and the thresholds decide *which* tokens leave and
*how*: every A token of the bipartite split gets a merge logit (best similarity - theta_merge) and
a prune logit (theta_prune - importance); the r tokens with the largest of the two leave, merged
into their B partner when the merge logit is the larger, dropped otherwise. Batches of any size
and static shapes work; training the thresholds (``theta_merge``, ``theta_prune``, the only
trainable tensors) uses the straight-through gates. Importance is the mean attention a token
receives computed in the key-derived metric space (the block's attention probabilities are not
exposed under SDPA), scaled so that the average token has importance 1.
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
    split_ab,
)
from ltm_convert.merge.methods import MaskSpec, merge_method


class LtmpMask(RoundsMask):
    def __init__(self, spec: MaskSpec, merge_threshold: float = 0.9, prune_threshold: float = 0.0,
                 tau: float = 0.1) -> None:
        super().__init__(spec)
        self.theta_merge = nn.Parameter(torch.tensor(float(merge_threshold)))
        self.theta_prune = nn.Parameter(torch.tensor(float(prune_threshold)))
        self.tau = tau
        self.scale = float(self.metric.phi.out_features) ** 0.5

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def round_flops(self, m: int, r: int, d: int) -> int:
        # the importance scores, and the bipartite scores twice (once to score, once to rank)
        return 2 * super().round_flops(m, r, d) + 2 * m * m * d

    def merge_round(self, x, s, metric, r, m, track):
        attn = torch.softmax(metric @ metric.transpose(1, 2) * self.scale, dim=-1)  # (B, M, M)
        importance = attn.mean(dim=1) * m  # mean attention received; average token = 1
        imp_a, _ = split_ab(importance)
        match = bipartite_match(metric, r)
        merge_logit = match.score - self.theta_merge.to(match.score.dtype)
        prune_logit = self.theta_prune.to(imp_a.dtype) - imp_a
        rank = torch.maximum(merge_logit, prune_logit)
        match = bipartite_match(metric, r, rank=rank.detach())
        is_prune = prune_logit.gather(1, match.src) > merge_logit.gather(1, match.src)
        g_merge = torch.sigmoid(merge_logit.gather(1, match.src) / self.tau)
        src_weight = (~is_prune).to(g_merge.dtype) + (g_merge - g_merge.detach())
        g_prune = torch.sigmoid(prune_logit.gather(1, match.unm) / self.tau)
        unm_scale = 1.0 - (g_prune - g_prune.detach())
        x, s, metric = merge_round(x, s, metric, match, src_weight=src_weight, unm_scale=unm_scale)
        if not track:
            return x, s, metric, None
        pos, rep = positions_after(match, m)
        return x, s, metric, (pos, dropped_mask(match, is_prune, m), rep)


@merge_method("ltmp")
def build_mask(spec: MaskSpec) -> nn.Module:
    return LtmpMask(spec)
