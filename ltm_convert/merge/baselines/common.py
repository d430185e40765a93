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
from torch import nn

from ltm_convert.merge.methods import MaskSpec
from ltm_convert.merge.metric import MergeMetric, metric_dim
from ltm_convert.merge.rows import add_rows, take_rows
from ltm_convert.merge.state import SequenceMask, recorder


class KeyMetric(MergeMetric):
    """The key-derived metric the LTM mask starts from (merge/metric.py), so every method compares
    tokens the same way and only the merge rule differs; frozen unless ``trainable``."""

    def __init__(self, spec: MaskSpec, trainable: bool = False) -> None:
        super().__init__(spec.dim, metric_dim(spec.attn, spec.dim))
        self.init_from_block(spec.block, spec.attn, spec.pre_norm, spec.dim)
        if not trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.metric(z)


@dataclass
class Matching:
    """One round of bipartite soft matching on tokens split into A (even) and B (odd) positions.

    src (B, r): A positions merged (or dropped) into B; dst (B, r): their B partners;
    unm (B, Na - r): A positions kept, in descending order of their best score (as ToMe).
    score (B, Na): each A token's best cosine to a B token.
    parity: 0 = A even / B odd (ToMe), 1 = A odd / B even; positions above count within A and B.
    """

    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor
    score: torch.Tensor
    order: torch.Tensor
    parity: int = 0


def bipartite_match(metric: torch.Tensor, r: int, rank: torch.Tensor | None = None, parity: int = 0) -> Matching:
    """ToMe's bipartite soft matching (Bolya et al., ICLR'23), written from the paper.

    A takes the even tokens, B the odd ones (``parity=1`` swaps them: a control for how much the
    arbitrary split matters); every A token draws an edge to its most similar B token;
    the ``r`` A tokens with the strongest edges (or the highest ``rank`` if given) leave.
    """
    a, b = split_ab(metric, parity)
    scores = a @ b.transpose(1, 2)  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)
    order = (node_max if rank is None else rank).argsort(dim=-1, descending=True)
    src = order[:, :r]
    unm = order[:, r:]
    dst = node_idx.gather(1, src)
    return Matching(src=src, dst=dst, unm=unm, score=node_max, order=order, parity=parity)


def _check_parity(parity: int) -> None:
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 (A = even tokens) or 1 (A = odd tokens), got {parity!r}")


def split_ab(x: torch.Tensor, parity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (even, odd) tokens, or (odd, even) with ``parity=1``."""
    _check_parity(parity)
    if parity:
        return x[:, 1::2], x[:, ::2]
    return x[:, ::2], x[:, 1::2]


def a_rows(idx: torch.Tensor, parity: int = 0) -> torch.Tensor:
    """Positions within A -> positions in the full sequence (no extra op for the default parity,
    so parity 0 exports and computes exactly as before)."""
    return 2 * idx + 1 if parity else 2 * idx


def rounds(m: int, keep: int, parity: int = 0) -> list[int]:
    """Tokens removed per matching round: ToMe removes at most |A| = ceil(M/2) per round (floor(M/2)
    with ``parity=1``), so a schedule that keeps fewer than half the tokens takes several rounds
    (static per resolution)."""
    _check_parity(parity)
    out = []
    while m > keep:
        r = min(m - keep, (m + 1 - parity) // 2)
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
    p = match.parity
    nb = (m + p) // 2
    n_unm = match.unm.shape[1]
    device = match.score.device
    pos_a = torch.zeros(bsz, na, dtype=torch.long, device=device)
    pos_a = pos_a.scatter(1, match.unm, torch.arange(n_unm, device=device).expand(bsz, n_unm))
    pos_a = pos_a.scatter(1, match.src, n_unm + match.dst)
    pos_b = (n_unm + torch.arange(nb, device=device)).expand(bsz, nb)
    pos = torch.empty(bsz, m, dtype=torch.long, device=device)
    pos[:, p::2] = pos_a
    pos[:, 1 - p::2] = pos_b
    rep = torch.cat([a_rows(match.unm, p), (torch.arange(nb, device=device) * 2 + (1 - p)).expand(bsz, nb)], dim=1)
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
    p = match.parity
    a, b = split_ab(x, p)
    sa, sb = split_ab(s, p)
    ma, mb = split_ab(metric, p)
    x_unm = take_rows(x, a_rows(match.unm, p))  # A = even (odd) rows of x: gather from x itself, no copy of A
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
        b_sum = add_rows(b * sb.to(x.dtype).unsqueeze(-1), match.dst, take_rows(x, a_rows(match.src, p)) * wx)
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
    dropped[:, match.parity::2] = dropped_a
    return dropped


class RoundsMask(SequenceMask, nn.Module):
    """A training-free-style mask made of static matching rounds (ToMe, ToFu, LTMP).

    Subclasses implement :meth:`merge_round`; this class handles prefix tokens, the static round
    sizes and the recording of what was merged (for visualisation).
    """

    parity = 0  # A = even tokens; ToMeMask(parity=1) swaps A and B

    def __init__(self, spec: MaskSpec, trainable_metric: bool = False) -> None:
        super().__init__()
        self.metric = KeyMetric(spec, trainable=trainable_metric)

    def round_flops(self, m: int, r: int, d: int) -> int:
        """FLOPs of one matching round over m tokens (the bipartite scores)."""
        na = (m + 1 - self.parity) // 2
        return 2 * na * (m - na) * d

    def flops(self, tokens: int, keep: int, prefix: int) -> int:
        """What FlopCounterMode counts for one image: the metric projection, then every round's scores."""
        D, d = self.metric.norm.normalized_shape[0], self.metric.phi.out_features
        m = tokens - prefix
        total = 2 * m * D * d
        for r in rounds(m, keep, self.parity):
            total += self.round_flops(m, r, d)
            m -= r
        return total

    def merge_round(self, x: torch.Tensor, s: torch.Tensor, metric: torch.Tensor, r: int, m: int, track: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """Remove ``r`` of the ``m`` tokens; returns (x, s, metric, tracker step arguments or None
        when ``track`` is False: the bookkeeping is only for visualisation)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                track: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens, sizes, and with ``track`` the output row of every input token, else None)."""
        zp, x, sp, s = split_prefix(z, sizes, prefix)
        metric = self.metric(x)
        m = x.shape[1]
        record = recorder()
        tracker = Tracker(x.shape[0], m, x.device) if (record is not None or track) else None
        s_in = s
        for r in rounds(m, keep, self.parity):
            x, s, metric, step = self.merge_round(x, s, metric, r, m, tracker is not None)
            if tracker is not None:
                tracker.step(*step)
            m -= r
        if tracker is not None and record is not None:
            tracker.record(record, keep, prefix, s_in)
        dest = None
        if track and tracker is not None:
            B = z.shape[0]
            dest = torch.cat([torch.arange(prefix, device=z.device).expand(B, prefix), tracker.slot + prefix], dim=1)
        merged, sizes_out = join_prefix(zp, x, sp, s)
        return merged, sizes_out, dest
