"""LTM merging inside the FFN of grid blocks (Swin v1/v2, EfficientViT; timm and HF).

Why inside the FFN: a Swin block's attention needs the full H x W grid (windows of a fixed size,
a relative position bias and a shift mask indexed by position), and EfficientViT's attention and
FFN both run on (B, C, H, W) maps. Shortening the token sequence for the next block would mean
re-deriving all of that for a smaller grid. The FFN, though, holds about two thirds of a Swin
block's FLOPs and all of an EfficientViT MBConv's, and it only needs *a* grid. So each block:

* merges its post-attention tokens z onto a regular h' x w' sub-grid of targets (rows and columns
  reduced evenly, aspect ratio kept; ltm-method.md section 2.3), every token spreading over the
  (up to) 2 x 2 targets around it with learned softmax(cos(phi_i, phi_t) / tau) weights A,
  factorised by axis (see FfnGridMerge);
* runs the FFN on the h' x w' merged tokens (as a map for a depth-wise convolution);
* unmerges the FFN's output, delta_i = sum_t A_it y_t, and the block adds it to the full-grid
  residual stream: z + unmerge(FFN(merge(z))). The residual keeps every token's own detail.

The block keeps its class and forward: the mask module ``ltm_mask`` is added to it, and two
hooks (before the FFN's first module, after its last; found by ffn_trace.py) do the merge and
the unmerge. With the full grid as target the hooks do nothing, so ratio 1.0 is the original.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.ffn_trace import FfnSite
from ltm_convert.grid import axis_targets, grid_options
from ltm_convert.rewriters.sequence import init_mask, metric_dim


class FfnGridMerge(nn.Module):
    """The merge module of one grid block: merges before the FFN, unmerges after it.

    The 2 x 2 soft assignment is factorised by axis: a token first spreads over the two nearest
    target columns of its row (weights a_W), and each such row-merged token over the two nearest
    target rows of its column (weights a_H), so A_it = a_W a_H, every row of A sums to one, and
    merge and unmerge are each two batched GEMMs with small dense per-row / per-column matrices.
    On CPU that is several times faster than gathers and scatter-adds over the full (N, C)
    tokens, which on Swin's 56 x 56 stage cost more than the FFN they save. The GEMMs are
    counted by FlopCounterMode, so the schedule pays for the merge in the FLOPs it reports.

    phi = normalize(W_phi LN(z)) starts as the block's own mean-over-heads key where one exists
    (Swin), so the untrained module already puts each token with the nearby target its attention
    finds most alike; a target is compared through the token at its position.
    """

    def __init__(self, dim: int, metric_dim: int, grid: tuple[int, int], layout: str, tau: float = 0.1) -> None:
        super().__init__()
        if layout not in ("tokens", "nhwc", "nchw"):
            raise LtmError(f"unknown grid layout {layout!r}")
        self.norm = nn.LayerNorm(dim)
        self.phi = nn.Linear(dim, metric_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.grid = tuple(grid)
        self.grid_out = tuple(grid)
        self.layout = layout
        self.ltm_name = ""  # the block's module path, set by convert
        for name, dtype in [("rows", torch.long), ("cols", torch.long), ("near_r", torch.long),
                            ("near_c", torch.long), ("valid_r", torch.bool), ("valid_c", torch.bool)]:
            self.register_buffer(name, torch.zeros(0, dtype=dtype), persistent=False)
        self.__dict__["_pending"] = None  # the assignment between the merge and the unmerge hook

    def extra_repr(self) -> str:
        return f"grid={self.grid[0]}x{self.grid[1]} -> {self.grid_out[0]}x{self.grid_out[1]}, layout={self.layout}"

    @property
    def tokens_in(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_out(self) -> int:
        return self.grid_out[0] * self.grid_out[1]

    def configure(self, hk: int, wk: int) -> None:
        """Set the target grid (the schedule's choice) and rebuild the static index tables."""
        h, w = self.grid
        if not (1 <= hk <= h and 1 <= wk <= w):
            raise LtmError(f"a {h}x{w} grid cannot merge to {hk}x{wk}")
        if (hk, wk) == self.grid_out and self.rows.numel():
            return
        self.grid_out = (hk, wk)
        device = self.phi.weight.device
        for axis, n, k in (("r", h, hk), ("c", w, wk)):
            targets, near = axis_targets(n, k)
            near_t = torch.tensor(near, dtype=torch.long)
            setattr(self, "rows" if axis == "r" else "cols", torch.tensor(targets, dtype=torch.long).to(device))
            setattr(self, f"near_{axis}", near_t.to(device))
            setattr(self, f"valid_{axis}", torch.stack([torch.ones(n, dtype=torch.bool),
                                                        near_t[:, 1] != near_t[:, 0]], 1).to(device))

    # -- layouts: the merge works on (B, h, w, C) ---------------------------------------------------
    def _grid_view(self, x: torch.Tensor, hw: tuple[int, int], check: bool = False) -> torch.Tensor:
        h, w = hw
        if self.layout == "tokens":
            ok = x.dim() == 3 and x.shape[1] == h * w
            out = x.reshape(x.shape[0], h, w, x.shape[-1]) if ok else x
        elif self.layout == "nhwc":
            ok = x.dim() == 4 and tuple(x.shape[1:3]) == (h, w)
            out = x
        else:
            ok = x.dim() == 4 and tuple(x.shape[2:]) == (h, w)
            out = x.permute(0, 2, 3, 1) if ok else x
        if check and not ok:
            raise LtmError(f"block {self.ltm_name} was converted for a {h}x{w} grid and got input of shape "
                           f"{tuple(x.shape)}; convert the model again with --input-size set to the resolution you run")
        return out

    def _layout(self, g: torch.Tensor) -> torch.Tensor:
        B, h, w, C = g.shape
        if self.layout == "tokens":
            return g.reshape(B, h * w, C)
        if self.layout == "nhwc":
            return g
        return g.permute(0, 3, 1, 2)

    # -- merge / unmerge ------------------------------------------------------------------------
    def assignment(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense per-row and per-column assignment matrices for z (B, h, w, C):
        A_W (B*h, w, w') over the target columns of each row, A_H (B*w', h', h) transposed per
        target column; each token's weights over its two nearest targets per axis sum to one."""
        B, h, w, _ = z.shape
        hk, wk = self.grid_out
        inv_tau = self.log_tau.neg().exp()
        phi = F.normalize(self.phi(self.norm(z)), dim=-1)  # (B, h, w, d)
        anchors = phi.index_select(2, self.cols)  # (B, h, w', d): the token at each target column
        near = anchors.index_select(2, self.near_c.reshape(-1)).view(B, h, w, 2, -1)
        logits = (phi.unsqueeze(3) * near).sum(-1) * inv_tau
        a_w = torch.softmax(logits.masked_fill(~self.valid_c.view(1, 1, w, 2), float("-inf")), dim=-1)
        A_w = z.new_zeros(B, h, w, wk).scatter_add_(3, self.near_c.view(1, 1, w, 2).expand(B, h, w, 2), a_w)
        targets = anchors.index_select(1, self.rows)  # (B, h', w', d)
        near = targets.index_select(1, self.near_r.reshape(-1)).view(B, h, 2, wk, -1)
        logits = (anchors.unsqueeze(2) * near).sum(-1) * inv_tau  # (B, h, 2, w')
        a_h = torch.softmax(logits.masked_fill(~self.valid_r.view(1, h, 2, 1), float("-inf")), dim=2)
        A_h = z.new_zeros(B, h, hk, wk).scatter_add_(2, self.near_r.view(1, h, 2, 1).expand(B, h, 2, wk), a_h)
        return A_w.view(B * h, w, wk), A_h.permute(0, 3, 2, 1).reshape(B * wk, hk, h)

    def merge(self, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Size-weighted mean of the tokens each target receives: (B, h, w, C) -> (B, h', w', C)."""
        A_w, A_h = state
        B, h, w, C = z.shape
        hk, wk = self.grid_out
        rows = torch.bmm(A_w.transpose(1, 2), z.reshape(B * h, w, C))  # (B*h, w', C): sums along rows
        sizes = A_w.sum(1)  # (B*h, w')
        cols = torch.cat([rows, sizes.unsqueeze(-1)], -1).view(B, h, wk, C + 1).transpose(1, 2)
        merged = torch.bmm(A_h, cols.reshape(B * wk, h, C + 1)).view(B, wk, hk, C + 1).transpose(1, 2)
        return merged[..., :C] / merged[..., C:]

    def unmerge(self, y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """delta_i = sum_t A_it y_t: (B, h', w', C) -> (B, h, w, C)."""
        A_w, A_h = state
        B, hk, wk, C = y.shape
        h, w = self.grid
        cols = torch.bmm(A_h.transpose(1, 2), y.transpose(1, 2).reshape(B * wk, hk, C))  # (B*w', h, C)
        rows = cols.view(B, wk, h, C).transpose(1, 2).reshape(B * h, wk, C)
        return torch.bmm(A_w, rows).view(B, h, w, C)

    def merges(self) -> bool:
        return self.grid_out != self.grid

    def before_ffn(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.merges():
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise LtmError(f"block {self.ltm_name}: the FFN's first module got {len(args)} arguments; the merge "
                           "expects one tensor (a different calling convention than at conversion)")
        z = self._grid_view(args[0], self.grid, check=True)
        state = self.assignment(z)
        self.__dict__["_pending"] = state
        return (self._layout(self.merge(z, state)),)

    def after_ffn(self, module: nn.Module, args: tuple, output: Any) -> Any:
        state = self.__dict__["_pending"]
        if state is None:
            return None
        self.__dict__["_pending"] = None
        y = output[0] if isinstance(output, tuple) else output
        full = self._layout(self.unmerge(self._grid_view(y, self.grid_out), state))
        return (full, *output[1:]) if isinstance(output, tuple) else full


# ----------------------------------------------------------------------------------------------
# conversion


def _hook_modules(block: nn.Module, site: FfnSite) -> tuple[nn.Module, nn.Module]:
    return block.get_submodule(site.ffn_in), block.get_submodule(site.ffn_out)


def install(mask: FfnGridMerge, block: nn.Module, site: FfnSite) -> None:
    """Add ``ltm_mask`` to the block and hook it around the FFN (re-used on load and deepcopy)."""
    first, last = _hook_modules(block, site)
    block.ltm_mask = mask
    first.register_forward_pre_hook(mask.before_ffn)
    last.register_forward_hook(mask.after_ffn)


def convert_ffn_sites(model: nn.Module, sites: Sequence[FfnSite], method: str = "ltm") -> list[FfnGridMerge]:
    """Give every site's block a merge module; nothing merges until a target grid is applied."""
    if method != "ltm":
        raise LtmError(f"method {method!r} works on plain-sequence ViTs only; {type(model).__name__} runs its "
                       "blocks on 2-D grids, which only the grid-preserving 'ltm' method keeps")
    masks = []
    for site in sites:
        block = model.get_submodule(site.block)
        if hasattr(block, "ltm_mask"):
            raise LtmError(f"{site.block} already has an ltm_mask; convert the original model instead")
        attn = block.get_submodule(site.attn_child)
        mask = FfnGridMerge(site.dim, metric_dim(attn, site.dim), site.grid, site.layout)
        norm_child = site.ffn_in if isinstance(block.get_submodule(site.ffn_in), nn.LayerNorm) else None
        init_mask(mask, block, attn, norm_child, site.dim)  # type: ignore[arg-type]
        param = next(block.parameters())
        mask = mask.to(device=param.device, dtype=param.dtype)
        mask.ltm_name = site.block
        mask.configure(*site.grid)
        install(mask, block, site)
        masks.append(mask)
    return masks


def model_masks(model: nn.Module) -> list[FfnGridMerge]:
    return [m for m in model.modules() if isinstance(m, FfnGridMerge)]


def apply_choice(masks: Sequence[FfnGridMerge], choice: Sequence[tuple[int, int]]) -> None:
    for mask, (hk, wk) in zip(masks, choice):
        mask.configure(hk, wk)


def choice_from_keep(sites: Sequence[FfnSite], keep: dict[str, int]) -> list[tuple[int, int]]:
    """Replay a saved schedule: the target grid each block's FFN keeps."""
    choice = []
    for site in sites:
        if site.block not in keep:
            raise LtmError(f"the saved schedule does not cover block {site.block}; the file belongs to another model")
        options = {hk * wk: (hk, wk) for hk, wk in grid_options(*site.grid)}
        k = int(keep[site.block])
        if k not in options:
            raise LtmError(f"the saved schedule keeps {k} tokens in {site.block}, which no grid of "
                           f"{site.grid[0]}x{site.grid[1]} tokens allows; the file is corrupt")
        choice.append(options[k])
    return choice


def solve(masks: Sequence[FfnGridMerge], sites: Sequence[FfnSite], ratio: float, model: nn.Module,
          size: tuple[int, int], base_flops: int, model_class: str) -> dict[str, Any]:
    """The FLOPs-target schedule (grid.solve_grids) for a weightless ``model`` holding ``masks``.

    A block's merge changes only that block's FLOPs, so one counted forward with every block set
    to its k-th probe grid measures all blocks at once (FlopCounterMode counts per module): three
    forwards fix every block's savings curve, however many blocks there are.
    """
    from ltm_convert.flops import count_flops, count_flops_by_module
    from ltm_convert.grid import fit_savings, probe_options, solve_grids

    full = [s.grid for s in sites]
    tokens = [s.grid[0] * s.grid[1] for s in sites]
    options = [grid_options(*g) for g in full]
    probes = [probe_options(o, n) for o, n in zip(options, tokens)]
    names = [s.block for s in sites]
    try:
        apply_choice(masks, full)
        base_blocks = count_flops_by_module(model, size, names)
        measured: list[dict[tuple[int, int], float]] = [{} for _ in sites]
        for k in range(max((len(p) for p in probes), default=0)):
            choice = [p[k] if k < len(p) else g for p, g in zip(probes, full)]
            apply_choice(masks, choice)
            counts = count_flops_by_module(model, size, names)
            for i, (p, name) in enumerate(zip(probes, names)):
                if k < len(p):
                    measured[i][p[k]] = float(base_blocks[name] - counts[name])
        # FFN and column merges grow with K = h' w', the row merges with w'
        savings = [fit_savings(o, n, m, basis=lambda g: [1.0, float(g[0] * g[1]), float(g[1])])
                   for o, n, m in zip(options, tokens, measured)]
        return solve_grids(list(zip(full, tokens)), lambda c: apply_choice(masks, c), ratio,
                           lambda: count_flops(model, size), base_flops, model_class, savings=savings)
    except LtmError:
        raise
    except Exception as exc:  # a FFN that cannot run on fewer tokens (hidden grid arithmetic inside)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"not supported yet: the FFN of {model_class}'s blocks does not run on merged grid tokens ({first[:200]})"
        ) from exc


def summary(masks: Sequence[FfnGridMerge]) -> list[dict[str, Any]]:
    """Per block: the grid and the target grid, for describe() / inspect."""
    return [{"blocks": [m.ltm_name], "grid": list(m.grid), "grid_out": list(m.grid_out), "patch_area": 1,
             "tokens_in": m.tokens_in, "tokens_out": m.tokens_out} for m in masks]
