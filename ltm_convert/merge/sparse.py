"""Merge arithmetic on token sequences: redundancy scores, sparse and dense size-weighted merges,
and the norm-preserving correction. No model knowledge; shared by the LTM masks."""
from __future__ import annotations

import torch

from ltm_convert.merge.rows import add_rows, put_rows, take_rows


def redundancy(phi: torch.Tensor, row_blocks: int = 4) -> torch.Tensor:
    """Each token's max cosine to an earlier token, phi (B, M, d) unit rows -> (B, M), -1 for the first.

    Only the lower triangle of the M x M scores matters, so rows are taken in ``row_blocks`` bands,
    each against the columns up to its end: 10/16 of the full GEMM for four bands. Later tokens
    (and the token itself) are pushed below -1 by a constant bias fused into the GEMM, then clamped.
    """
    M = phi.shape[1]
    bands = row_blocks if M >= 16 * row_blocks else 1
    edges = [i * M // bands for i in range(bands + 1)]
    parts = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        later = torch.full((r1 - r0, r1), -3.0, dtype=phi.dtype, device=phi.device).triu(r0)
        parts.append(torch.baddbmm(later, phi[:, r0:r1], phi[:, :r1].transpose(1, 2)).amax(dim=-1))
    return torch.cat(parts, dim=1).clamp_min(-1.0)


def merge_dense(z_rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor, mass: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x~_t = (s_t z_t + sum_i m_it z_i) / s~_t with s~_t = s_t + sum_i m_it, every token to every target.

    z_rows (B, T, D) output rows, s_rows (B, T), z_o (B, R, D) merged-away tokens, mass (B, R, T).
    The division is folded into the weights.
    """
    new_sizes = s_rows + mass.sum(dim=1)
    inv = new_sizes.reciprocal()
    merged = z_rows * (s_rows * inv).unsqueeze(-1).to(z_rows.dtype)
    # out of place: FlopCounterMode does not count the in-place baddbmm_, and the FLOPs must be honest
    return torch.baddbmm(merged, (mass * inv.unsqueeze(1)).transpose(1, 2).to(z_rows.dtype), z_o), new_sizes


def _sparse_delta(z: torch.Tensor, rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor,
                  mass: torch.Tensor, slot: torch.Tensor):
    """What both sparse merges share: (flat slots (B, R k), new sizes (B, T), each slot's target row
    z_t (B, R k, D), the update (m_it / s~_t)(z_i - z_t) of each slot (B, R k, D))."""
    B, R, k = mass.shape
    D = z.shape[-1]
    flat_slot, flat_mass = slot.reshape(B, R * k), mass.reshape(B, R * k)
    new_sizes = s_rows.scatter_add(1, flat_slot, flat_mass)
    weight = (flat_mass / new_sizes.gather(1, flat_slot)).view(B, R, k, 1).to(z.dtype)
    z_t = take_rows(z, rows.gather(1, flat_slot))
    delta = (weight * (z_o.unsqueeze(2) - z_t.view(B, R, k, D))).view(B, R * k, D)
    return flat_slot, new_sizes, z_t, delta


def merge_sparse(z: torch.Tensor, rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor,
                 mass: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same merge when every token reaches only k targets: mass (B, R, k), slot (B, R, k) output rows.

    Written as x~_t = z_t + sum_i (m_it / s~_t)(z_i - z_t), only the R x k touched rows are read and
    updated; the other output rows are plain copies.
    """
    flat_slot, new_sizes, _, delta = _sparse_delta(z, rows, s_rows, z_o, mass, slot)
    return add_rows(take_rows(z, rows), flat_slot, delta), new_sizes


def merge_sparse_keep_norms(z: torch.Tensor, rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor,
                            mass: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_sparse` followed by :func:`preserve_norms`, on the R x k touched rows only.

    A row nothing reached is its own token again (scale 1), so the norm correction only needs the
    touched rows: their own norms, the norms of what they received, their merged norms. Done over
    whole (B, T, D) tensors it was four extra passes (two norms, two row scalings), each as dear at
    batch 32 as the merge itself; here every pass is R x k rows long (R k ~ T / 2 at ratio 0.5).
    """
    B, R, k = mass.shape
    flat_slot, new_sizes, z_t, delta = _sparse_delta(z, rows, s_rows, z_o, mass, slot)
    out = add_rows(take_rows(z, rows), flat_slot, delta)
    # the size-weighted norm each touched row should have: (|z_t| s_t + sum_i m_it |z_i|) / s~_t; a
    # row reached several times writes the same own term each time
    own = (z_t.float().norm(dim=-1) * s_rows.gather(1, flat_slot)).to(new_sizes.dtype)
    sent = (mass * z_o.float().norm(dim=-1).unsqueeze(-1)).reshape(B, R * k).to(new_sizes.dtype)
    weighted = torch.zeros_like(new_sizes).scatter(1, flat_slot, own).scatter_add(1, flat_slot, sent)
    merged = take_rows(out, flat_slot)
    scale = (weighted / new_sizes).gather(1, flat_slot) / merged.float().norm(dim=-1).clamp_min(1e-6)
    return put_rows(out, flat_slot, merged * scale.unsqueeze(-1).to(merged.dtype)), new_sizes


def partner_cosines(phi: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Every token's cosine to every other, (B, M, M) from phi (B, M, d) unit rows, with a token's
    cosine to itself (and, given ``present`` (B, M) bool, to absent tokens) pushed below -1, so that
    no row maximum lands there. In place after the GEMM: a bias given to baddbmm is first copied
    out to (B, M, M), a pass as dear as adding it; the diagonal alone is cheaper still, but the
    TorchScript ONNX exporter drops a ``diagonal().fill_()``, so an export adds the bias."""
    M = phi.shape[1]
    cos = torch.bmm(phi, phi.transpose(1, 2))
    if present is not None or torch.onnx.is_in_onnx_export():
        idx = torch.arange(M, device=phi.device)
        bias = (idx[:, None] == idx[None, :]).to(phi.dtype) * 4.0
        if present is not None:
            bias = bias + (~present).to(phi.dtype).unsqueeze(1) * 8.0
        return cos.sub_(bias)
    cos.diagonal(dim1=1, dim2=2).fill_(-4.0)
    return cos


def mutual_redundancy_(cos: torch.Tensor) -> torch.Tensor:
    """Each token's best cosine to any other token, (B, M) from :func:`partner_cosines` (B, M, M),
    which it overwrites (a scratch pass in place: every fresh (B, M, M) temporary costs about as much
    as the GEMM that made it, at batch 32 on CPU); of two tokens that are each other's best match
    only the later one counts as redundant (its partner stays).

    "Redundant to an earlier token" (``redundancy``) lets chains A ~ B ~ C leave B and C both, and C
    then lands on a far target; a mutual pair here keeps one of its two, as ToMe's bipartite split
    keeps every B token, without ToMe's arbitrary even/odd split. Measured on 350 photos (bundled
    DINOv2, ratios 0.65 / 0.5), scoring against the other half only (ToMe's split, a quarter of the
    GEMM) loses 0.0012 / 0.0027 mean agreement and "redundant to an earlier token" 0.0010 / 0.0017,
    so the full matrix and the mutual rule stay.
    """
    M = cos.shape[-1]
    idx = torch.arange(M, device=cos.device)
    best = cos.amax(dim=-1, keepdim=True)
    # the partner is the first column holding the row's maximum, found with a plain max (``max``
    # with indices runs scalar code on CPU, 2.5-2.9 ms at batch 32): rev_j = M - j where cos_ij is
    # the maximum, and far below 0 elsewhere, since a smaller cosine is at least one ulp of the
    # maximum below it (6e-8 near 1, 7e-9 near 0.1 in float32; times 1e30, far beyond M); only a
    # row whose best cosine is within ~1e-20 of 0 could be tie-broken differently from ``max``
    rev = torch.arange(M, 0, -1, device=cos.device, dtype=cos.dtype)
    partner = M - cos.sub_(best).mul_(1e30).add_(rev).amax(dim=-1).long()
    partner = partner.clamp_(0, M - 1)  # a NaN row (diverged weights) must still index in range
    best = best.squeeze(-1)
    mutual = partner.gather(1, partner) == idx
    return torch.where(mutual & (partner > idx), best - 2.0, best)


def preserve_norms(merged: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, s_rows: torch.Tensor,
                   others: torch.Tensor, mass: torch.Tensor, slot: torch.Tensor, new_sizes: torch.Tensor) -> torch.Tensor:
    """Rescale every merged row to the size-weighted mean norm of the tokens it received.

    Averaging shrinks a token's norm (ToFu's observation: the average of unit vectors pointing apart
    is shorter), which shifts the features the next LayerNorm sees; measured on the bundled DINOv2
    this correction is worth +0.003-0.006 mean agreement at ratio 0.5.
    merged (B, T, D) output rows, rows (B, T) their source rows in z, s_rows (B, T), others (B, R)
    merged-away rows of z, mass / slot (B, R, k) the mass each sends and the output row it goes to.
    """
    B = z.shape[0]
    norms = z.float().norm(dim=-1)  # (B, N)
    weighted = norms.gather(1, rows) * s_rows
    sent = (mass * norms.gather(1, others).unsqueeze(-1)).reshape(B, -1)
    weighted = weighted.scatter_add(1, slot.reshape(B, -1), sent)
    scale = (weighted / new_sizes) / merged.float().norm(dim=-1).clamp_min(1e-6)
    return merged * scale.unsqueeze(-1).to(merged.dtype)
