"""Grid-preserving merges: tokens on an h x w grid merge onto a regular h' x w' sub-grid and back.

Models whose blocks need a 2-D grid (MobileViT's fold, Swin's windows, EfficientViT's depth-wise
convolutions) cannot take an arbitrary shorter sequence; they can take a smaller grid. Rows and
columns are reduced evenly (the aspect ratio is kept), and every token spreads over the (up to)
2 x 2 targets around it with learned weights.

The 2 x 2 assignment is factorised by axis: a token first spreads over the two nearest target
columns of its row (weights a_W), each row-merged token then over the two nearest target rows of
its column (a_H), so A_it = a_W a_H and every row of A sums to one. Merge and unmerge are then
two small batched GEMMs each, several times faster on CPU than gathers and scatter-adds over all
tokens (on Swin's 56 x 56 stage the gathers cost more than the FFN they saved).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.merge.metric import MergeMetric, no_autocast

GRID_TAU = 0.1  # initial temperature of the grid assignment (cosines of neighbours are far from saturated)


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


def unmerge_grid(y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """delta_i = sum_t A_it y_t with the factorised assignment ``state`` = (A_W, A_H) of
    :meth:`GridMerge.assignment`: (B, h', w', C) -> (B, h, w, C)."""
    A_w, A_h = state
    B, hk, wk, C = y.shape
    h, w = grid
    cols = torch.bmm(A_h.transpose(1, 2), y.transpose(1, 2).reshape(B * wk, hk, C))  # (B*w', h, C)
    rows = cols.view(B, wk, h, C).transpose(1, 2).reshape(B * h, wk, C)
    return torch.bmm(A_w, rows).view(B, h, w, C)


def _check_grid_schedule(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    theirs = state_dict.get(f"{prefix}schedule")
    ours = module.schedule
    if isinstance(theirs, torch.Tensor) and theirs.device.type != "meta" and ours.device.type != "meta" \
            and not torch.equal(theirs.to(ours.device).long(), ours):
        raise LtmError(f"this state dict was saved from a model converted with another schedule ({prefix.rstrip('.')} "
                       f"merges to {int(theirs[0])}x{int(theirs[1])} there, {int(ours[0])}x{int(ours[1])} here); "
                       "convert with the same settings (ltm_convert.load rebuilds a saved model exactly)")


class GridMerge(MergeMetric):
    """Merges an (B, h, w, C) grid onto (B, h', w', C) and spreads (B, h', w', C) back.

    ``assignment(z)`` computes the per-axis weights from the metric (a target is compared through
    the token at its position), ``merge`` takes the weighted mean of what each target receives
    (and the target sizes), ``unmerge`` gives every token the weighted mix of its targets. The
    weights depend on the image, so the assignment is state of one forward, returned to the
    caller and never stored here.
    """

    def __init__(self, dim: int, metric_dim: int, grid: tuple[int, int], tau: float = GRID_TAU) -> None:
        super().__init__(dim, metric_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.grid = tuple(grid)
        self.grid_out = tuple(grid)
        for name, dtype in [("rows", torch.long), ("cols", torch.long), ("near_r", torch.long),
                            ("near_c", torch.long), ("valid_r", torch.bool), ("valid_c", torch.bool)]:
            self.register_buffer(name, torch.zeros(0, dtype=dtype), persistent=False)
        # the target grid, saved with the weights so that a state dict knows its schedule
        self.register_buffer("schedule", torch.tensor(list(grid), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_check_grid_schedule)

    def extra_repr(self) -> str:
        return f"grid={self.grid[0]}x{self.grid[1]} -> {self.grid_out[0]}x{self.grid_out[1]}"

    @property
    def tokens_in(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_out(self) -> int:
        return self.grid_out[0] * self.grid_out[1]

    def merges(self) -> bool:
        return self.grid_out != self.grid

    def configure(self, hk: int, wk: int) -> None:
        """Set the target grid (the schedule's choice) and rebuild the static index tables."""
        h, w = self.grid
        if not (1 <= hk <= h and 1 <= wk <= w):
            raise LtmError(f"a {h}x{w} grid cannot merge to {hk}x{wk}")
        if (hk, wk) == self.grid_out and self.rows.numel():
            return
        self.grid_out = (hk, wk)
        if self.schedule.device.type != "meta":
            self.schedule.copy_(torch.tensor([hk, wk]))
        device = self.log_tau.device
        for axis, n, k in (("r", h, hk), ("c", w, wk)):
            targets, near = axis_targets(n, k)
            near_t = torch.tensor(near, dtype=torch.long)
            setattr(self, "rows" if axis == "r" else "cols", torch.tensor(targets, dtype=torch.long).to(device))
            setattr(self, f"near_{axis}", near_t.to(device))
            setattr(self, f"valid_{axis}", torch.stack([torch.ones(n, dtype=torch.bool),
                                                        near_t[:, 1] != near_t[:, 0]], 1).to(device))

    def assignment(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row and per-column assignment matrices for z (B, h, w, C): A_W (B*h, w, w') over the
        target columns of each row, A_H (B*w', h', h) per target column; each token's weights over
        its two nearest targets per axis sum to one (computed in float32, returned in z's dtype)."""
        B, h, w, _ = z.shape
        hk, wk = self.grid_out
        phi = self.metric(z)  # (B, h, w, d), float32 for half inputs
        with no_autocast(z):
            inv_tau = self.log_tau.neg().exp().to(phi.dtype)
            anchors = phi.index_select(2, self.cols)  # (B, h, w', d): the token at each target column
            near = anchors.index_select(2, self.near_c.reshape(-1)).view(B, h, w, 2, -1)
            logits = (phi.unsqueeze(3) * near).sum(-1) * inv_tau
            a_w = torch.softmax(logits.masked_fill(~self.valid_c.view(1, 1, w, 2), float("-inf")), dim=-1)
            A_w = phi.new_zeros(B, h, w, wk).scatter_add_(3, self.near_c.view(1, 1, w, 2).expand(B, h, w, 2), a_w)
            targets = anchors.index_select(1, self.rows)  # (B, h', w', d)
            near = targets.index_select(1, self.near_r.reshape(-1)).view(B, h, 2, wk, -1)
            logits = (anchors.unsqueeze(2) * near).sum(-1) * inv_tau  # (B, h, 2, w')
            a_h = torch.softmax(logits.masked_fill(~self.valid_r.view(1, h, 2, 1), float("-inf")), dim=2)
            A_h = phi.new_zeros(B, h, hk, wk).scatter_add_(2, self.near_r.view(1, h, 2, 1).expand(B, h, 2, wk), a_h)
        return A_w.view(B * h, w, wk).to(z.dtype), A_h.permute(0, 3, 2, 1).reshape(B * wk, hk, h).to(z.dtype)

    def merge(self, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted mean of the tokens each target receives, (B, h, w, C) -> (B, h', w', C), and
        the targets' sizes (B, h', w') (how many tokens' worth each one holds)."""
        A_w, A_h = state
        B, h, w, C = z.shape
        hk, wk = self.grid_out
        rows = torch.bmm(A_w.transpose(1, 2), z.reshape(B * h, w, C))  # (B*h, w', C): sums along rows
        sizes = A_w.sum(1)  # (B*h, w')
        cols = torch.cat([rows, sizes.unsqueeze(-1)], -1).view(B, h, wk, C + 1).transpose(1, 2)
        merged = torch.bmm(A_h, cols.reshape(B * wk, h, C + 1)).view(B, wk, hk, C + 1).transpose(1, 2)
        return merged[..., :C] / merged[..., C:], merged[..., C]

    def unmerge(self, y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """delta_i = sum_t A_it y_t: (B, h', w', C) -> (B, h, w, C)."""
        return unmerge_grid(y, state, self.grid)
