"""LTM merging for blocks that run on a 2-D patch grid (MobileViT, timm and HF).

MobileViT unfolds a (B, C, H, W) feature map into B x P sequences of n_h x n_w patch tokens (P
pixel positions per patch), runs a few transformer blocks, and folds the map back, so it needs
every patch at the end and the same merge in all P sequences. ltm-method.md section 2.3 gives the
rule used here:

* the first block of each group merges after its attention onto a regular h' x w' sub-grid of
  targets, chosen evenly per row and column (the aspect ratio is kept);
* every token spreads its mass over the (up to) 2 x 2 targets around its position, with
  softmax(cos(phi_i, phi_t) / tau) weights; phi is averaged over the P sequences, so all P
  sequences merge identically;
* the later blocks of the group run on the h' x w' tokens with proportional attention;
* the last block of the group unmerges, z_i = sum_t A_it x~_t, so the fold sees the full grid.

The schedule picks h' x w' per group from the FLOPs measured with torch.utils.flop_counter. The
grid constraint makes the reachable FLOPs ratios discrete (and bounded by the share of FLOPs the
transformers hold), so the closest reachable schedule is chosen and reported.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.block_graph import bind_call, split_block
from ltm_convert.errors import LtmError
from ltm_convert.ltm_block import LtmBlock, LtmContext
from ltm_convert.rewriters.sequence import init_mask, metric_dim
from ltm_convert.tracer import ConversionPlan


def grid_options(h: int, w: int) -> list[tuple[int, int]]:
    """The reachable target grids for an h x w grid, fewest tokens first: rows and columns are
    reduced together so the merged tokens keep the grid's aspect ratio."""
    seen, out = set(), []
    for hk in range(1, h + 1):
        wk = max(1, min(w, int(round(hk * w / h))))
        if hk * wk not in seen:
            seen.add(hk * wk)
            out.append((hk, wk))
    return out


def axis_targets(n: int, k: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Target positions along one axis and, per source position, its two nearest targets."""
    targets = [min(n - 1, int(math.floor((i + 0.5) * n / k))) for i in range(k)]
    near = []
    for y in range(n):
        u = (y + 0.5) * k / n - 0.5
        lo = max(0, min(k - 1, int(math.floor(u))))
        near.append((lo, min(k - 1, lo + 1)))
    return targets, near


def grid_geometry(h: int, w: int, hk: int, wk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets (K,), candidates (N, 4), valid (N, 4)): the token index of each target, the 2 x 2
    targets around every source token, and which of those four are distinct."""
    rows, near_r = axis_targets(h, hk)
    cols, near_c = axis_targets(w, wk)
    targets = torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.long)
    cand, valid = [], []
    for y in range(h):
        r0, r1 = near_r[y]
        for x in range(w):
            c0, c1 = near_c[x]
            cand.append([r0 * wk + c0, r0 * wk + c1, r1 * wk + c0, r1 * wk + c1])
            valid.append([True, c1 != c0, r1 != r0, r1 != r0 and c1 != c0])
    return targets, torch.tensor(cand, dtype=torch.long), torch.tensor(valid, dtype=torch.bool)


