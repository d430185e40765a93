"""The FFN-grid family: Swin v1/v2 and EfficientViT (timm and HF), merging inside each block's FFN.

Why inside the FFN: a Swin block's attention needs the full H x W grid (windows of a fixed size,
a relative position bias and a shift mask indexed by position), and EfficientViT's attention and
FFN both run on (B, C, H, W) maps. Shortening the token sequence for the next block would mean
re-deriving all of that for a smaller grid. The FFN, though, holds about two thirds of a Swin
block's FLOPs and all of an EfficientViT MBConv's, and it only needs *a* grid. So each block:

* merges its post-attention tokens z onto a regular h' x w' sub-grid of targets (merge/grid.py);
* runs the FFN on the h' x w' merged tokens (as a map for a depth-wise convolution);
* unmerges the FFN's output, delta_i = sum_t A_it y_t, and the block adds it to the full-grid
  residual stream: z + unmerge(FFN(merge(z))). The residual keeps every token's own detail.

The block keeps its class and forward: the mask module ``ltm_mask`` is added to it, and two
hooks (before the FFN's first module, after its last; found by analysis/ffn_sites.py) do the
merge and the unmerge. The assignment between the two hooks is state of one forward: it is kept
on a stack of the calling thread, never on the module. With the full grid as target the hooks do
nothing, so ratio 1.0 is the original.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltm_convert.analysis.ffn_sites import FfnSite, find_ffn_site
from ltm_convert.analysis.graph import GraphFacts, Residual, module_path, shape_of
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.merge.grid import GridMerge, grid_options
from ltm_convert.merge.metric import metric_dim
from ltm_convert.plan import records
from ltm_convert.rewriters.base import Site, builtin_family, chain_keep

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.schedule import GridCost
    from ltm_convert.tracer import Analysis, ConversionPlan

_PENDING = threading.local()


def _pending() -> list:
    stack = getattr(_PENDING, "stack", None)
    if stack is None:
        stack = _PENDING.stack = []
    return stack


class FfnGridMerge(GridMerge):
    """The merge module of one grid block: merges before the FFN, unmerges after it."""

    def __init__(self, dim: int, metric_dim: int, grid: tuple[int, int], layout: str) -> None:
        if layout not in ("tokens", "nhwc", "nchw"):
            raise LtmError(f"unknown grid layout {layout!r}")
        super().__init__(dim, metric_dim, grid)
        self.layout = layout
        self.ltm_name = ""  # the block's module path, set by convert

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"

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

    # -- the two hooks --------------------------------------------------------------------------------
    def before_ffn(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.merges():
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise LtmError(f"block {self.ltm_name}: the FFN's first module got {len(args)} arguments; the merge "
                           "expects one tensor (a different calling convention than at conversion)")
        z = self._grid_view(args[0], self.grid, check=True)
        assignment = self.assignment(z)
        _pending().append((self, assignment))
        merged, _ = self.merge(z, assignment)
        return (self._layout(merged),)

    def after_ffn(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.merges():
            return None
        stack = _pending()
        if not stack or stack[-1][0] is not self:
            raise LtmError(f"block {self.ltm_name}: the FFN ended without the merge that starts it; the block's "
                           "forward no longer calls its FFN as it did at conversion")
        _, assignment = stack.pop()
        y = output[0] if isinstance(output, tuple) else output
        full = self._layout(self.unmerge(self._grid_view(y, self.grid_out), assignment))
        return (full, *output[1:]) if isinstance(output, tuple) else full


def install(mask: FfnGridMerge, block: nn.Module, site: "Any") -> None:
    """Add ``ltm_mask`` to the block and hook it around the FFN."""
    first, last = block.get_submodule(site.ffn_in), block.get_submodule(site.ffn_out)
    block.ltm_mask = mask
    first.register_forward_pre_hook(mask.before_ffn)
    last.register_forward_hook(mask.after_ffn)


def _ffn_is_spatial(facts: GraphFacts, mlp_res: Residual, grid: tuple[int, int]) -> bool:
    h, w = grid
    for n in facts.branch(mlp_res.skip, mlp_res.branch_out):
        s = shape_of(n)
        if s and len(s) == 4 and ((s[1], s[2]) == (h, w) or (s[2], s[3]) == (h, w)):
            return True
    return False


def ffn_sites_of(plan: "ConversionPlan") -> list[FfnSite]:
    """The plan's FFN sites (its family data), parsed and checked."""
    return records(FfnSite, plan.data.get("ffn_grids", []))


