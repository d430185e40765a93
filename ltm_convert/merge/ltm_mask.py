"""The LTM mask for token sequences: choose targets per image, merge every other token softly into them.

Untrained it already merges at least as well as ToMe (benchmarks/README.md); trained, every part
of it learns from a signal that means something (docs/internals.md, "The LTM mask"):

* metric phi = normalize(W_phi LN(z)) (:class:`MergeMetric`), started as the block's mean key;
* keep score kappa = base + A tanh(w . LN(z)): ``base`` is the rank (per image, spread over unit
  deviation) of the negative mutual redundancy (:func:`mutual_redundancy`); the learned term is bounded by A (it can
  move a token by at most A standard deviations of the base), starts at 0 (w = 0, so an
  untrained mask is exactly the base). It learns what merging each token costs from a closed-form
  fit to first-order merge prices (ltm_convert/finetune/keep_fit.py, ``finetune --fit-keep``).
  Gradient steps through the relaxed merge (:meth:`LtmMask.forward_soft`) also reach it, but
  measured, they teach it nothing;
* the K tokens with the highest kappa are targets; every other token spreads over its k nearest
  targets by a softmax of its cosines scaled by their spread across the targets and by a learned
  temperature tau (so tau means the same in every block and its gradient is not vanishingly small);
* size-weighted merge of the R x k touched rows, then every merged row gets the size-weighted mean
  norm of what it received (:func:`merge_sparse_keep_norms`, touched rows only).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.merge.methods import DEFAULT_TOPK
from ltm_convert.merge.metric import MergeMetric, no_autocast
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.sparse import (
    merge_dense,
    merge_sparse_keep_norms,
    mutual_redundancy_,
    partner_cosines,
    preserve_norms,
)
from ltm_convert.merge.methods import merge_method
from ltm_convert.merge.state import (
    SequenceMask,
    destination_rows,
    record_assignment,
    recorder,
    recording_merges,
)

TAU_RATE = 10.0  # tau's own learning rate, as a multiple of the mask's (see LtmMask.__init__)
TAU = 0.02  # initial temperature on spread-normalised cosines (measured best untrained, see benchmarks)
SOFT_KEEP_BAND = 0.02  # relaxed top-k of training: t goes from 0.88 to 0.12 across +-2% of the ranks (soft ~ hard: 0.978 vs 0.983)
GRAD_KEEP_T = 1.0  # the gradient's keep gate: sigmoid((kappa - theta) / 1 standard deviation of the score)
GRAD_COS_T = 0.1  # the gradient's assignment: softmax(cos / 0.1) at the initial tau (absolute, not per spread)
EMPTY = 0.05  # a relaxed token holding less than this is treated as emptied where sizes divide
KEEP_BOUND = 2.0  # A: the learned keep term moves a token by at most 2 standard deviations of the base


def _straight(forward: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """The value of ``forward`` with the gradient of ``gradient`` (a smooth surrogate)."""
    return gradient + (forward - gradient).detach()


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation along the last dim (keepdim), as ``std`` computes it but from a norm of the
    centred values: ``std``'s one-pass kernel ran 8-10x slower on CPU (0.9 ms against 0.1 ms on
    (32, 30, 226) cosines)."""
    n = x.shape[-1]
    return torch.linalg.vector_norm(x - x.mean(dim=-1, keepdim=True), dim=-1, keepdim=True) / math.sqrt(max(n - 1, 1))


def _ranks(x: torch.Tensor, present: torch.Tensor | None = None, with_order: bool = False):
    """Each token's rank in x per image, spread evenly over zero mean and unit deviation (among the
    ``present`` tokens when given; the others rank below them); with ``with_order`` also the
    ascending order (B, M) the ranks come from.

    The base keep score is used by rank: its raw values are cosines that saturate (in early blocks
    most tokens sit within 1% of a standard deviation of each other, the mutual pairs 2 below), so
    a learned term added to the standardised raw score reordered nearly every token at its first
    Adam step (measured: agreement 0.983 -> 0.95 after 3 steps). Ranks give the learned term a
    scale it can use: moving a token by 0.1 moves it by about 3% of the ranks.
    """
    if present is not None:
        x = x.masked_fill(~present, float("-inf"))
    M = x.shape[-1]
    order = x.argsort(dim=-1)  # one sort; the ranks are scattered back, not sorted for again
    r = torch.empty_like(order).scatter_(-1, order, torch.arange(M, device=x.device).expand_as(order)).to(torch.float32)
    if present is None:
        r = (r / max(M - 1, 1) - 0.5) * math.sqrt(12.0)
    else:
        n = present.sum(-1, keepdim=True).to(torch.float32)
        first = M - n  # the present tokens hold the top n ranks
        r = ((r - first) / (n - 1).clamp_min(1.0) - 0.5) * math.sqrt(12.0)
    return (r, order) if with_order else r


