"""The unfolded-grid family: MobileViT (timm and HF).

MobileViT unfolds a (B, C, H, W) feature map into B x P sequences of n_h x n_w patch tokens (P
pixel positions per patch), runs a few transformer blocks, and folds the map back, so it needs
every patch at the end and the same merge in all P sequences (a grid-preserving merge, merge/grid.py):

* the first block of each group merges after its attention onto a regular h' x w' sub-grid
  (merge/grid.py), with one assignment per patch position computed from the mean of its P
  tokens, so all P sequences merge identically;
* the later blocks of the group run on the h' x w' tokens with proportional attention;
* the last block of the group unmerges, z_i = sum_t A_it x~_t, so the fold sees the full grid.
  The assignment reaches it on the token tensor (merge/state.py), like the sizes.

The grid constraint makes the reachable FLOPs ratios discrete (and bounded by the share of FLOPs
the transformers hold), so the closest reachable schedule is chosen and reported.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import fx, nn

from ltm_convert.analysis.block_split import bind_call, split_block
from ltm_convert.analysis.graph import GraphFacts, passthrough_source, shape_of
from ltm_convert.errors import LtmError
from ltm_convert.ltm_block import ltm_class
from ltm_convert.merge.grid import GridMerge, grid_options, unmerge_grid
from ltm_convert.merge.metric import metric_dim
from ltm_convert.merge.state import TokenState
from ltm_convert.plan import GridGroup, records
from ltm_convert.rewriters.attention_bias import give_attention_a_mask, warn_without_bias
from ltm_convert.rewriters.base import Site, builtin_family, chain_keep

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, BlockMatch, ConversionPlan


class UnfoldedUnmerge(NamedTuple):
    """What the group's last block needs to restore the full grid (rides on the tokens)."""

    assignment: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int]
    grid_out: tuple[int, int]
    copies: int  # P: pixel positions per patch, sequences that share one assignment

    def unmerge_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """(B*P, h'*w', C) -> (B*P, h*w, C)."""
        BP, K, C = y.shape
        P, (h, w), (hk, wk) = self.copies, self.grid, self.grid_out
        B = BP // P
        stacked = y.view(B, P, hk, wk, C).permute(0, 2, 3, 1, 4).reshape(B, hk, wk, P * C)
        full = unmerge_grid(stacked, self.assignment, self.grid)  # (B, h, w, P*C)
        return full.view(B, h * w, P, C).transpose(1, 2).reshape(BP, h * w, C)


class UnfoldedGridMerge(GridMerge):
    """The grid merge of a group's first block: (B*P, h*w, C) -> (B*P, h'*w', C)."""

    def __init__(self, dim: int, metric_dim: int, grid: tuple[int, int], patch_area: int) -> None:
        super().__init__(dim, metric_dim, grid)
        self.patch_area = patch_area

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch_area={self.patch_area}"

    def merge_tokens(self, z: torch.Tensor, state: TokenState | None, prefix: int, keep: int,
                     name: str, track: bool = False) -> tuple[torch.Tensor, TokenState]:
        BP, N, C = z.shape
        (h, w), (hk, wk), P = self.grid, self.grid_out, self.patch_area
        if N != h * w or BP % P:
            raise LtmError(f"this MobileViT block was converted for a {h}x{w} patch grid and got {N} tokens; "
                           "convert the model again with --input-size set to the resolution you run")
        if keep != hk * wk:
            raise LtmError(f"grid mask configured for {hk}x{wk} targets, asked to keep {keep}; reconvert the model")
        if state is not None:
            raise LtmError("a grid group merges once, in its first block; it got already-merged tokens")
        B = BP // P
        tokens = z.view(B, P, N, C)
        assignment = self.assignment(tokens.mean(1).view(B, h, w, C))  # one assignment for all P sequences
        stacked = tokens.permute(0, 2, 1, 3).reshape(B, h, w, P * C)
        merged, sizes = self.merge(stacked, assignment)  # (B, h', w', P*C), (B, h', w')
        K = hk * wk
        out = merged.reshape(B, K, P, C).transpose(1, 2).reshape(BP, K, C)
        sizes = sizes.detach().reshape(B, 1, K).expand(B, P, K).reshape(BP, K).float()
        return out, TokenState(sizes, None, UnfoldedUnmerge(assignment, self.grid, self.grid_out, P))


