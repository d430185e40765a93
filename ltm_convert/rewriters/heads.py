"""Keep what follows the blocks correct once tokens are merged (token-sequence family).

Token pooling (``x[:, 0]``, ``x[:, 1]``) needs nothing: prefix tokens are never merged and stay
in front. Average pooling must weight each merged token by its size, and attention pooling must
add log(size) to its logits, or the head would see a differently weighted image. The sizes come
with the token tensor (merge/state.py): the modules between the last block and the head (the
final norm) pass them on, and the adapters read them from the tensor they receive, so a head
called later on cached features (``forward_head(forward_features(x))``) pools with the sizes of
those features and nothing else.

Adapters are hooks or :class:`InstanceMethod` overrides of module-level functions: they pickle
and deep-copy with the model.
"""
from __future__ import annotations

import inspect
import threading
from typing import Any, Callable

import torch
from torch import nn

from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.state import carry_state, state_of
from ltm_convert.tracer import ConversionPlan


class InstanceMethod:
    """A per-instance override of a model method: ``owner.name(*a)`` calls ``func(owner, *a)``.

    Unlike ``types.MethodType`` it pickles (the function is module-level, the owner is pickled
    with the model) and deep-copies with its model (the copy's override calls the copy).
    """

    def __init__(self, owner: nn.Module, func: Callable[..., Any]) -> None:
        self.__self__ = owner
        self.__func__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)


