"""Shared pieces of the baseline masks: the key metric and ToMe-style bipartite matching.

Everything here works on static shapes: a mask turns M mergeable tokens into exactly ``keep``
tokens, with ``r = M - keep`` decided by the static schedule, never by the data. The merge is
written as row gathers and row adds (``ltm_block.take_rows`` / ``add_rows``, shared with the LTM
mask: sum of size-weighted tokens, then a division by the summed sizes), which export to ONNX
(Gather, ScatterElements with reduction "add", opset >= 16) and compile without graph breaks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.ltm_block import add_rows, take_rows
from ltm_convert.methods import MaskSpec
from ltm_convert.rewriters.sequence import init_mask, metric_dim


class KeyMetric(nn.Module):
    """phi(z) = normalize(W_phi LN(z)), initialised as the block's own mean-over-heads key.

    This is exactly the metric the LTM mask starts from (``rewriters.sequence.init_mask``), so every
    method compares tokens the same way and only the merge rule differs. ``norm`` and ``phi`` are
    named as in LtmMask so that ``init_mask`` can fill them in.
    """

    def __init__(self, spec: MaskSpec, trainable: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(spec.dim)
        self.phi = nn.Linear(spec.dim, metric_dim(spec.attn, spec.dim))
        init_mask(self, spec.block, spec.attn, spec.pre_norm, spec.dim)  # type: ignore[arg-type]
        if not trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.phi(self.norm(z)), dim=-1)


@dataclass
class Matching:
    """One round of bipartite soft matching on tokens split into A (even) and B (odd) positions.

    src (B, r): A positions merged (or dropped) into B; dst (B, r): their B partners;
    unm (B, Na - r): A positions kept, in descending order of their best score (as ToMe).
    score (B, Na): each A token's best cosine to a B token.
    """

    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor
    score: torch.Tensor
    order: torch.Tensor


def bipartite_match(metric: torch.Tensor, r: int, rank: torch.Tensor | None = None) -> Matching:
    """ToMe's bipartite soft matching (Bolya et al., ICLR'23), written from the paper.

    A takes the even tokens, B the odd ones; every A token draws an edge to its most similar B token;
    the ``r`` A tokens with the strongest edges (or the highest ``rank`` if given) leave.
    """
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)
    order = (node_max if rank is None else rank).argsort(dim=-1, descending=True)
    src = order[:, :r]
    unm = order[:, r:]
    dst = node_idx.gather(1, src)
    return Matching(src=src, dst=dst, unm=unm, score=node_max, order=order)


def split_ab(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, ::2], x[:, 1::2]


def rounds(m: int, keep: int) -> list[int]:
    """Tokens removed per matching round: ToMe removes at most |A| = ceil(M/2) per round, so a
    schedule that keeps fewer than half the tokens takes several rounds (static per resolution)."""
    out = []
    while m > keep:
        r = min(m - keep, (m + 1) // 2)
        if m - r < 1:
            r = m - 1
        out.append(r)
        m -= r
    return out


class Tracker:
    """Which output slot each original token ended in (only built when a block records)."""

    def __init__(self, batch: int, m: int, device: torch.device) -> None:
        self.slot = torch.arange(m, device=device).expand(batch, m).clone()  # position in current seq
        self.weight = torch.ones(batch, m, device=device)  # 0 once a token was dropped (pruned)
        self.rep = torch.arange(m, device=device).expand(batch, m).clone()  # original index of each current token

    def step(self, new_pos_of_old: torch.Tensor, dropped_old: torch.Tensor | None, new_rep_idx: torch.Tensor) -> None:
        """new_pos_of_old (B, M_cur): where each current token goes; dropped_old (B, M_cur) bool."""
        if dropped_old is not None:
            self.weight = self.weight * (~dropped_old.gather(1, self.slot)).float()
        self.slot = new_pos_of_old.gather(1, self.slot)
        self.rep = self.rep.gather(1, new_rep_idx)

    def record(self, record: list, keep: int, prefix: int, sizes_in: torch.Tensor) -> None:
        b, m = self.slot.shape
        assign = torch.zeros(b, m, keep, device=self.slot.device)
        assign.scatter_(2, self.slot.unsqueeze(-1), self.weight.unsqueeze(-1))
        record[-1].update(targets=self.rep, assign=assign, prefix=prefix, sizes_in=sizes_in)


def positions_after(match: Matching, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the output order cat([A[unm], B]): the new position of every current token (B, M)
    (merged A tokens point at their B partner) and the current index of every output token."""
    bsz, na = match.score.shape
    nb = m // 2
    n_unm = match.unm.shape[1]
    device = match.score.device
    pos_a = torch.zeros(bsz, na, dtype=torch.long, device=device)
    pos_a = pos_a.scatter(1, match.unm, torch.arange(n_unm, device=device).expand(bsz, n_unm))
    pos_a = pos_a.scatter(1, match.src, n_unm + match.dst)
    pos_b = (n_unm + torch.arange(nb, device=device)).expand(bsz, nb)
    pos = torch.empty(bsz, m, dtype=torch.long, device=device)
    pos[:, ::2] = pos_a
    pos[:, 1::2] = pos_b
    rep = torch.cat([match.unm * 2, (torch.arange(nb, device=device) * 2 + 1).expand(bsz, nb)], dim=1)
    return pos, rep


