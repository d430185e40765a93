"""The NaFlex family: timm ``naflexvit_*`` and HF ``Siglip2VisionModel`` (SigLIP2 NaFlex), on plain images
and on padded NaFlex batches.

A NaFlexViT embeds patches with a linear layer and takes either an image or a NaFlex batch: patches
(B, N, P*P*C) with their coordinates and a validity mask (``patch_valid``) that marks padding. The
model turns the validity into an attention mask passed to every block (timm ``attn_mask``, HF
``attention_mask``; (B, 1, N, N) or key-only (B, 1, 1, N)) and pools the valid patches only. HF's
SigLIP2 takes ``pixel_values`` already cut into patches with ``pixel_attention_mask`` and
``spatial_shapes``; the tool feeds it images through model_inputs.naflex_batch. Everything else is the sequence
family's: blocks cut at the attention residual, the schedule, the last block spreading its tokens
back over the full patch grid for the pooling head.

Converted for plain images (traced without a mask), each block also accepts the mask
(:class:`PaddingMask`, the block's position rule): the first block finds which tokens are real
from it, merges keep real tokens and padding apart at a static count per batch (merge/padding.py),
and every later block receives the mask rebuilt for its merged tokens, with the proportional-
attention bias added. The head gets the full patch grid back, so the model's own masked pooling
reads it. The FLOPs target holds for one image at the converted ``input_size``; a NaFlex batch of
another length keeps the same fraction of its tokens in every block (``LtmBlockMixin.keep_for``).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltm_convert.analysis.block_split import BlockCall, bind_call, trace_block
from ltm_convert.errors import LtmError
from ltm_convert.merge.state import TokenState, state_of
from ltm_convert.rewriters.base import Site, builtin_family
from ltm_convert.rewriters.heads import HEAD_ADAPTERS, size_weighted_mean
from ltm_convert.rewriters.sequence import SequenceFamily

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.tracer import Analysis, ConversionPlan

MASK_PARAM = "attn_mask"  # how timm's blocks and attention name the additive mask
HF_MASK_PARAM = "attention_mask"  # ... and HF's


def _takes(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def is_naflex(model: nn.Module) -> bool:
    """A model that takes NaFlex batches (timm NaFlexVit: ``forward(x, patch_coord, patch_valid)``; HF
    SigLIP2: ``forward(pixel_values, pixel_attention_mask, spatial_shapes)``)."""
    return mask_param(model) is not None


def mask_param(model: nn.Module) -> str | None:
    """The name under which a NaFlex model hands its blocks the padding mask (None: not NaFlex)."""
    forward = type(model).forward
    if _takes(forward, "patch_valid") and _takes(forward, "patch_coord"):
        return MASK_PARAM
    if _takes(forward, "pixel_attention_mask") and _takes(forward, "spatial_shapes"):
        return HF_MASK_PARAM
    return None


def valid_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the tokens some query may attend to, from an additive float or a boolean mask
    (B, 1, Nq, N). Padding keys are masked for every query."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=-2)[:, 0]


def mask_for(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The attention mask of tokens with validity ``valid`` (B, N), in the form of ``like`` (the
    model's own: symmetric (B, 1, N, N) or key-only (B, 1, 1, N); additive float or boolean)."""
    if like.shape[-2] == 1:
        allowed = valid[:, None, None, :]
    else:
        allowed = (valid.unsqueeze(-1) & valid.unsqueeze(1)).unsqueeze(1)
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(
        ~allowed, torch.finfo(like.dtype).min)


@dataclass
class PaddingMask:
    """A block's rule for NaFlex batches: the attention mask follows the merged tokens (see the module
    docstring). Plain images (no mask) pass through untouched."""

    accepts: tuple[str, ...] = (MASK_PARAM,)

    @property
    def param(self) -> str:
        return self.accepts[0]

    def arriving(self, block: nn.Module, values: dict[str, Any], state: TokenState | None) -> TokenState | None:
        mask = values.get(self.param)
        if mask is None or (state is not None and state.valid is not None):
            return state
        valid = valid_from_mask(mask)
        if bool(valid.all()):  # nothing padded (HF SigLIP2 fed images, an export): the plain merge
            return state
        x = values[block.ltm_split().a_inputs[0]]
        if mask.shape[-1] != x.shape[1]:
            raise LtmError(f"{block.ltm_name} received {x.shape[1]} merged tokens with an attention mask for "
                           f"{mask.shape[-1]}: the tokens' validity was lost between the blocks; call the blocks "
                           "in sequence")
        if state is None:
            state = TokenState(torch.ones(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device))
        return state._replace(valid=valid)

    def block_inputs(self, block: nn.Module, values: dict[str, Any], state: TokenState | None,
                     bias: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor | None]:
        mask = values.get(self.param)
        if mask is None:
            return values, bias
        values = dict(values)
        values[self.param] = None  # the block was cut with no mask: it reaches the attention as the bias
        if state is None or state.valid is None:  # arriving (called first) found no padding: nothing to mask
            return values, bias
        if state is not None and state.valid is not None and state.valid.shape[1] != mask.shape[-1]:
            mask = mask_for(state.valid, mask)
        if bias is None:
            return values, mask
        if mask.dtype == torch.bool:
            return values, torch.where(mask, bias, torch.finfo(bias.dtype).min)
        return values, mask + bias.to(mask.dtype)


