"""Fit each LTM mask's keep term to what merging each token costs (``finetune --fit-keep N``).

Why: gradient steps do not teach the keep term anything. The hard merge's choice of targets is
discrete, so its gradient never sees it, and the relaxed merge's gradient answers "should this
token weigh more", not "keep or merge it". Measured on the bundled DINOv2 at ratio 0.5, nothing
trained by gradient moved held-out agreement by more than 0.001, even when trained on the
photos it was scored on (benchmarks/README.md, "What the masks cannot learn"). Pricing each
merge directly, and choosing targets with those prices (an oracle), was worth +0.007.

How: on a few images, with every mask merging hard as it does at inference, each merge is priced
to first order:

* a merged-away token: how the rows it joined move with the mass it sent them, through the
  merge as it is computed: a size-weighted average that is then rescaled to the mean norm of
  what it holds (:func:`merge_prices`);
* a target: how it and its nearest other target would move if the two were merged.

Each move is pushed to the output by one backward pass per random direction. The directions are
orthogonal to the output, because agreement measures the output's direction. The price is the
sum of squares over the directions: how far merging the token would turn the output. No teacher
and no labels are needed, so the price belongs to the model and the image, not to an error that
some other image would not have. Then, per image, the prices are ranked, and each mask's ranks
are regressed on the mask's own keep features LN(z) with a closed-form ridge regression. The
fitted direction becomes the keep term: kappa = base + A tanh(scale w . LN(z) / A), which is
about base + scale x (the predicted rank of the price).

A price the features cannot predict gets no weight (the regression's R^2 is reported per block).
Prices measured against the teacher's error instead fitted with an R^2 of 0.002-0.017 and
transferred nothing.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.metrics import compared_output
from ltm_convert.merge.ltm_mask import KEEP_BOUND, LtmMask, _ranks
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.state import recording

KEEP_FIT_SCALE = 0.5  # predicted price ranks, in units of the base's standard deviation (see the module docstring)
KEEP_FIT_DIRECTIONS = 2  # backward passes per batch; the price is a sum of squares over them
KEEP_FIT_RIDGE = 1e-2  # ridge, relative to the mean feature variance


def merge_prices(rec: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
    """First-order price (B, M) of each mergeable token's merge, along the output direction whose
    gradient at the merged rows is ``grad`` (B, prefix + keep, D).

    A merged row is the size-weighted average a_k of what it holds, rescaled to the size-weighted
    mean norm n_k of those tokens (preserve_norms), so m_k = n_k a_k / |a_k|. Adding a little mass
    e of token i to row k of size S_k moves it by (e / S_k) [(|z_i| - |m_k|) u_k + c_k (z_i - u_k
    (u_k . z_i))] with u_k = m_k / |m_k| and c_k = |m_k| / |a_k|: the norm's share along the row,
    the average's across it. A merged-away token's price sums this over the rows it joined, with
    the mass it sent; a target's is the change from merging it with its nearest other target."""
    dtype = torch.float64 if rec["merged"].dtype == torch.float64 else torch.float32  # half precision widened

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype)

    z, merged, sizes, mass, g, phi = (wide(t) for t in (rec["z"], rec["merged"], rec["sizes"], rec["mass"], grad, rec["phi"]))
    slot, targets, others, prefix = rec["slot"], rec["targets"], rec["others"], rec["prefix"]
    B, K = targets.shape
    T = merged.shape[1]
    price = torch.zeros(B, K + others.shape[1], device=z.device, dtype=dtype)
    norm = merged.norm(dim=-1)  # (B, T)
    unit = merged / norm.clamp_min(1e-6).unsqueeze(-1)
    g_unit = (g * unit).sum(-1)  # (B, T)
    if others.shape[1]:
        z_o = take_rows(z, others + prefix)  # (B, R, D)
        full = torch.zeros(B, others.shape[1], T, device=z.device, dtype=dtype).scatter_(2, slot, mass)
        s_rows = wide(rec["s_rows"])
        average = (s_rows.unsqueeze(-1) * take_rows(z, rec["rows"]) + full.transpose(1, 2) @ z_o) \
            / sizes.clamp_min(1e-6).unsqueeze(-1)
        c = norm / average.norm(dim=-1).clamp_min(1e-6)

        def at(x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, R, k) at each token's rows
            return x.gather(1, slot.flatten(1)).view_as(slot)

        z_g = (z_o @ g.transpose(1, 2)).gather(2, slot)  # z_i . g_k
        z_u = (z_o @ unit.transpose(1, 2)).gather(2, slot)  # z_i . u_k
        share = mass / at(sizes).clamp_min(1e-6)
        move = (z_o.norm(dim=-1).unsqueeze(-1) - at(norm)) * at(g_unit) + at(c) * (z_g - at(g_unit) * z_u)
        price.scatter_(1, others, (share * move).sum(-1))
    if K > 1:  # merge each target with its nearest other target (norm-preserving, as the merge)
        pt = take_rows(phi, targets)
        cos = pt @ pt.transpose(1, 2)
        cos.diagonal(dim1=1, dim2=2).fill_(-4.0)
        near = cos.argmax(-1) + prefix
        m_r, g_r, s_r, n_r = merged[:, prefix:], g[:, prefix:], sizes[:, prefix:], norm[:, prefix:]
        m_u, g_u, s_u, n_u = take_rows(merged, near), take_rows(g, near), sizes.gather(1, near), norm.gather(1, near)
        total = (s_r + s_u).clamp_min(1e-6)
        both = (s_r.unsqueeze(-1) * m_r + s_u.unsqueeze(-1) * m_u) / total.unsqueeze(-1)
        both = both * ((s_r * n_r + s_u * n_u) / total / both.norm(dim=-1).clamp_min(1e-6)).unsqueeze(-1)
        price.scatter_(1, targets, (g_r * (both - m_r)).sum(-1) + (g_u * (both - m_u)).sum(-1))
    return price