# ----------------------------------------------------------------------------------------------
# finding the groups


def patch_layout(seq: tuple[int, ...], fmap: tuple[int, ...]) -> tuple[tuple[int, int], int] | None:
    """(n_h, n_w), patch_area such that a (1, C, H, W) map unfolds to (patch_area, n_h * n_w, C)."""
    if len(seq) != 3 or len(fmap) != 4 or fmap[0] != 1 or seq[2] != fmap[1]:
        return None
    area, n, (H, W) = seq[0], seq[1], fmap[2:]
    # several patch shapes can fit the numbers; the squarest one is what every known unfold uses
    for ph in sorted(range(1, area + 1), key=lambda p: (abs(p - area / p), p)):
        if area % ph or H % ph or W % (area // ph):
            continue
        nh, nw = H // ph, W // (area // ph)
        if nh * nw == n:
            return (nh, nw), area
    return None


def grid_groups(facts: GraphFacts, blocks: list["BlockMatch"], block_adds: list[tuple[fx.Node, fx.Node]]
                ) -> "list[GridGroup] | str":
    """Runs of blocks that start from an unfolded feature map, or the reason the model is not one."""
    groups: list[GridGroup] = []
    prev_out: fx.Node | None = None
    for block, (block_in, block_out) in zip(blocks, block_adds):
        source = passthrough_source(block_in)
        if groups and prev_out is not None and source is passthrough_source(prev_out):
            groups[-1].blocks.append(block.name)
        else:
            layout = patch_layout(shape_of(block_in) or (), shape_of(source) or ())
            if layout is None:
                return (f"{block.name} does not run on patches unfolded from a feature map (blocks see "
                        f"token counts {sorted({b.tokens_with_prefix for b in blocks})})")
            groups.append(GridGroup(blocks=[block.name], mergeable=block.tokens_with_prefix, grid=layout[0], patch_area=layout[1]))
        prev_out = block_out
    return groups


def grid_groups_of(plan: "ConversionPlan") -> list[GridGroup]:
    """The plan's grid groups (its family data), parsed and checked."""
    return records(GridGroup, plan.data.get("grids", []))


@builtin_family
class UnfoldedGridFamily:
    name = "unfolded-grid"
    priority = 60
    examples = (
        ("hf-config", "MobileViTModel", {"config": dict(model_type="mobilevit", image_size=64, hidden_sizes=[32, 40, 48],
                                                        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])}),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        from ltm_convert.tracer import ConversionPlan

        if analysis.cut_refusal:
            return analysis.cut_refusal
        if analysis.on_maps:
            return "its blocks work on 2-D maps, not on unfolded patches"
        groups = grid_groups(analysis.facts, analysis.blocks, analysis.block_adds)
        if isinstance(groups, str):
            return groups
        return ConversionPlan(model_class=analysis.model_class, input_size=analysis.input_size,
                              tokens_with_prefix=analysis.blocks[0].tokens_with_prefix, prefix_tokens=0,
                              heads=["grid (unmerged before the fold)"], blocks=list(analysis.blocks),
                              skipped=list(analysis.skipped), data={"grids": [asdict(g) for g in groups]})

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        if config.method != "ltm":
            raise LtmError(f"method {config.method!r} works on plain-sequence ViTs only; {plan.model_class} runs its "
                           "blocks on a 2-D patch grid, which only the grid-preserving 'ltm' method keeps")
        modules = dict(model.named_modules())
        matches = {b.name: b for b in plan.blocks}
        without_bias: dict[str, str] = {}  # block -> why its attention cannot take the size bias
        for group in grid_groups_of(plan):
            for i, name in enumerate(group.blocks):
                block, match = modules[name], matches[name]
                if i > 0:  # the blocks after a group's merge run on merged tokens: proportional attention
                    why = give_attention_a_mask(block, name, match.attn_child, analysis)
                    if why is not None:
                        without_bias[name] = why
                args, kwargs = analysis.calls[name]
                call = bind_call(block, args, kwargs)
                split = split_block(block, match.attn_child, call)
                mask = None
                if i == 0:
                    attn = getattr(block, match.attn_child)
                    mask = UnfoldedGridMerge(match.dim, metric_dim(attn, match.dim), group.grid, group.patch_area)
                    mask.init_from_block(block, attn, split.pre_norm, match.dim)
                    param = next(block.parameters())
                    mask = mask.to(device=param.device, dtype=param.dtype)
                block.__class__ = ltm_class(type(block))
                block.ltm_setup(call=call, attn_child=match.attn_child, name=name, prefix=0,
                                in_with_prefix=group.mergeable,
                                keep_mergeable=group.mergeable, mask=mask, unmerge=(i == len(group.blocks) - 1))
                block.__dict__["_ltm_split"] = split
        warn_without_bias(without_bias)

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]:
        return [Site(name=g.blocks[0], mergeable=g.mergeable, options=sorted(a * b for a, b in grid_options(*g.grid)),
                     chained=False) for g in grid_groups_of(plan)]

    def apply(self, model: nn.Module, plan: "ConversionPlan", keep: dict[str, int]) -> None:
        """Configure each group's target grid (by its token count) and the counts of all its blocks."""
        modules = dict(model.named_modules())
        get = chain_keep(keep, self.sites(model, plan))
        for group in grid_groups_of(plan):
            options = {a * b: (a, b) for a, b in grid_options(*group.grid)}
            k = get(group.blocks[0])
            if k not in options:
                raise LtmError(f"the schedule keeps {k} tokens in {group.blocks[0]}, which no grid of "
                               f"{group.grid[0]}x{group.grid[1]} patches allows; the file is corrupt")
            members = [modules[n] for n in group.blocks]
            members[0].ltm_mask.configure(*options[k])
            for i, blk in enumerate(members):
                blk.ltm_set(group.mergeable if i == 0 else k, k, i > 0 and k < group.mergeable)

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> Any:
        from ltm_convert.schedule import GridCost

        # within a group the later blocks run on K = h'w' tokens: linear layers grow with K, attention with
        # K^2; the factorised merge and unmerge also with the target grid's width w'
        shapes = {g.blocks[0]: {a * b: (a, b) for a, b in grid_options(*g.grid)} for g in grid_groups_of(plan)}
        groups = {g.blocks[0]: list(g.blocks) for g in grid_groups_of(plan)}
        return GridCost(meta_model, self.sites(meta_model, plan), groups,
                        lambda keep: self.apply(meta_model, plan, keep),
                        lambda site, k: [1.0, float(k), float(k * k), float(shapes[site.name][k][1])], plan.input_size)

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]:
        modules = dict(model.named_modules())
        grids, blocks = [], []
        for group in grid_groups_of(plan):
            mask = modules[group.blocks[0]].ltm_mask
            hk, wk = mask.grid_out
            grids.append({"blocks": list(group.blocks), "grid": list(group.grid), "grid_out": [hk, wk],
                          "patch_area": group.patch_area, "tokens_in": group.mergeable, "tokens_out": hk * wk})
            blocks += [{"name": n, "tokens_in": modules[n].ltm_in_with_prefix, "tokens_out": modules[n].ltm_keep_mergeable}
                       for n in group.blocks]
        return {"blocks": blocks, "grids": grids}

