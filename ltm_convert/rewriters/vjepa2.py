"""The V-JEPA 2 family: HF ``VJEPA2Model`` (its encoder) and ``VJEPA2ForVideoClassification``.

V-JEPA 2 cuts a clip into tubelets (one token sequence over frames x rows x columns) and rotates
queries and keys inside its attention (``VJEPA2RopeAttention``) by each token's (frame, row,
column), which it derives from the token's *index* in the sequence (``get_position_ids`` splits
``arange(tokens)``; the predictor passes ids through ``position_mask``). After a merge a token's
index no longer says where it is, so every converted block hands its attention, with the
proportional-attention bias, the merged tokens' positions: the mean (frame, row, column) of the
patches each token holds (read from the source map), the "coords" rule of the rotary family
(merge/positions.py) in V-JEPA 2's own index coordinates. The attention's class is swapped for a
generated subclass (generated.py; state-dict keys unchanged) whose ``get_position_ids`` takes
those float positions and whose softmax receives the bias (attention_bias.SizeBiasMode). Before
any merge nothing changes: the original positions, the original code.

The encoder's last block hands its tokens back over the full tubelet grid (every tubelet takes the
value of the token holding it), so the encoder output keeps the original's shape: the predictor,
the attentive pooler of the classifier and users' probes read it as before (the pooler's attention
over the spread tokens is proportional attention by member count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.generated import generated_subclass, rebuild
from ltm_convert.merge.positions import merged_coords
from ltm_convert.merge.state import TokenState
from ltm_convert.rewriters.attention_bias import forward_with_bias
from ltm_convert.rewriters.base import builtin_family
from ltm_convert.rewriters.sequence import SequenceFamily, converted_blocks

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan

ATTENTION = "VJEPA2RopeAttention"
PREFIX = "LtmVJEPA2Attention__"


class MergedPositionsAttention:
    """V-JEPA 2's attention taking ``attn_mask``: the size bias (or None), or (bias, positions (B, N, 3)
    float) once tokens have merged."""

    ltm_original_class: type

    def forward(self, hidden_states: torch.Tensor, position_mask: torch.Tensor | None = None,
                attn_mask: Any = None) -> Any:
        original = type(self).ltm_original_class
        if attn_mask is None:
            return original.forward(self, hidden_states, position_mask)
        bias, positions = attn_mask if isinstance(attn_mask, tuple) else (attn_mask, None)
        if positions is not None:
            position_mask = positions
        if bias is None:
            return original.forward(self, hidden_states, position_mask)
        return forward_with_bias(self, bias, hidden_states, position_mask)

    def get_position_ids(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        if masks is not None and masks.is_floating_point() and masks.dim() == 3:  # merged tokens' positions
            # (B, 1, N): broadcast over heads; in the model's dtype, as its integer ids are promoted
            return tuple(masks[..., i].unsqueeze(1).to(x.dtype) for i in range(3))
        return type(self).ltm_original_class.get_position_ids(self, x, masks)


def merged_class(original: type) -> type:
    """The :class:`MergedPositionsAttention` subclass of V-JEPA 2's attention (picklable by name)."""
    return generated_subclass(PREFIX, original, __name__, MergedPositionsAttention)


def __getattr__(name: str) -> Any:
    """Rebuild a generated class from its name (what pickle asks for in a fresh process)."""
    return rebuild(__name__, name, {PREFIX: merged_class})


def tubelet_positions(attn: nn.Module, device: torch.device) -> torch.Tensor:
    """(P, 3) float (frame, row, column) of every tubelet in sequence order, as the attention's own
    ``get_position_ids`` computes them from indices."""
    ids = torch.arange(attn.grid_depth * attn.grid_size * attn.grid_size, device=device)
    per_frame = attn.grid_size * attn.grid_size
    frame = ids // per_frame
    row = (ids - per_frame * frame) // attn.grid_size
    return torch.stack([frame, row, ids - per_frame * frame - attn.grid_size * row], -1).float()