@builtin_family
class FfnGridFamily:
    name = "ffn-grid"
    priority = 70
    examples = (
        ("timm", "swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2),
                                                      img_size=64, window_size=2, num_classes=5)),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        from ltm_convert.rewriters.unfolded_grid import grid_groups
        from ltm_convert.tracer import ConversionPlan

        facts = analysis.facts
        paths = {n: module_path(n) for n in facts.nodes if n.op == "call_function"}
        sites, kept, skipped = [], [], list(analysis.skipped)
        for block, (attn_res, mlp_res) in zip(analysis.blocks, analysis.pairs):
            site = find_ffn_site(facts, paths, block.name, block.attn_child,
                                 [attn_res.skip, *facts.branch(attn_res.skip, attn_res.branch_out)],
                                 mlp_res.skip, mlp_res.branch_out, facts.branch(attn_res.add, mlp_res.skip))
            if isinstance(site, str):
                skipped.append((block.name, site))
                continue
            if site.layout == "tokens" and _ffn_is_spatial(facts, mlp_res, site.grid):
                skipped.append((block.name, "its FFN lays the tokens out on the 2-D grid itself (a convolution "
                                            "inside the MLP, as in PVTv2), which merged tokens cannot feed"))
                continue
            kept.append(dataclasses.replace(block, tokens_with_prefix=site.grid[0] * site.grid[1], dim=site.dim, index=len(kept)))
            sites.append(site)
        if not sites:
            unfold = "" if analysis.on_maps else grid_groups(facts, analysis.blocks, analysis.block_adds)
            reasons = "; ".join(f"{n}: {w}" for n, w in skipped[:2])
            return (f"not supported yet: no block of {analysis.model_class} has an FFN on a 2-D grid that could be "
                    f"merged safely ({reasons or unfold})")
        return ConversionPlan(model_class=analysis.model_class, input_size=analysis.input_size,
                              tokens_with_prefix=kept[0].tokens_with_prefix, prefix_tokens=0,
                              heads=["grid (each FFN unmerges onto its full grid)"], blocks=kept, skipped=skipped,
                              data={"ffn_grids": [asdict(site) for site in sites]})

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        if config.method != "ltm":
            raise LtmError(f"method {config.method!r} works on plain-sequence ViTs only; {plan.model_class} runs "
                           "its blocks on 2-D grids, which only the grid-preserving 'ltm' method keeps")
        for site in ffn_sites_of(plan):
            block = model.get_submodule(site.block)
            if hasattr(block, "ltm_mask"):
                raise LtmError(f"{site.block} already has an ltm_mask; convert the original model instead")
            attn = block.get_submodule(site.attn_child)
            mask = FfnGridMerge(site.dim, metric_dim(attn, site.dim), site.grid, site.layout)
            first = block.get_submodule(site.ffn_in)
            mask.init_from_block(block, attn, first if isinstance(first, nn.LayerNorm) else None, site.dim)
            param = next(block.parameters())
            mask = mask.to(device=param.device, dtype=param.dtype)
            mask.ltm_name = site.block
            mask.configure(*site.grid)
            install(mask, block, site)

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]:
        return [Site(name=s.block, mergeable=s.grid[0] * s.grid[1], options=sorted(a * b for a, b in grid_options(*s.grid)),
                     chained=False) for s in ffn_sites_of(plan)]

    def apply(self, model: nn.Module, plan: "ConversionPlan", keep: dict[str, int]) -> None:
        get = chain_keep(keep, self.sites(model, plan))
        for site in ffn_sites_of(plan):
            options = {a * b: (a, b) for a, b in grid_options(*site.grid)}
            k = get(site.block)
            if k not in options:
                raise LtmError(f"the schedule keeps {k} tokens in {site.block}, which no grid of "
                               f"{site.grid[0]}x{site.grid[1]} tokens allows; the file is corrupt")
            model.get_submodule(site.block).ltm_mask.configure(*options[k])

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> "GridCost":
        from ltm_convert.schedule import GridCost

        sites = self.sites(meta_model, plan)
        shapes = {s.block: {a * b: (a, b) for a, b in grid_options(*s.grid)} for s in ffn_sites_of(plan)}

        def basis(site: Site, k: int) -> list[float]:  # FFN and column merges grow with K = h'w', row merges with w'
            return [1.0, float(k), float(shapes[site.name][k][1])]

        try:
            return GridCost(meta_model, sites, {s.block: [s.block] for s in ffn_sites_of(plan)},
                            lambda keep: self.apply(meta_model, plan, keep), basis, plan.input_size)
        except LtmError:
            raise
        except Exception as exc:  # a FFN that cannot run on fewer tokens (hidden grid arithmetic inside)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"not supported yet: the FFN of {plan.model_class}'s blocks does not run "
                                        f"on merged grid tokens ({first[:200]})") from exc

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]:
        masks = [model.get_submodule(s.block).ltm_mask for s in ffn_sites_of(plan)]
        return {"blocks": [{"name": m.ltm_name, "tokens_in": m.tokens_in, "tokens_out": m.tokens_out} for m in masks],
                "grids": [{"blocks": [m.ltm_name], "grid": list(m.grid), "grid_out": list(m.grid_out), "patch_area": 1,
                           "tokens_in": m.tokens_in, "tokens_out": m.tokens_out} for m in masks]}