def _all_zero_on_cpu(x: torch.Tensor) -> bool:
    """Whether x is exactly zero, asked only where the answer is free: eager CPU tensors (on a GPU
    the question is a device sync; traced or exported graphs must not depend on a value)."""
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    exporting = getattr(torch.compiler, "is_exporting", None)  # not in every torch this package allows
    if torch.compiler.is_compiling() or (exporting is not None and exporting()):
        return False
    return not bool(x.any())


def _split_in_order(order: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first ``keep`` tokens of ``order`` (B, M), the rest), each in their original order:
    where each token goes is counted out with two cumsums and one scatter (a sort of the targets
    cost three times as much at batch 32)."""
    B, M = order.shape
    t = torch.zeros(B, M, dtype=torch.long, device=order.device).scatter_(1, order[:, :keep], 1)  # 1 = target
    slot = torch.where(t > 0, t.cumsum(-1) - 1, keep + (1 - t).cumsum(-1) - 1)
    split = torch.empty_like(order).scatter_(1, slot, torch.arange(M, device=order.device).expand(B, M))
    return split[:, :keep], split[:, keep:]


class LtmMask(SequenceMask, MergeMetric):
    """Targets by keep score, spread-normalised soft assignment to the k nearest targets."""

    version = 2

    def __init__(self, dim: int, metric_dim: int, topk: int = DEFAULT_TOPK, tau: float = TAU) -> None:
        super().__init__(dim, metric_dim)
        # no bias: the base is standardised per image, so a constant shift ranks nothing (its gradient
        # would be zero up to rounding, and Adam turns rounding noise into full-size steps)
        self.kappa = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.kappa.weight)
        # log tau = TAU_RATE * tau_param: Adam moves a parameter by about its learning rate per step,
        # so tau learns TAU_RATE times faster than the other mask parameters (its gradient is small)
        self.tau_param = nn.Parameter(torch.tensor(math.log(tau) / TAU_RATE))
        self.topk = topk

    def tau(self) -> torch.Tensor:
        return (TAU_RATE * self.tau_param).exp()

    def extra_repr(self) -> str:
        return f"topk={self.topk}"

    def _project(self, z: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi (B, M, d) unit rows, learned keep term (B, M)) of the mergeable tokens."""
        return self.metric_and_score(z, self.kappa, prefix)

    def _inputs(self, z: torch.Tensor, sizes: torch.Tensor | None,
                prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sizes, mergeable sizes as float, phi, learned keep term): what both merges start from."""
        if sizes is None:
            sizes = z.new_ones(z.shape[0], z.shape[1], dtype=torch.float32)
        phi, learned = self._project(z, prefix)
        return sizes, sizes[:, prefix:].float(), phi, learned

    def flops(self, tokens: int, keep: int, prefix: int) -> int:
        """What FlopCounterMode counts for one image (tests/test_schedule.py checks it): the fused
        projection, the token-token cosines, the target logits, the dense merge GEMM if dense."""
        D, d = self.norm.normalized_shape[0], self.phi.out_features
        M = tokens - prefix
        R = M - keep
        total = 2 * tokens * D * (d + 1) + 2 * M * M * d + 2 * R * keep * d
        if not 0 < self.topk < keep:
            total += 2 * (prefix + keep) * R * D
        return total

    def soft(self) -> bool:
        """Training mode relaxes the merge (see :meth:`forward_soft`); eval mode merges hard. Not tied
        to grad mode: reentrant checkpointing runs the forward without gradients and again with them,
        and both runs must take the same path."""
        return self.training

    def forward_soft(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int,
                     keep: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The continuous relaxation used while training (DTEM's idea, our formulation): every token
        stays, with a target weight t_i = sigmoid((kappa_i - theta) / T) where theta sits between the
        keep-th and the next score and T spans a band of ranks around it, so about ``keep`` tokens are targets. A token keeps t_i of its mass
        and sends the rest to the others in proportion to t * softmax(cos / spread / tau); its new size
        is what it holds. Tokens left with ~0 size drop out of later attention through the log-size
        bias, as merged-away tokens do. The loss then reaches the metric, the temperature and the keep
        score smoothly; at inference the same scores make the hard decisions of :meth:`forward`.
        """
        M = z.shape[1] - prefix
        sizes, sm, phi, learned = self._inputs(z, sizes, prefix)
        with no_autocast(z):
            present = sm > 0.5  # tokens a hard merge would still have
            # the base score is a rank statistic of saturated cosines: its gradient (~1 / its spread)
            # is noise, so the keep decision learns through the bounded learned term only
            base = _ranks(-mutual_redundancy_(partner_cosines(phi.detach(), present)), present)
            kappa = base + KEEP_BOUND * torch.tanh(learned)
            kappa = kappa + sm.detach().clamp(1e-6, 1.0).log().clamp_min(-30.0)  # emptied tokens are no targets
            # threshold between the keep-th and the next score; its softness is measured in ranks, not
            # in score units: cosines saturate in early blocks, where most scores sit within 1% of a
            # standard deviation of each other and any fixed temperature would make every t ~ 0.5
            w = max(1, round(SOFT_KEEP_BAND * M))
            top = kappa.detach().topk(min(keep + w + 1, M), dim=-1).values
            theta = (top[:, keep - 1:keep] + top[:, min(keep, M - 1):min(keep, M - 1) + 1]) / 2
            hi, lo = top[:, max(keep - 1 - w, 0)], top[:, -1]
            gap = (hi - lo).clamp_min(1e-6).unsqueeze(-1)
            u = 4.0 * (kappa - theta) / gap if keep < M else torch.full_like(kappa, 30.0)
            u_smooth = (kappa - theta) / GRAD_KEEP_T if keep < M else u
            # forward: the sharp relaxation (it computes what the hard merge does); backward: a smooth
            # one (a band of a few ranks and tau give gradients ~1/gap and ~1/(spread tau) large that
            # predict nothing a step away: measured, a step along them raised the loss)
            t = _straight(torch.sigmoid(u), torch.sigmoid(u_smooth))  # (B, M)
            cos = phi @ phi.transpose(1, 2)
            eye = torch.eye(M, dtype=torch.bool, device=z.device)
            spread = _spread(cos.masked_fill(eye, 0.0)).clamp_min(1e-4)
            # the target gate log t sits inside the temperature, on the scale of the spread-normalised
            # cosines: outside it (a prior of log t) it is swamped by cosine logits ~1/tau large, and
            # tokens that merge away would take each other's mass, which the hard merge never does
            # tau's gradient is the sharp assignment's own (the surrogate's has the wrong sign for it);
            # the metric's and the keep term's come from the smooth surrogate
            tau = self.tau()
            sharp = (cos.detach() / spread.detach() + F.logsigmoid(u.detach()).unsqueeze(1)) / tau
            smooth = cos / (GRAD_COS_T * tau.detach() / TAU) + F.logsigmoid(u_smooth).unsqueeze(1)
            sharp_assign = torch.softmax(sharp.masked_fill(eye, float("-inf")), dim=-1)
            smooth_assign = torch.softmax(smooth.masked_fill(eye, float("-inf")), dim=-1)
            # the sharp value, with the surrogate's gradient added to its own (tau-only) gradient
            assign = sharp_assign + smooth_assign - smooth_assign.detach()  # (B, M, M) from -> to
            stay = t * sm  # mass each token keeps
            send = (1.0 - t) * sm  # mass each token sends
            flow = assign * send.unsqueeze(-1)  # (B, M from, M to)
            new_sm = stay + flow.sum(1)
            zm = z[:, prefix:].float()
            held = stay.unsqueeze(-1) * zm + flow.transpose(1, 2) @ zm
            norms = zm.norm(dim=-1)
            # the merged row: the direction of what it holds, the size-weighted mean norm of what it
            # received; emptied rows (size -> 0) are hidden from later attention, and a floor on their
            # size keeps the surrogate gradient of the ratio finite there
            target_norm = (stay * norms + (flow * norms.unsqueeze(-1)).sum(1)) / new_sm.clamp_min(EMPTY)
            merged = held * (target_norm / held.norm(dim=-1).clamp_min(1e-6)).unsqueeze(-1)
        out = torch.cat([z[:, :prefix], merged.to(z.dtype)], dim=1)
        new_sizes = torch.cat([sizes[:, :prefix].float(), new_sm], dim=1)
        return out, new_sizes.to(sizes.dtype), None

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                track: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Merge z (B, N, D) into prefix + keep tokens: (tokens, sizes (B, prefix + keep), and with
        ``track`` the output row of every input token (B, N), else None). In training mode, the relaxed merge of :meth:`forward_soft` (all N tokens stay)."""
        if self.soft():
            return self.forward_soft(z, sizes, prefix, keep)
        B, N, _ = z.shape
        M = N - prefix
        R = M - keep
        sizes, sm, phi, learned = self._inputs(z, sizes, prefix)
        with no_autocast(z):
            base, ascending = _ranks(-mutual_redundancy_(partner_cosines(phi)), with_order=True)
            if _all_zero_on_cpu(learned):  # an untrained keep term: kappa is the base, already sorted
                order = ascending.flip(-1)
            else:  # top-k, not a sort: deterministic for a given input and ONNX-exportable
                order = (base + KEEP_BOUND * torch.tanh(learned)).detach().topk(M, dim=-1).indices
            targets, others = _split_in_order(order, keep)  # (B, K), (B, R)
            cos = take_rows(phi, others) @ take_rows(phi, targets).transpose(1, 2)  # (B, R, K)
            k = self.topk if 0 < self.topk < keep else keep
            top, near = cos.topk(k, dim=-1)  # nearest targets first
            spread = _spread(cos).clamp_min(1e-4) if keep > 1 else torch.ones_like(top[..., :1])
            assign = torch.softmax((top - top[..., :1]) / spread / self.tau(), dim=-1)  # (B, R, k)

            rows = torch.cat([torch.arange(prefix, device=z.device).expand(B, prefix), targets + prefix], dim=1)
            s_rows = sizes.gather(1, rows).float()
            mass = assign * sm.gather(1, others).unsqueeze(-1)  # s_i * A_it
        z_o = take_rows(z, others + prefix)
        slot_rows = near + prefix
        if k == keep and not 0 < self.topk < keep:  # every target reachable: one dense GEMM
            full = torch.zeros(B, R, prefix + keep, dtype=mass.dtype, device=z.device).scatter_(2, slot_rows, mass)
            merged, new_sizes = merge_dense(take_rows(z, rows), s_rows, z_o, full)
            merged = preserve_norms(merged, z, rows, s_rows, others + prefix, mass, slot_rows, new_sizes)
        else:
            merged, new_sizes = merge_sparse_keep_norms(z, rows, s_rows, z_o, mass, slot_rows)
        dest = None
        if track:  # targets go to their own row; the others to their strongest target's row
            dest = destination_rows(targets, others, slot_rows[..., 0], prefix, keep)
        record_assignment(targets, others, assign, near, sm, prefix)
        if recording_merges():  # the keep fit's prices (finetune/keep_fit.py)
            recorder()[-1]["merge"] = {"z": z, "targets": targets, "others": others, "mass": mass, "slot": slot_rows,
                                       "merged": merged, "sizes": new_sizes, "prefix": prefix, "phi": phi,
                                       "rows": rows, "s_rows": s_rows}
        return merged, new_sizes.to(sizes.dtype), dest


@merge_method("ltm")
def build_mask(spec: Any) -> nn.Module:
    """The learnable LTM mask of one block (version 2, or version 1 to replay a 0.1.0 file)."""
    from ltm_convert.merge.metric import metric_dim

    if getattr(spec, "version", 2) == 1:
        from ltm_convert.merge.ltm_mask_v1 import build_mask_v1

        return build_mask_v1(spec)
    mask = LtmMask(spec.dim, metric_dim(spec.attn, spec.dim), topk=spec.topk)
    mask.init_from_block(spec.block, spec.attn, spec.pre_norm, spec.dim)
    return mask