def merge_round(x: torch.Tensor, s: torch.Tensor, metric: torch.Tensor, match: Matching, *,
                src_weight: torch.Tensor | None = None, unm_scale: torch.Tensor | None = None,
                prune: bool = False, mlerp: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one matching: returns (tokens, sizes, metric) in the order cat([A[unm], B]).

    Merging is size-weighted: b' = (s_b x_b + sum w s_a x_a) / (s_b + sum w s_a), with the source
    weight w = 1 (ToMe), 0 (pruning: the source token is dropped) or a learned 0/1 gate with a
    straight-through gradient (LTMP). ``mlerp`` rescales every B token to the largest norm in its
    group (ToFu's norm-preserving merge). ``unm_scale`` multiplies the kept A tokens (value 1; it
    only carries a straight-through gradient).
    """
    a, b = split_ab(x)
    sa, sb = split_ab(s)
    ma, mb = split_ab(metric)
    x_unm = take_rows(x, 2 * match.unm)  # A = even rows of x: gather from x itself, no copy of A
    if unm_scale is not None:
        x_unm = x_unm * unm_scale.unsqueeze(-1).to(x.dtype)
    s_unm = sa.gather(1, match.unm)
    if prune:
        b_new, sb_new = b, sb
    else:
        w = sa.gather(1, match.src)
        if src_weight is not None:
            w = w * src_weight.to(w.dtype)
        wx = w.to(x.dtype).unsqueeze(-1)
        b_sum = add_rows(b * sb.to(x.dtype).unsqueeze(-1), match.dst, take_rows(x, 2 * match.src) * wx)
        sb_new = sb.scatter_add(1, match.dst, w)
        b_new = b_sum / sb_new.to(x.dtype).unsqueeze(-1)
        if mlerp:
            na, nb = a.norm(dim=-1), b.norm(dim=-1)
            target = nb.scatter_reduce(1, match.dst, na.gather(1, match.src), reduce="amax", include_self=True)
            b_new = b_new * (target / b_new.norm(dim=-1).clamp_min(1e-6)).unsqueeze(-1)
    out = torch.cat([x_unm, b_new], dim=1)
    sizes = torch.cat([s_unm, sb_new], dim=1)
    new_metric = torch.cat([take_rows(ma, match.unm), mb], dim=1)
    return out, sizes, new_metric


def split_prefix(z: torch.Tensor, sizes: torch.Tensor | None, prefix: int):
    bsz, n, _ = z.shape
    if sizes is None:
        sizes = z.new_ones(bsz, n, dtype=torch.float32)
    return z[:, :prefix], z[:, prefix:], sizes[:, :prefix], sizes[:, prefix:]


def join_prefix(zp: torch.Tensor, x: torch.Tensor, sp: torch.Tensor, s: torch.Tensor):
    return torch.cat([zp, x], dim=1), torch.cat([sp, s.to(sp.dtype)], dim=1)


def dropped_mask(match: Matching, is_prune: torch.Tensor, m: int) -> torch.Tensor:
    """(B, M) bool: which current tokens a round dropped (pruned) rather than merged."""
    bsz, na = match.score.shape
    dropped_a = torch.zeros(bsz, na, dtype=torch.bool, device=is_prune.device).scatter(1, match.src, is_prune)
    dropped = torch.zeros(bsz, m, dtype=torch.bool, device=is_prune.device)
    dropped[:, ::2] = dropped_a
    return dropped


class RoundsMask(nn.Module):
    """A training-free-style mask made of static matching rounds (ToMe, ToFu, LTMP).

    Subclasses implement :meth:`merge_round`; this class handles prefix tokens, the static round
    sizes and the recording of what was merged (for visualisation).
    """

    def __init__(self, spec: MaskSpec, trainable_metric: bool = False) -> None:
        super().__init__()
        self.metric = KeyMetric(spec, trainable=trainable_metric)

    def merge_round(self, x: torch.Tensor, s: torch.Tensor, metric: torch.Tensor, r: int, m: int, track: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """Remove ``r`` of the ``m`` tokens; returns (x, s, metric, tracker step arguments or None
        when ``track`` is False: the bookkeeping is only for visualisation)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                record: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        zp, x, sp, s = split_prefix(z, sizes, prefix)
        metric = self.metric(x)
        m = x.shape[1]
        tracker = Tracker(x.shape[0], m, x.device) if record is not None else None
        s_in = s
        for r in rounds(m, keep):
            x, s, metric, step = self.merge_round(x, s, metric, r, m, tracker is not None)
            if tracker is not None:
                tracker.step(*step)
            m -= r
        if tracker is not None:
            tracker.record(record, keep, prefix, s_in)
        return join_prefix(zp, x, sp, s)