class GridMask(nn.Module):
    """Merges (B*P, h*w, C) tokens onto an h' x w' target grid; keeps the weights for the unmerge.

    phi = normalize(W_phi LN(z)) starts as the block's own mean-over-heads key (as LtmMask), so
    the untrained module puts each token with the nearby target its attention finds most alike.
    It is computed once per patch position, on the mean of the P pixel-position tokens, so the P
    sequences share one assignment; the sparse 2 x 2 assignment is then laid out as a dense
    (B, N, K) matrix because one GEMM over all P sequences is far faster on CPU than scatters.
    """

    def __init__(self, dim: int, metric_dim: int, grid: tuple[int, int], patch_area: int, tau: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.phi = nn.Linear(dim, metric_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.grid = tuple(grid)
        self.patch_area = patch_area
        self.grid_out = tuple(grid)
        self.register_buffer("targets", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("cand", torch.zeros(0, 4, dtype=torch.long), persistent=False)
        self.register_buffer("valid", torch.zeros(0, 4, dtype=torch.bool), persistent=False)
        self.__dict__["_ltm_context"] = None

    def extra_repr(self) -> str:
        return f"grid={self.grid[0]}x{self.grid[1]} -> {self.grid_out[0]}x{self.grid_out[1]}, patch_area={self.patch_area}"

    def configure(self, hk: int, wk: int) -> None:
        """Set the target grid (the schedule's choice) and rebuild the static geometry."""
        h, w = self.grid
        if not (1 <= hk <= h and 1 <= wk <= w):
            raise LtmError(f"a {h}x{w} grid cannot merge to {hk}x{wk}")
        self.grid_out = (hk, wk)
        device = self.phi.weight.device
        targets, cand, valid = grid_geometry(h, w, hk, wk)
        self.targets, self.cand, self.valid = targets.to(device), cand.to(device), valid.to(device)

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                record: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        BP, N, C = z.shape
        h, w = self.grid
        hk, wk = self.grid_out
        P = self.patch_area
        if N != h * w or BP % P:
            raise LtmError(f"this MobileViT block was converted for a {h}x{w} patch grid and got {N} tokens; "
                           "convert the model again with --input-size set to the resolution you run")
        if keep != hk * wk or self.cand.shape[0] != N:
            raise LtmError(f"grid mask configured for {hk}x{wk} targets, asked to keep {keep}; reconvert the model")
        B = BP // P
        if sizes is not None:
            raise LtmError("a grid group merges once, in its first block; it got already-merged tokens")
        # one metric per patch position for all P sequences: phi of their mean token
        phi = F.normalize(self.phi(self.norm(z.view(B, P, N, C).mean(1))), dim=-1)  # (B, N, d)
        phi_t = phi.index_select(1, self.targets)  # (B, K, d)
        near = phi_t.index_select(1, self.cand.reshape(-1)).view(B, N, 4, -1)
        logits = torch.einsum("bnd,bnkd->bnk", phi, near) / self.log_tau.exp()
        assign = torch.softmax(logits.masked_fill(~self.valid, float("-inf")), dim=-1)  # (B, N, 4)
        K = hk * wk
        # dense (B, N, K) assignment: every merge and unmerge is then one GEMM over all P sequences
        A = z.new_zeros(B, N, K).scatter_add(2, self.cand.unsqueeze(0).expand(B, N, 4), assign)
        target_sizes = A.sum(dim=1)  # (B, K)
        weights = (A / target_sizes.unsqueeze(1)).transpose(1, 2)  # (B, K, N): size-weighted mean
        merged = _per_position(weights, z, B, P)
        ctx: LtmContext | None = self.__dict__["_ltm_context"]
        if ctx is not None:
            ctx.unmerge = functools.partial(unmerge, state=(A, P))
        if record is not None:
            record[-1].update(grid_out=self.grid_out, assign=A.detach())
        return merged, target_sizes.unsqueeze(1).expand(B, P, K).reshape(BP, K)


def _per_position(weights: torch.Tensor, x: torch.Tensor, B: int, P: int) -> torch.Tensor:
    """weights (B, M, N) applied to x (B*P, N, C) for each of the P sequences -> (B*P, M, C)."""
    _, N, C = x.shape
    M = weights.shape[1]
    stacked = x.view(B, P, N, C).transpose(1, 2).reshape(B, N, P * C)
    return torch.bmm(weights, stacked).view(B, M, P, C).transpose(1, 2).reshape(B * P, M, C)


def unmerge(x: torch.Tensor, state: tuple[torch.Tensor, int]) -> torch.Tensor:
    """z_i = sum_t A_it x~_t: every original token gets the weighted mix of the targets it fed."""
    A, P = state
    return _per_position(A, x, A.shape[0], P)


# ----------------------------------------------------------------------------------------------
# conversion


def convert_grid_blocks(model: nn.Module, plan: ConversionPlan, calls: dict[str, tuple[tuple, dict]],
                        ctx: LtmContext, set_module: Callable[[nn.Module, str, nn.Module], None],
                        method: str = "ltm") -> list[LtmBlock]:
    """Swap every block of every grid group for an LtmBlock; the group's first block merges."""
    if method != "ltm":
        raise LtmError(f"method {method!r} works on plain-sequence ViTs only; {plan.model_class} runs its "
                       "blocks on a 2-D patch grid, which only the grid-preserving 'ltm' method keeps")
    modules = dict(model.named_modules())
    matches = {b.name: b for b in plan.blocks}
    new_blocks = []
    for group in plan.grids:
        for i, name in enumerate(group.blocks):
            block, match = modules[name], matches[name]
            args, kwargs = calls[name]
            split = split_block(block, match.attn_child, bind_call(block, args, kwargs))
            mask = None
            if i == 0:
                attn = getattr(block, match.attn_child)
                mask = GridMask(match.dim, metric_dim(attn, match.dim), group.grid, group.patch_area)
                init_mask(mask, block, attn, split.pre_norm, match.dim)  # type: ignore[arg-type]
                param = next(block.parameters())
                mask = mask.to(device=param.device, dtype=param.dtype)
                mask.__dict__["_ltm_context"] = ctx
            new = LtmBlock(block, split, mask, context=ctx, prefix=0, tokens_in=group.tokens, keep=group.tokens,
                           first=(i == 0))
            new.ltm_name = name
            new.ltm_unmerge = i == len(group.blocks) - 1
            set_module(model, name, new)
            new_blocks.append(new)
    return new_blocks


def _group_blocks(blocks: Sequence[LtmBlock], plan: ConversionPlan) -> list[list[LtmBlock]]:
    by_name = {b.ltm_name: b for b in blocks}
    return [[by_name[n] for n in g.blocks] for g in plan.grids]


def apply_grid_choice(blocks: Sequence[LtmBlock], plan: ConversionPlan, choice: Sequence[tuple[int, int]]) -> None:
    """Set each group's target grid and the token counts of all its blocks."""
    for group, members, (hk, wk) in zip(plan.grids, _group_blocks(blocks, plan), choice):
        n, k = group.tokens, hk * wk
        members[0].ltm_mask.configure(hk, wk)
        for i, blk in enumerate(members):
            blk.ltm_tokens_in = n if i == 0 else k
            blk.ltm_keep = k
            blk.ltm_prop_attn = i > 0 and k < n


def choice_from_keep(plan: ConversionPlan, keep: dict[str, int]) -> list[tuple[int, int]]:
    """Replay a saved schedule: the target grid each group's first block keeps."""
    choice = []
    for group in plan.grids:
        first = group.blocks[0]
        if first not in keep:
            raise LtmError(f"the saved schedule does not cover block {first}; the file belongs to another model")
        options = {hk * wk: (hk, wk) for hk, wk in grid_options(*group.grid)}
        k = int(keep[first])
        if k not in options:
            raise LtmError(f"the saved schedule keeps {k} tokens in {first}, which no grid of "
                           f"{group.grid[0]}x{group.grid[1]} patches allows; the file is corrupt")
        choice.append(options[k])
    return choice


def solve_grids(groups: Sequence[tuple[tuple[int, int], int]], apply: Callable[[list[tuple[int, int]]], None],
                ratio: float, measure: Callable[[], int], base_flops: int, model_class: str,
                tolerance: float = 0.005, max_combinations: int = 200_000,
                savings: list[list[float]] | None = None) -> dict[str, Any]:
    """Choose h' x w' per group ((grid, tokens) each) so the measured FLOPs land closest to
    ratio x base_flops; ``apply`` sets a choice on the model that ``measure`` counts.

    Savings of different groups add up (each group unmerges before the next one starts), so each
    group's options are measured once with the others left whole (or given as ``savings``, per
    group and option), and the combinations are then ranked without further counting: the
    smallest error wins, and among schedules within ``tolerance`` the one that keeps the most
    tokens in its most-merged group.
    """
    full = [tuple(g) for g, _ in groups]
    tokens = [n for _, n in groups]
    options = [grid_options(*g) for g in full]
    if ratio >= 1.0:
        apply(full)
        return {"flops_ratio": 1.0, "grids": full}
    if savings is None:
        savings = []
        for gi, opts in enumerate(options):
            def saving(opt: tuple[int, int]) -> int:
                apply([opt if j == gi else full[j] for j in range(len(full))])
                return base_flops - measure()

            savings.append(_savings_curve(opts, tokens[gi], saving))
    sizes = [len(o) for o in options]
    if math.prod(sizes) > max_combinations:  # many groups: one shared keep fraction
        combos = []
        for f in [i / 400 for i in range(1, 401)]:
            combos.append(tuple(min(range(len(o)), key=lambda j: abs(o[j][0] * o[j][1] - f * n))
                                for o, n in zip(options, tokens)))
    else:
        combos = list(itertools.product(*[range(n) for n in sizes]))
    target = ratio * base_flops

    def rank(combo: tuple[int, ...]) -> tuple[float, float]:
        flops = base_flops - sum(savings[g][j] for g, j in enumerate(combo))
        err = abs(flops - target) / base_flops
        least_kept = min(options[g][j][0] * options[g][j][1] / tokens[g] for g, j in enumerate(combo))
        return (max(err, tolerance), -least_kept)

    best = min(combos, key=rank)
    choice = [options[g][j] for g, j in enumerate(best)]
    apply(choice)
    achieved = measure() / base_flops
    if abs(achieved - ratio) > 0.02 * ratio:
        warnings.warn(f"ratio {ratio} is not reachable with grid-preserving merges in {model_class} "
                      f"(the merged parts hold too few of the FLOPs, or the grids are too coarse); "
                      f"the closest schedule reaches {achieved:.3f}", stacklevel=3)
    return {"flops_ratio": achieved, "grids": choice}


def probe_options(options: list[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """The options whose savings are measured; fit_savings gives the rest."""
    merged = [o for o in options if o[0] * o[1] < tokens]
    return merged if len(merged) <= 3 else [merged[0], merged[len(merged) // 2], merged[-1]]


def quadratic_basis(option: tuple[int, int]) -> list[float]:
    k = option[0] * option[1]
    return [1.0, float(k), float(k * k)]


def fit_savings(options: list[tuple[int, int]], tokens: int, measured: dict[tuple[int, int], float],
                basis: Callable[[tuple[int, int]], list[float]] = quadratic_basis) -> list[float]:
    """FLOPs saved by each option, from the probes' measurements. Below the full grid the count
    is exactly linear in a three-term basis of the target grid; by default 1, K, K^2 (linear
    layers and merge GEMMs grow with K targets, attention with K^2), so three measurements fix
    the curve; the full grid saves nothing."""
    merged = [o for o in options if o[0] * o[1] < tokens]
    if all(o in measured for o in merged):
        return [float(measured.get(o, 0.0)) for o in options]
    probes = list(measured)[:3]
    ks = torch.tensor([basis(o) for o in probes], dtype=torch.float64)
    ys = torch.tensor([float(measured[o]) for o in probes], dtype=torch.float64)
    coef = torch.linalg.solve(ks, ys)
    return [0.0 if o[0] * o[1] >= tokens else float(torch.tensor(basis(o), dtype=torch.float64) @ coef)
            for o in options]


def _savings_curve(options: list[tuple[int, int]], tokens: int, saving: Callable[[tuple[int, int]], int]) -> list[float]:
    """Savings from one FlopCounterMode run per probe (what keeps converting a MobileViT to a few
    seconds) and the exact quadratic through them."""
    return fit_savings(options, tokens, {o: float(saving(o)) for o in probe_options(options, tokens)})


def grid_groups_summary(plan: ConversionPlan, blocks: Sequence[LtmBlock]) -> list[dict[str, Any]]:
    """Per group: the grid, the target grid and the blocks, for describe() / inspect."""
    out = []
    for group, members in zip(plan.grids, _group_blocks(blocks, plan)):
        hk, wk = members[0].ltm_mask.grid_out
        out.append({"blocks": list(group.blocks), "grid": list(group.grid), "grid_out": [hk, wk],
                    "patch_area": group.patch_area, "tokens_in": group.tokens, "tokens_out": hk * wk})
    return out