class _Normal:
    """The ridge regression's sufficient statistics for one mask (float64)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.xty = torch.zeros(dim, dtype=torch.float64, device=device)
        self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yy += y @ y
        self.n += len(y)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.xtx.flatten(), self.xty, self.yy.view(1), self.n.view(1)])

    def load(self, flat: torch.Tensor) -> None:
        d = self.xty.numel()
        self.xtx.copy_(flat[:d * d].view(d, d))
        self.xty.copy_(flat[d * d:d * d + d])
        self.yy.copy_(flat[-2])
        self.n.copy_(flat[-1])


def keep_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every LTM mask's keep-term weight, by module name (to undo a fit)."""
    return {name: m.kappa.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LtmMask)}


def set_keep_terms(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LtmMask) and name in weights:
                m.kappa.weight.copy_(weights[name])


def fit_keep_terms(model: nn.Module, batches: Iterable[torch.Tensor], *, directions: int = KEEP_FIT_DIRECTIONS,
                   scale: float = KEEP_FIT_SCALE, ridge: float = KEEP_FIT_RIDGE, seed: int = 0,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Replace every LTM mask's keep term by the one fitted to first-order merge prices on
    ``batches`` (model inputs, as the model takes them). ``reduce`` sums the statistics across
    processes (DDP). Returns a report: images, seconds, and per mask the tokens and in-sample R^2."""
    masks = {name: m for name, m in model.named_modules() if isinstance(m, LtmMask)}
    if not masks:
        raise LtmError("--fit-keep fits the keep term of LTM masks, and this model has none "
                       "(convert it with the ltm method, version 2)")
    if directions < 1 or not scale >= 0 or not ridge > 0:
        raise LtmError(f"the keep fit needs directions >= 1, scale >= 0 and ridge > 0, got {directions}, {scale}, {ridge}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    stats = {name: _Normal(m.norm.normalized_shape[0], device) for name, m in masks.items()}
    # recordings name blocks by their ltm_name; the fit and its report name masks by module path
    mask_of = {id(m): name for name, m in masks.items()}
    by_block = {b.ltm_name: mask_of[id(b.ltm_mask)] for b in model.modules()
                if id(getattr(b, "ltm_mask", None)) in mask_of}
    was_training = model.training
    grads = {p: p.requires_grad for p in model.parameters()}
    gen = torch.Generator().manual_seed(seed)
    images = 0
    try:
        model.eval()  # the hard merge: the prices are those of the merge that runs at inference
        for p in model.parameters():
            p.requires_grad_(False)
        for x in batches:
            x = x.detach().clone() if x.is_floating_point() else x.float()
            x.requires_grad_(True)  # so the graph reaches the merged rows (every weight is frozen here)
            with recording(merges=True) as entries:
                out = compared_output(model, x)  # the vector agreement compares
            records = {by_block[e["block"]]: e["merge"] for e in entries
                       if "merge" in e and e["merge"]["merged"].requires_grad}
            for rec in records.values():
                rec["merged"].retain_grad()
            unit = F.normalize(out.detach(), dim=1)
            sums: dict[str, torch.Tensor] = {}
            for d in range(directions):
                v = torch.randn(out.shape, generator=gen).to(out.device)
                v = v - (v * unit).sum(1, keepdim=True) * unit  # a turn of the output, not a stretch
                v = v / out.detach().norm(dim=1, keepdim=True).clamp_min(1e-6)
                for rec in records.values():
                    rec["merged"].grad = None
                (out * v).sum().backward(retain_graph=d < directions - 1)
                for name, rec in records.items():
                    if rec["merged"].grad is not None:
                        sums[name] = sums.get(name, 0) + merge_prices(rec, rec["merged"].grad) ** 2
            for name, price in sums.items():
                rec, m = records[name], masks[name]
                with torch.no_grad():
                    weight, bias = (None if t is None else t.float() for t in (m.norm.weight, m.norm.bias))
                    feats = F.layer_norm(rec["z"].detach().float(), m.norm.normalized_shape, weight, bias,
                                         m.norm.eps)[:, rec["prefix"]:]
                    feats = feats - feats.mean(1, keepdim=True)  # the base is ranked per image: offsets rank nothing
                    stats[name].add(feats.reshape(-1, feats.shape[-1]), _ranks(price).reshape(-1))
            images += len(x)
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if reduce is not None:
        for s in stats.values():
            s.load(reduce(s.flat()))
    report: dict[str, Any] = {"images": images, "blocks": {}}
    with torch.no_grad():
        for name, m in masks.items():
            s = stats[name]
            if float(s.n) == 0:  # never merged (keeps every token): its keep term does not matter
                continue
            eye = torch.eye(len(s.xty), dtype=torch.float64, device=device)
            w = torch.linalg.solve(s.xtx + ridge * s.xtx.diagonal().mean() * eye, s.xty)
            r2 = float((2 * w @ s.xty - w @ s.xtx @ w) / s.yy.clamp_min(1e-12))
            m.kappa.weight.copy_((scale * w / KEEP_BOUND).view_as(m.kappa.weight).to(m.kappa.weight.dtype))
            report["blocks"][name] = {"tokens": int(s.n), "r2": round(r2, 4)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