def _mask_reaches_attention_only(block: nn.Module, call: BlockCall, attn_child: str, param: str) -> str | None:
    """Why the block's mask ``param`` cannot be taken over as its attention's bias (None: it can): it
    must feed the attention child's argument of that name and nothing else."""
    if not _takes(type(block).forward, param):
        return f"{type(block).__name__}.forward takes no {param!r}"
    names = [*call.tensor_names, param] if param not in call.tensor_names else call.tensor_names
    masked = BlockCall(tensor_names=names, constants={k: v for k, v in call.constants.items() if k != param},
                       x_name=call.x_name)
    graph = trace_block(block, masked)
    node = next((n for n in graph.nodes if n.op == "placeholder" and n.target == param), None)
    users = list(node.users) if node is not None else []
    if len(users) != 1 or users[0].op != "call_module" or users[0].target != attn_child \
            or users[0].kwargs.get(param) is not node:
        return f"{type(block).__name__} uses its {param!r} beyond passing it to {attn_child}({param}=...)"
    return None


@builtin_family
class NaFlexFamily(SequenceFamily):
    name = "naflex"
    priority = 40
    examples = (
        # converted at the model's own 384 px: 576 patches
        ("timm", "naflexvit_base_patch16_gap", dict(depth=4, embed_dim=64, num_heads=2, num_classes=5)),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        model = analysis.modules[""]
        param = mask_param(model)
        if param is None:
            return (f"{analysis.model_class} takes no NaFlex batches (its forward has no patch_coord / patch_valid, "
                    "nor pixel_attention_mask / spatial_shapes)")
        plan = super().find(analysis)
        if isinstance(plan, str):
            return plan
        for match in plan.blocks:
            block = analysis.modules[match.name]
            args, kwargs = analysis.calls[match.name]
            why = _mask_reaches_attention_only(block, bind_call(block, args, kwargs), match.attn_child, param)
            if why is not None:
                return f"not supported yet: {why}, so merged tokens of a padded NaFlex batch could not be masked"
        return plan

    def position_rule(self, model: nn.Module, block: nn.Module, match: Any, plan: "ConversionPlan",
                      analysis: "Analysis") -> PaddingMask:
        return PaddingMask(accepts=(mask_param(model) or MASK_PARAM,))

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]:
        # no last-block collapse: it would pour a padded batch's padding into its real patches
        return [dataclasses.replace(s, free=False) for s in super().sites(model, plan)]

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]:
        info = super().describe(model, plan)
        h, w = plan.input_size
        info["flops_for"] = (f"one {h}x{w} image: {plan.tokens_with_prefix} tokens ({plan.prefix_tokens} prefix); a "
                             "NaFlex batch of another length keeps the same fraction of its tokens per block")
        return info


def naflex_pool(model: nn.Module, x: torch.Tensor, pool_type: str | None = None,
                patch_valid: torch.Tensor | None = None) -> torch.Tensor:
    """NaFlexVit ``_pool`` on merged tokens that kept their sizes (the relaxed merge of training; at
    inference the head gets the full grid back and the model's own pooling runs): each token counts
    by its size, padding not at all."""
    state = state_of(x)
    pool_type = model.global_pool if pool_type is None else pool_type
    if state is None or x.shape[1] != state.sizes.shape[1] or pool_type not in ("avg", "map"):
        return type(model)._pool(model, x, pool_type=pool_type, patch_valid=patch_valid)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    sizes = state.sizes[:, start:]
    if patch_valid is not None:
        if patch_valid.shape[1] != x.shape[1] - model.num_prefix_tokens:
            raise LtmError("the head received merged tokens with a patch_valid mask for the full grid; pass "
                           "patch_valid=None or the tokens the last block returns on the full grid")
        keep = patch_valid if start else torch.cat([patch_valid.new_ones(x.shape[0], model.num_prefix_tokens),
                                                   patch_valid], dim=1)
        sizes = sizes * keep.to(sizes.dtype)
    if model.attn_pool is not None:
        bias = sizes.clamp_min(1e-30).log().to(x.dtype)[:, None, None, :]
        return model.attn_pool(x[:, start:], attn_mask=bias)
    return size_weighted_mean(x[:, start:], sizes)


def naflex_head(model: nn.Module, plan: "ConversionPlan", needs: set[str]) -> str | None:
    """Head adapter (rewriters/heads.py ``HEAD_ADAPTERS``) for NaFlexVit's ``_pool``."""
    if not is_naflex(model) or not callable(getattr(type(model), "_pool", None)):
        return None
    from ltm_convert.rewriters.heads import InstanceMethod

    model._pool = InstanceMethod(model, naflex_pool)
    return "naflex-pool"


def siglip2_heads(model: nn.Module, plan: "ConversionPlan", needs: set[str]) -> str | None:
    """Head adapter for HF SigLIP2: its MAP head (nn.MultiheadAttention, given the padding mask) gets
    the sizes added to that mask, and Siglip2ForImageClassification's masked mean of the vision
    model's tokens becomes size-weighted. Both matter only where merged tokens reach the head with
    sizes (the relaxed merge of training, on plain images); in inference the last block hands the
    head the full sequence and the model's own masked pooling runs."""
    from ltm_convert.model_inputs import is_hf_model
    from ltm_convert.rewriters.heads import _mean_classifier, _mha_pool_bias

    if mask_param(model) != HF_MASK_PARAM or not is_hf_model(model):
        return None
    vision = getattr(model, "vision_model", None) or model
    head = getattr(vision, "head", None)
    mha = getattr(head, "attention", None)
    if "attention-pool" in needs and not isinstance(mha, nn.MultiheadAttention):
        return None
    averaged = type(model).__name__ == "Siglip2ForImageClassification" and vision is not model
    if "avg" in needs and not averaged:
        return None
    if isinstance(mha, nn.MultiheadAttention):
        mha.register_forward_pre_hook(_mha_pool_bias, with_kwargs=True)
    if averaged:
        _mean_classifier(model, "vision_model", 0, pooled="classifier", joined=False)
    return "siglip2-pool"


HEAD_ADAPTERS.insert(0, naflex_head)
HEAD_ADAPTERS.insert(1, siglip2_heads)