def size_weighted_mean(x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens (dim 1) with each token counted ``size`` times."""
    if sizes is None:
        return x.mean(dim=1)
    w = sizes.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1)


def timm_pool(model: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """timm VisionTransformer.pool with size-weighted averages and a log-size attention-pool bias."""
    pool_type = model.global_pool if pool_type is None else pool_type
    state = state_of(x)
    if state is None:
        return type(model).pool(model, x, pool_type=pool_type)
    sizes = state.sizes
    start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    if getattr(model, "attn_pool", None) is not None:
        bias = sizes[:, start:].log().to(x.dtype)[:, None, None, :]
        return model.attn_pool(x[:, start:], attn_mask=bias)
    if pool_type in ("avg", "avgmax"):
        tokens = x[:, start:]
        mean = size_weighted_mean(tokens, sizes[:, start:])
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)
    return type(model).pool(model, x, pool_type=pool_type)


def timm_mean_head(model: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """timm ``forward_head`` that averages ``x[:, num_prefix_tokens:]`` (BEiT, VisionTransformerRelPos):
    handed one patch token, the size-weighted mean of them all, the original head computes the rest."""
    state = state_of(x)
    if state is not None:
        p = model.num_prefix_tokens
        x = torch.cat([x[:, :p], size_weighted_mean(x[:, p:], state.sizes[:, p:])[:, None]], dim=1)
    return type(model).forward_head(model, x, *args, **kwargs)


def _mha_pool_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """nn.MultiheadAttention pooling (SigLIP's MAP head): add log(size) of the keys to the logits."""
    key = args[1] if len(args) > 1 else kwargs.get("key")
    state = state_of(key)
    if state is None:
        return None
    query = args[0] if args else kwargs["query"]
    bias = state.sizes.log().to(key.dtype)[:, None, None, :].expand(-1, module.num_heads, query.shape[1], -1)
    bias = bias.reshape(-1, query.shape[1], key.shape[1])
    kwargs = dict(kwargs)
    given = kwargs.get("attn_mask")  # the model's own mask (SigLIP2's padding): kept, the sizes added
    if given is not None and given.dtype == torch.bool:  # nn.MultiheadAttention: True = may not attend
        bias = bias.masked_fill(given.expand_as(bias), float("-inf"))
    elif given is not None:
        bias = bias + given.to(bias.dtype)
    kwargs["attn_mask"] = bias
    return args, kwargs


# Dinov2ForImageClassification and VideoMAEForVideoClassification average the patch tokens inside
# their own forward. The model's forward runs HF's forward inside a frame of this thread; the
# backbone's output hook puts the sequence (with its sizes) into the frame and a pre-hook on the
# module that receives the mean (Dinov2's classifier, VideoMAE's fc_norm), only inside that frame,
# replaces the plain mean by the size-weighted one. That module called on its own gets exactly
# what it is given. (In inference the last block hands the full grid back, whose plain mean is
# already exact and carries no sizes; the hook matters for the relaxed merge of training.)
_FRAMES = threading.local()


def _frames() -> list[dict]:
    stack = getattr(_FRAMES, "stack", None)
    if stack is None:
        stack = _FRAMES.stack = []
    return stack


def classifier_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    stack = _frames()
    stack.append({"backbone": model.get_submodule(model.__dict__["_ltm_backbone"]),
                  "classifier": model.get_submodule(model.__dict__.get("_ltm_pooled", "classifier")),
                  "prefix": model.__dict__["_ltm_prefix"], "joined": model.__dict__.get("_ltm_joined", True)})
    try:
        return type(model).forward(model, *args, **kwargs)
    finally:
        stack.pop()


def _keep_sequence(module: nn.Module, args: tuple, output: Any) -> None:
    stack = _frames()
    if stack and stack[-1]["backbone"] is module:
        stack[-1]["sequence"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _size_weighted_classifier_input(module: nn.Module, args: tuple) -> tuple | None:
    stack = _frames()
    if not stack or stack[-1]["classifier"] is not module:
        return None
    seq = stack[-1].pop("sequence", None)
    state = state_of(seq)
    if seq is None or state is None:
        return None
    (pooled_input,) = args
    prefix = stack[-1]["prefix"]
    sizes = state.sizes if state.valid is None else state.sizes * state.valid.to(state.sizes.dtype)  # padding: 0
    mean = size_weighted_mean(seq[:, prefix:], sizes[:, prefix:])
    if not stack[-1]["joined"]:  # the module receives the mean itself (VideoMAE's fc_norm)
        return (mean,)
    return (torch.cat([pooled_input[:, : seq.shape[-1]], mean], dim=1),)  # Dinov2: [class token, mean]


def _mean_classifier(model: nn.Module, backbone: str, prefix: int, pooled: str = "classifier",
                     joined: bool = True) -> None:
    """Hook an HF classifier that averages its backbone's tokens (see above). ``pooled``: the module
    that receives the mean; ``joined``: it receives [class token, mean] (Dinov2) rather than the mean."""
    model.__dict__["_ltm_backbone"] = backbone
    model.__dict__["_ltm_prefix"] = prefix
    model.__dict__["_ltm_pooled"] = pooled
    model.__dict__["_ltm_joined"] = joined
    model.get_submodule(backbone).register_forward_hook(_keep_sequence)
    model.get_submodule(pooled).register_forward_pre_hook(_size_weighted_classifier_input)
    model.forward = InstanceMethod(model, classifier_forward)


def _patch_grid(model: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """The patch grid timm lays an image's tokens out on (VisionTransformer: ``patch_embed``; NaFlexVit: ``embeds``)."""
    embed = model.patch_embed if hasattr(model, "patch_embed") else model.embeds
    if hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size(tuple(image.shape[-2:]))
        return int(h), int(w)
    return tuple(embed.grid_size)


def _patch_slots(model: nn.Module, x: Any, image: bool) -> int | None:
    """How many patch tokens the input has before any merge (None: this model does not say)."""
    if not image:  # a NaFlex batch: patches (B, N, P*P*C), padding included
        return int((x["patches"] if isinstance(x, dict) else x).shape[1])
    try:
        h, w = _patch_grid(model, x)
    except (AttributeError, TypeError):
        return None
    return h * w


def _spread_intermediate(y: torch.Tensor, block: Any, state: Any, prefix: int, slots: int | None) -> torch.Tensor:
    """(B, N', C) patch tokens a block output holds (prefix tokens already split off) -> (B, P0, C) over
    all P0 original patch slots: each takes the value of the token it was merged into. A sequence
    that was never merged, or that its block handed out spread already, is returned as it is."""
    if state is None or state.soft or state.rows is not None or y.shape[1] == slots \
            or y.shape[1] != state.sizes.shape[1] - prefix:
        return y
    if block.ltm_collapse and y.shape[1] == 1:
        raise LtmError(f"{block.ltm_name} merges all its patch tokens into one (the model was converted for "
                       "a head that reads only the class token), so its full-grid map or tokens would be one "
                       "vector repeated; convert with dense=True (CLI: --dense) for full-grid outputs of that block")
    if state.source is None:
        raise LtmError(f"{block.ltm_name} left merged tokens without their source map, so its output cannot be "
                       "spread over the patch grid; call forward_intermediates on the converted model itself")
    return take_rows(y, state.source - prefix)


def timm_forward_intermediates(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """timm's forward_intermediates (VisionTransformer and relatives, NaFlexVit; hence also
    ``get_intermediate_layers`` and ``FeatureGetterNet``) with every intermediate on the full patch
    grid, as the original hands it out: every original patch takes the value of the token it was
    merged into, so dense heads (segmentation, depth) keep working on a converted model. NCHW maps
    and NLC tokens alike (prefix tokens split off as timm does, ``norm`` applied per token first);
    for a padded NaFlex batch (NLC only, as in timm) every slot, padding included, of the original
    sequence. The output of a block that merged all its patches into one (the last block of a
    class-token model not converted ``dense``) is refused: it would be one vector repeated over the grid.
    The final features (``intermediates_only=False``) stay the merged tokens ``forward_features`` gives."""
    from timm.models._features import feature_take_indices

    from ltm_convert.merge.state import capturing, tracking_sources

    method = type(model).forward_intermediates
    signature = inspect.signature(method.__get__(model))
    bound = signature.bind(*args, **kwargs)
    if "output_fmt" not in signature.parameters:
        return method(model, *args, **kwargs)
    fmt = bound.arguments.get("output_fmt", signature.parameters["output_fmt"].default)
    x = next(iter(bound.arguments.values()))
    image = isinstance(x, torch.Tensor) and x.dim() == 4 and bound.arguments.get("patch_coord") is None
    if fmt == "NCHW" and not image:
        raise LtmError("forward_intermediates(output_fmt='NCHW') needs images: a NaFlex batch (patches with "
                       "patch_coord / patch_valid) has a grid per sample; ask for output_fmt='NLC'")
    bound.arguments["output_fmt"] = "NLC"
    with tracking_sources(), capturing() as states:
        out = method(model, *bound.args, **bound.kwargs)
    take, _ = feature_take_indices(len(model.blocks), bound.arguments.get("indices"))
    take = sorted(set(take))  # timm appends them in block order
    blocks = list(model.blocks)
    # the tokens the blocks keep in front (CaiT's blocks see no class token: it joins after them)
    prefix = next((b.ltm_prefix for b in blocks if hasattr(b, "ltm_prefix")), model.num_prefix_tokens)
    grid = _patch_grid(model, x) if fmt == "NCHW" else None
    slots = _patch_slots(model, x, image)

    def full(y: torch.Tensor, i: int) -> torch.Tensor:
        # the converted block whose output block i's output is (an unconverted block passes its input's state on)
        block = next((b for b in reversed(blocks[:i + 1]) if getattr(b, "ltm_name", None) in states), None)
        if block is not None:
            y = _spread_intermediate(y, block, states[block.ltm_name], prefix, slots)
        if grid is None:
            return y
        return y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

    def all_full(items: list) -> list:  # return_prefix_tokens=True: (spatial tokens, prefix tokens) pairs
        return [(full(y[0], i), *y[1:]) if isinstance(y, tuple) else full(y, i) for y, i in zip(items, take)]

    if isinstance(out, dict):
        out["image_intermediates"] = all_full(out["image_intermediates"])
        return out
    if isinstance(out, tuple):
        final, inter = out
        return final, all_full(inter)
    return all_full(out)


def _reshape_unchanged(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of an HF backbone converted with ``reshape_hidden_states=False``: its intermediate
    stages hand out merged tokens, which the switched-on reshape cannot lay out on the grid."""
    if model.config.reshape_hidden_states and not model.ltm_plan.data.get("reshape_hidden_states", True):
        raise LtmError(f"this {type(model).__name__} was converted with config.reshape_hidden_states=False (its "
                       "intermediate feature maps are merged token sequences); convert it with "
                       "reshape_hidden_states=True for full-grid feature maps")


def install_client_adapters(model: nn.Module, plan: ConversionPlan) -> None:
    """Client paths beyond the head: timm's forward_intermediates (VisionTransformer and relatives,
    NaFlexVit) gives full-grid outputs, also where the timm model sits inside a wrapper
    (``features_only``'s FeatureGetterNet); an HF backbone converted without reshaping refuses to
    reshape later in one line."""
    if plan.data.get("reshape_hidden_states") is False:
        model.register_forward_pre_hook(_reshape_unchanged)
    for module in model.modules():
        embedded = hasattr(module, "patch_embed") or hasattr(module, "embeds")  # NaFlexVit: embeds
        if callable(getattr(type(module), "forward_intermediates", None)) and embedded \
                and hasattr(module, "blocks") and hasattr(module, "num_prefix_tokens"):
            module.forward_intermediates = InstanceMethod(module, timm_forward_intermediates)


# head adapters a family file adds for its models: (model, plan, needs) -> adapter name, or None
HEAD_ADAPTERS: list[Callable[[nn.Module, ConversionPlan, set[str]], "str | None"]] = []


def install_head_adapters(model: nn.Module, plan: ConversionPlan) -> list[str]:
    """Make pooling size-aware; raises UnsupportedModelError for a head that cannot be kept exact."""
    for path in plan.data.get("carry", []):
        model.get_submodule(path).register_forward_hook(carry_state)
    install_client_adapters(model, plan)
    heads = set(plan.heads)
    needs = heads & {"avg", "attention-pool"}
    if not needs:
        return []
    cls = type(model).__name__
    for adapter in HEAD_ADAPTERS:  # a family's own adapters know their models best
        found = adapter(model, plan, needs)
        if found:
            return [found]
    if callable(getattr(type(model), "pool", None)) and hasattr(model, "global_pool") and hasattr(model, "attn_pool"):
        # timm VisionTransformer and relatives: one `pool` method handles avg and attention pooling
        model.pool = InstanceMethod(model, timm_pool)
        return ["timm-pool"]
    if needs == {"avg"} and getattr(model, "global_pool", None) == "avg" and type(model).__module__.startswith("timm.") \
            and callable(getattr(type(model), "forward_head", None)) and hasattr(model, "num_prefix_tokens"):
        model.forward_head = InstanceMethod(model, timm_mean_head)
        return ["timm-mean-head"]
    for holder in (model, getattr(model, "vision_model", None)):
        head = getattr(holder, "head", None)
        if needs == {"attention-pool"} and isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            head.attention.register_forward_pre_hook(_mha_pool_bias, with_kwargs=True)
            return ["mha-pool"]
    backbone = next((n for n in ("dinov2", "dinov2_with_registers") if isinstance(getattr(model, n, None), nn.Module)), None)
    if cls.startswith("Dinov2") and cls.endswith("ForImageClassification") and needs == {"avg"} and backbone is not None:
        _mean_classifier(model, backbone, plan.prefix_tokens)
        return ["dinov2-classifier"]
    if cls == "VideoMAEForVideoClassification" and needs == {"avg"} and isinstance(getattr(model, "fc_norm", None), nn.Module):
        _mean_classifier(model, "videomae", plan.prefix_tokens, pooled="fc_norm", joined=False)
        return ["videomae-classifier"]
    raise UnsupportedModelError(
        f"not supported yet: {cls} pools tokens by {' and '.join(sorted(needs))} in a way ltm_convert cannot "
        f"weight by token size; {_class_token_hint(model)}"
    )


def _class_token_hint(model: nn.Module) -> str:
    """How this model is told to read its class token instead (timm and HF spell it differently)."""
    if isinstance(getattr(model, "global_pool", None), str):
        return "use a token-pooled head (timm: global_pool='token')"
    for holder in (model, *model.children()):
        if isinstance(getattr(getattr(holder, "config", None), "use_mean_pooling", None), bool):
            return "build it with config.use_mean_pooling=False (its pooler then reads the class token)"
    return "use a head that reads the class token"
