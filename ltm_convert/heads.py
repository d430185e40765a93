"""Keep what follows the blocks correct once tokens are merged.

Token pooling (``x[:, 0]``, ``x[:, 1]``) needs nothing: prefix tokens are never merged and stay
in front. Average pooling must weight each merged token by its size, and attention pooling must
add log(size) to its logits, or the head would see a differently weighted image. The tracer says
which of these a model has; this module installs the matching adapter or refuses clearly.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ltm_convert.errors import UnsupportedModelError
from ltm_convert.ltm_block import LtmContext
from ltm_convert.tracer import ConversionPlan


def size_weighted_mean(x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens (dim 1) with each token counted ``size`` times."""
    if sizes is None:
        return x.mean(dim=1)
    w = sizes.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1)


def context_of(module: nn.Module) -> LtmContext:
    """The size context a converted model (or one of its adapted heads) shares with its blocks.

    Adapters find it through the module they are attached to, never through a closure, so a
    deep copy of the model (EMA, teacher) gets adapters that read the copy's own context.
    """
    return module.__dict__["_ltm_context"]


def _timm_pool():
    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        sizes = context_of(self).sizes
        if self.attn_pool is not None:
            start = 0 if self.pool_include_prefix else self.num_prefix_tokens
            x = x[:, start:]
            bias = None
            if sizes is not None:
                bias = sizes[:, start:].log().to(x.dtype)[:, None, None, :]
            return self.attn_pool(x, attn_mask=bias)
        if pool_type in ("avg", "avgmax") and sizes is not None:
            start = 0 if self.pool_include_prefix else self.num_prefix_tokens
            tokens = x[:, start:]
            mean = size_weighted_mean(tokens, sizes[:, start:])
            return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)
        return type(self).pool(self, x, pool_type=pool_type)

    return pool


def _siglip_head_hook(module, args, kwargs):
    """nn.MultiheadAttention pooling (SigLIP's MAP head): add log(size) to the logits."""
    sizes = context_of(module).sizes
    if sizes is None:
        return None
    query, key = args[0], args[1]
    bias = sizes.log().to(key.dtype)[:, None, None, :].expand(-1, module.num_heads, query.shape[1], -1)
    kwargs = dict(kwargs)
    kwargs["attn_mask"] = bias.reshape(-1, query.shape[1], key.shape[1])
    return args, kwargs


def _keep_sequence(module, args, output):
    seq = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    context_of(module).head_inputs["sequence"] = seq


def _size_weighted_classifier_input(module, args):
    ctx = context_of(module)
    seq, sizes = ctx.head_inputs.pop("sequence", None), ctx.sizes
    if seq is None or sizes is None:
        return None
    (linear_input,) = args
    prefix = module.__dict__["_ltm_prefix"]
    mean = size_weighted_mean(seq[:, prefix:], sizes[:, prefix:])
    return (torch.cat([linear_input[:, : seq.shape[-1]], mean], dim=1),)


def _dinov2_classifier_hooks(model: nn.Module, backbone: nn.Module, ctx: LtmContext, prefix: int) -> None:
    """Dinov2ForImageClassification averages patch tokens inside forward(); redo it size-weighted."""
    backbone.__dict__["_ltm_context"] = ctx
    model.classifier.__dict__["_ltm_context"] = ctx
    model.classifier.__dict__["_ltm_prefix"] = prefix
    backbone.register_forward_hook(_keep_sequence)
    model.classifier.register_forward_pre_hook(_size_weighted_classifier_input)


def install_head_adapters(model: nn.Module, plan: ConversionPlan, ctx: LtmContext) -> list[str]:
    """Make pooling size-aware; raises UnsupportedModelError for a head that cannot be kept exact."""
    heads = set(plan.heads)
    needs = heads & {"avg", "attention-pool"}
    if not needs:
        return []
    cls = type(model).__name__
    if callable(getattr(type(model), "pool", None)) and hasattr(model, "global_pool") and hasattr(model, "attn_pool"):
        # timm VisionTransformer and relatives: one `pool` method handles avg and attention pooling
        model.pool = types.MethodType(_timm_pool(), model)
        return ["timm-pool"]
    for holder in (model, getattr(model, "vision_model", None)):
        head = getattr(holder, "head", None)
        if needs == {"attention-pool"} and isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            head.attention.__dict__["_ltm_context"] = ctx
            head.attention.register_forward_pre_hook(_siglip_head_hook, with_kwargs=True)
            return ["mha-pool"]
    backbone = getattr(model, "dinov2", None) or getattr(model, "dinov2_with_registers", None)
    if cls.startswith("Dinov2") and cls.endswith("ForImageClassification") and needs == {"avg"} and backbone is not None:
        _dinov2_classifier_hooks(model, backbone, ctx, plan.prefix_tokens)
        return ["dinov2-classifier"]
    raise UnsupportedModelError(
        f"not supported yet: {cls} pools tokens by {' and '.join(sorted(needs))} in a way ltm_convert cannot "
        "weight by token size; use a token-pooled head (global_pool='token') or exclude nothing and open an issue"
    )
