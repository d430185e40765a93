"""The first LTM mask (ltm_convert 0.1.0), kept so that files saved by that version load and compute
exactly what they computed. New conversions use merge/ltm_mask.py (see docs/internals.md for why).

phi = normalize(W_phi LN(z)) (:class:`MergeMetric`) is the merge metric, initialised from the
block's own key projection so an untrained mask merges tokens the attention sees as alike. The
keep score is kappa = w_kappa . LN(z) + w_size * log(s) - (max cosine to an earlier token): the
first token of each group of near-duplicates is kept, the rest merge into targets. Merged-away
tokens spread over the targets by softmax(cos / tau); ``topk > 0`` restricts each one to its k
most similar targets, so only the R x k touched rows are updated (:func:`merge_sparse`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.merge.methods import DEFAULT_TOPK
from ltm_convert.merge.metric import MergeMetric
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.sparse import merge_dense, merge_sparse, redundancy
from ltm_convert.merge.state import SequenceMask, destination_rows, record_assignment


class LtmMaskV1(SequenceMask, MergeMetric):
    """Targets by keep score, soft assignment of the other tokens to their nearest targets."""

    def __init__(self, dim: int, metric_dim: int, topk: int = DEFAULT_TOPK, tau: float = 1e-3,
                 use_sizes: bool = True) -> None:
        super().__init__(dim, metric_dim)
        self.kappa = nn.Linear(dim, 1)
        nn.init.zeros_(self.kappa.weight)
        nn.init.zeros_(self.kappa.bias)
        # the first block sees no earlier merge, so a weight on log(size) would never learn there
        self.size_weight = nn.Parameter(torch.zeros(())) if use_sizes else None
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.topk = topk

    def _project(self, z: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi (B, M, d) unit rows, learned keep term (B, M)) of the mergeable tokens."""
        return self.metric_and_score(z, self.kappa, prefix)

    def flops(self, tokens: int, keep: int, prefix: int) -> int:
        """What FlopCounterMode counts for one image (tests/test_ltm_mask.py checks it): the fused
        projection, the banded redundancy GEMMs, the target logits, the dense merge GEMM."""
        D, d = self.norm.normalized_shape[0], self.phi.out_features
        M = tokens - prefix
        R = M - keep
        total = 2 * tokens * D * (d + 1)
        bands = 4 if M >= 64 else 1
        edges = [i * M // bands for i in range(bands + 1)]
        total += sum(2 * (r1 - r0) * r1 * d for r0, r1 in zip(edges[:-1], edges[1:]))
        total += 2 * R * keep * d
        if not 0 < self.topk < keep:  # dense merge: one (prefix + K) x R x D GEMM
            total += 2 * (prefix + keep) * R * D
        return total

    def keep_score(self, learned: torch.Tensor, phi: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """kappa (B, M) from the learned term w_kappa . LN(z) (B, M): the top-M' become targets."""
        kappa = learned - redundancy(phi)
        if self.size_weight is not None:
            kappa = kappa + self.size_weight.to(learned.dtype) * sizes.log().to(learned.dtype)
        return kappa

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                track: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Merge z (B, N, D) into prefix + keep tokens: (tokens, sizes (B, prefix + keep), and with
        ``track`` the output row of every input token (B, N), else None)."""
        B, N, D = z.shape
        M = N - prefix
        if sizes is None:
            sizes = z.new_ones(B, N, dtype=torch.float32)
        sm = sizes[:, prefix:]
        phi, learned = self._project(z, prefix)
        kappa = self.keep_score(learned, phi, sm)

        # top-k, not a sort: deterministic for a given input and ONNX-exportable
        order = kappa.topk(M, dim=-1).indices
        targets = order[:, :keep].sort(dim=-1).values  # (B, K) kept in their original order
        others = order[:, keep:]  # (B, R)

        # each merged-away token spreads its mass over the targets: A = softmax(phi_o . phi_t / tau)
        logits = (take_rows(phi, others) @ take_rows(phi, targets).transpose(1, 2)) / self.log_tau.exp()
        near = None
        if 0 < self.topk < keep:  # locality: only the k most similar targets (sparse merge below)
            logits, near = logits.topk(self.topk, dim=-1)  # (B, R, k)
        # sizes and merge weights in float32 (half-precision sums of sizes drift); tokens in z's dtype
        wdt = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        assign = torch.softmax(logits, dim=-1).to(wdt)  # (B, R, K) or (B, R, k)

        # Output rows are [prefix tokens, targets]: one row gather from z, no concatenation.
        rows = torch.cat([torch.arange(prefix, device=z.device).expand(B, prefix), targets + prefix], dim=1)
        s_rows = sizes.gather(1, rows).to(wdt)
        s_o = sm.gather(1, others).to(wdt)
        if kappa.requires_grad:  # straight-through gate: value 1, gradient tells kappa whether keeping a token helped
            gate = torch.sigmoid(kappa).to(wdt)
            st = gate - gate.detach()
            s_rows = s_rows * (1.0 + F.pad(st.gather(1, targets), (prefix, 0)))
            s_o = s_o * (1.0 - st.gather(1, others))
        mass = assign * s_o.unsqueeze(-1)  # s_i * A_it
        z_o = take_rows(z, others + prefix)
        if near is None:
            merged, new_sizes = merge_dense(take_rows(z, rows), s_rows, z_o, F.pad(mass, (prefix, 0)))
        else:
            merged, new_sizes = merge_sparse(z, rows, s_rows, z_o, mass, near + prefix)
        dest = None
        if track:  # targets go to their own row; the others to their strongest target's row
            best = assign.argmax(-1, keepdim=True)
            best = (near.gather(2, best) if near is not None else best)[..., 0] + prefix
            dest = destination_rows(targets, others, best, prefix, keep)
        record_assignment(targets, others, assign, near, sm, prefix)
        return merged, new_sizes.to(sizes.dtype), dest


def build_mask_v1(spec) -> LtmMaskV1:
    from ltm_convert.merge.metric import metric_dim

    mask = LtmMaskV1(spec.dim, metric_dim(spec.attn, spec.dim), topk=spec.topk, use_sizes=not spec.first)
    mask.init_from_block(spec.block, spec.attn, spec.pre_norm, spec.dim)
    return mask
