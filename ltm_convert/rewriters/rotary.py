"""The rotary family: token-sequence models whose blocks receive a rotary position table.

timm ``Eva`` models (DINOv3, EVA02, PE, ``vit_*_rope_*`` plain and mixed) pass every block a
per-patch table ``rope``; HF ``DINOv3ViTModel`` passes ``position_embeddings = (cos, sin)``. Merged
tokens cannot use the original rows, so each converted block gets a :class:`RotaryPositions`
rule (ltm_block.PositionRule): before its attention half, the table is rebuilt for the tokens that
arrive, from the source map (which token holds each original patch; every block tracks it).
How it is rebuilt is ``LtmConfig.positions`` (merge/positions.py): "rows" (default) averages the
members' sin/cos rows (size-weighted), "coords" evaluates the model's own rope at the mean of the
members' coordinates (a true rotation), "target" keeps the row of the token each one was merged
into. Measured on a distilled RoPE model, "rows" keeps the output closest to the unmerged model
(benchmarks/README.md); "coords" may suit models trained with jittered coordinates (DINOv3).
Everything else is the sequence family's (blocks cut at the attention residual, heads, schedule).

The rule's work is elementwise (sin / cos of N x head_dim / 2 angles per block, one scatter), which
FlopCounterMode does not count and which is small against the block's matmuls; the cost model is
the sequence family's, with the table sized for the tokens each block receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltm_convert.rewriters.base import builtin_family
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.merge.positions import ROPE_PARAMS, RopeAdapter, adapter_for, gather_rows, grid_for, mean_rows, merged_coords
from ltm_convert.merge.state import TokenState, merge_sequence, recorder, recording, recording_merges
from ltm_convert.rewriters.sequence import SequenceCost, SequenceFamily, converted_blocks

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan


def _rope_modules(modules: dict[str, nn.Module]) -> tuple[list[RopeAdapter], list[str]]:
    """Adapters of the rope modules the model holds, and the reasons for those that cannot follow."""
    adapters, refused = [], []
    for module in modules.values():
        found = adapter_for(module)
        if isinstance(found, str):
            refused.append(found)
        elif found is not None:
            adapters.append(found)
    return adapters, refused


@dataclass
class RotaryPositions:
    """The rule of one block: its rotary table, rebuilt for the tokens that arrive (see the module
    docstring). ``grid``: the planned patch grid (rows, columns); ``block_index``: the block's place
    in the model (mixed RoPE has frequencies per block)."""

    adapter: RopeAdapter
    variant: str
    grid: tuple[int, int]
    block_index: int

    @property
    def param(self) -> str:
        return self.adapter.param

    def block_inputs(self, block: nn.Module, values: dict[str, Any], state: TokenState | None,
                     bias: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor | None]:
        table = values.get(self.param)
        if state is None or state.source is None or table is None:  # nothing merged (or the relaxed merge
            return values, bias  # of training, where every token stays in its place)
        prefix = block.ltm_prefix
        source = state.source
        tokens = state.sizes.shape[1] - prefix
        if self.variant == "coords":
            grid = self.grid if source.shape[1] == self.grid[0] * self.grid[1] else grid_for(source.shape[1], self.grid)
            if grid is None:
                raise LtmError(f"{block.ltm_name} was converted for a {self.grid[0]}x{self.grid[1]} patch grid and "
                               f"received {source.shape[1]} patches; convert the model at this input size")
            coords = self.adapter.patch_coords(grid, source.device)
            new = self.adapter.table(merged_coords(coords, source, prefix, tokens), table, self.block_index)
        elif self.variant == "rows":
            new = _each(table, lambda t: mean_rows(t, source, prefix, tokens))
        else:
            origin = state.grid if isinstance(state.grid, torch.Tensor) else None
            if origin is None:
                raise LtmError(f"{block.ltm_name} received merged tokens without their targets; "
                               "positions='target' needs every merging block converted by the rotary family")
            new = _each(table, lambda t: gather_rows(t, origin))
        values = dict(values)
        values[self.param] = new
        return values, bias


def _each(table: Any, fn: Any) -> Any:
    return type(table)(fn(t) for t in table) if isinstance(table, (tuple, list)) else fn(table)


class KeepTargets:
    """``positions="target"``: a block's merge also records which original patch each output token
    is (its target's, recursively), in the state's family payload, for the next block's rule. The
    mask contract returns only where each token went, so the targets are read from the mask's own
    recording of its decision."""

    def __init__(self, mask: nn.Module) -> None:
        self.mask = mask

    def __call__(self, z: torch.Tensor, state: TokenState | None, prefix: int, keep: int, name: str,
                 track: bool = False) -> tuple[torch.Tensor, TokenState]:
        outer = recorder()
        with recording(merges=recording_merges()) as records:
            merged, new = merge_sequence(self.mask, z, state, prefix, keep, name, track)
        if outer is not None:
            outer.extend(records)
        targets = records[-1]["targets"]  # (B, keep): the input patch token each output patch token is
        B, M = z.shape[0], z.shape[1] - prefix
        origin = state.grid if state is not None and isinstance(state.grid, torch.Tensor) else \
            torch.arange(M, device=z.device).expand(B, M)
        return merged, new._replace(grid=origin.gather(1, targets))


class RotaryCost(SequenceCost):
    """The sequence cost model with each block's rotary table sized for the tokens it receives."""

    def _inputs(self, block: Any, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        inputs, x = super()._inputs(block, n)
        rule = block.__dict__["_ltm_positions"]
        names = block.ltm_split().a_inputs
        for i, name in enumerate(names):
            if name == rule.param:
                inputs[i] = _each(inputs[i], lambda t: torch.empty(*t.shape[:-2], n - self.prefix, t.shape[-1],
                                                                   dtype=t.dtype, device="meta"))
        return inputs, x


@builtin_family
class RotaryFamily(SequenceFamily):
    name = "rotary"
    priority = 10
    examples = (
        ("timm", "vit_small_patch16_dinov3", dict(depth=2, embed_dim=64, num_heads=2, img_size=128)),
        ("timm", "vit_base_patch16_rope_mixed_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=96)),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        adapters, refused = _rope_modules(analysis.modules)
        if refused:
            raise UnsupportedModelError(f"not supported yet: {analysis.model_class}: {refused[0]}")
        if not adapters:
            return f"{analysis.model_class} has no rotary position module the rotary family knows"
        if len(adapters) > 1:
            return f"{analysis.model_class} has {len(adapters)} rotary position modules; the rotary family follows one"
        return super().find(analysis)

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        (adapter,), _ = _rope_modules(dict(model.named_modules()))
        patches = plan.tokens_with_prefix - plan.prefix_tokens
        grid = grid_for(patches, plan.input_size)
        if grid is None:
            raise UnsupportedModelError(f"not supported yet: {plan.model_class}'s {patches} patches at "
                                        f"{plan.input_size} do not form a grid of the input's aspect")
        super().build(model, plan, analysis, config)
        index = {id(m): i for i, m in enumerate(_block_list(model, plan))}
        for block in converted_blocks(model, plan):
            if adapter.param not in block.ltm_split().a_inputs:
                raise UnsupportedModelError(f"not supported yet: {type(block).__name__} does not pass its rotary "
                                            f"table {adapter.param!r} to its attention half")
            block.__dict__["_ltm_positions"] = RotaryPositions(adapter, config.positions, grid, index[id(block)])
            block.ltm_track_sources = True  # the rule reads which token holds each original patch
            if config.positions == "target" and block.ltm_mask is not None:
                block.ltm_mask.__dict__["merge_tokens"] = KeepTargets(block.ltm_mask)

    def check_side_inputs(self, block: nn.Module, match: Any, plan: "ConversionPlan",
                          side: dict[str, torch.Tensor]) -> None:
        """The rotary table is this family's to follow; any other per-token input is refused as before."""
        super().check_side_inputs(block, match, plan, {k: v for k, v in side.items() if k not in ROPE_PARAMS})

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> "RotaryCost":
        return RotaryCost(meta_model, plan, self)


def _block_list(model: nn.Module, plan: "ConversionPlan") -> list[nn.Module]:
    """The model's blocks in order, excluded ones included (mixed RoPE indexes its tables by them)."""
    modules = dict(model.named_modules())
    parent = plan.block_names[0].rpartition(".")[0]
    container = modules.get(parent)
    if isinstance(container, (nn.ModuleList, nn.Sequential)):
        return list(container)
    return converted_blocks(model, plan)