@dataclass
class MergedPositions:
    """A block's rule: once tokens have merged, its attention receives their mean positions with the bias."""

    attn_child: str

    def block_inputs(self, block: nn.Module, values: dict[str, Any], state: TokenState | None,
                     bias: torch.Tensor | None) -> tuple[dict[str, Any], Any]:
        if state is None or state.source is None:
            return values, bias
        attn = block.get_submodule(self.attn_child)
        coords = tubelet_positions(attn, state.source.device)
        if state.source.shape[1] != coords.shape[0]:
            raise LtmError(f"{block.ltm_name} received {state.source.shape[1]} tubelets; V-JEPA 2 places "
                           f"{coords.shape[0]} (its config's clip): convert and run the model at its config's clip size")
        tokens = state.sizes.shape[1] - block.ltm_prefix
        return values, (bias, merged_coords(coords, state.source, block.ltm_prefix, tokens))


@builtin_family
class VJEPA2Family(SequenceFamily):
    name = "vjepa2"
    priority = 5  # before the rotary family, which refuses V-JEPA 2's index-derived positions
    follows = frozenset({ATTENTION})
    full_sequence_out = True
    examples = (
        ("hf-config", "VJEPA2Model", {"config": dict(model_type="vjepa2", crop_size=32, frames_per_clip=4, tubelet_size=2,
                                                     patch_size=8, hidden_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, mlp_ratio=2.0, pred_hidden_size=32,
                                                     pred_num_hidden_layers=1, pred_num_attention_heads=2)}),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        if not any(type(m).__name__ == ATTENTION for m in analysis.modules.values()):
            return f"{analysis.model_class} has no {ATTENTION}"
        plan = super().find(analysis)
        if isinstance(plan, str):  # said here: the rotary family would only say the positions cannot follow
            raise UnsupportedModelError(f"not supported yet: {analysis.model_class}: {plan}")
        # the encoder's blocks merge; what runs after them on its output (the classifier's attentive
        # pooler) gets the full sequence back and stays as it is
        kept = [m for m in plan.blocks if type(analysis.modules[f"{m.name}.{m.attn_child}"]).__name__ == ATTENTION]
        attn = analysis.modules[f"{kept[0].name}.{kept[0].attn_child}"]
        placed = attn.grid_depth * attn.grid_size * attn.grid_size
        if kept[0].tokens_with_prefix - plan.prefix_tokens != placed:
            raise UnsupportedModelError(
                f"not supported yet: {analysis.model_class} at {plan.input_size[0]}x{plan.input_size[1]} makes "
                f"{kept[0].tokens_with_prefix - plan.prefix_tokens} tubelets, but merged tokens are placed on its "
                f"config's clip ({attn.grid_depth} x {attn.grid_size} x {attn.grid_size} = {placed}); leave out "
                "--input-size, or build the model with crop_size / frames_per_clip for the clips you run")
        plan.skipped += [(m.name, "runs on the V-JEPA 2 encoder's output, which gets its full sequence back")
                         for m in plan.blocks if m not in kept]
        plan.blocks = kept
        last = plan.block_names[-1]
        plan.data["grid_reads"] = sorted(set(plan.data.get("grid_reads", [])) | {last})  # dense: see the docstring
        return plan

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        modules = dict(model.named_modules())
        for match in plan.blocks:
            attn = modules[f"{match.name}.{match.attn_child}"]
            if type(attn).__name__ == ATTENTION:
                attn.__class__ = merged_class(type(attn))
        super().build(model, plan, analysis, config)
        blocks = converted_blocks(model, plan)
        for block in blocks:
            block.ltm_track_sources = True  # the rule reads which token holds each original tubelet
        blocks[-1].ltm_full_grid_out = True

    def position_rule(self, model: nn.Module, block: nn.Module, match: Any, plan: "ConversionPlan",
                      analysis: "Analysis") -> MergedPositions:
        return MergedPositions(match.attn_child)
