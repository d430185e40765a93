"""convert(): find the blocks, swap in LTM blocks, solve the static schedule for the FLOPs target."""
from __future__ import annotations

import copy
from typing import Any, Iterable

from torch import nn

from ltm_convert import ffn_grid, grid
from ltm_convert.block_graph import capture_block_calls
from ltm_convert.config import DEFAULT_TOPK, LtmConfig, validate_ratio
from ltm_convert.errors import LtmError
from ltm_convert.flops import count_flops, meta_copy
from ltm_convert.heads import install_head_adapters
from ltm_convert.ltm_block import LtmBlock, LtmContext
from ltm_convert.model_inputs import default_input_size, example_input, run_model
from ltm_convert.rewriters import pick_rewriter
from ltm_convert.schedule import apply_fraction, solve
from ltm_convert.tracer import ConversionPlan
from ltm_convert.tracer import find_blocks as _trace_blocks


def find_blocks(model: nn.Module, *, input_size: tuple[int, int] | int | None = None,
                exclude: Iterable[str] | None = None) -> ConversionPlan:
    """What ``convert`` would change, without changing anything. Print it, or read ``.blocks``."""
    if is_converted(model):
        raise LtmError("this model is already converted; inspect it with ltm_convert.api.describe(model)")
    return _trace_blocks(model, _hw(input_size), exclude)


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, (LtmBlock, ffn_grid.FfnGridMerge)) for m in model.modules())


def ltm_blocks(model: nn.Module) -> list[tuple[str, LtmBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LtmBlock)]


def _hw(size: tuple[int, int] | int | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(v) for v in size)
    if len(size) == 1:
        return (size[0], size[0])
    if len(size) != 2:
        raise LtmError(f"input_size must be H, W or a single size, got {size!r}")
    return size  # type: ignore[return-value]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _fit_resolution(model: nn.Module, size: tuple[int, int]) -> None:
    """A timm model built for one fixed resolution is resized to the requested one (timm's own
    ``set_input_size`` resamples the position embedding), as ``timm.create_model(img_size=...)``
    would; otherwise a converted model could not run at the size its schedule was solved for."""
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is None or not hasattr(model, "set_input_size") or not getattr(embed, "strict_img_size", False):
        return
    if tuple(img_size) != tuple(size):
        model.set_input_size(img_size=tuple(size))


def convert(model: nn.Module, ratio: float = 0.8, *, input_size: tuple[int, int] | int | None = None,
            exclude: Iterable[str] | None = None, inplace: bool = False, topk: int = DEFAULT_TOPK,
            method: str = "ltm", config: LtmConfig | None = None) -> nn.Module:
    """Return the model (same class, same state-dict keys plus ``ltm_*``) with LTM blocks.

    ratio is the fraction of the original FLOPs the converted model may use at ``input_size``
    (default: the model's own resolution); 1.0 reproduces the original outputs exactly.
    """
    if config is None:
        validate_ratio(ratio)
        config = LtmConfig(ratio=float(ratio), input_size=_hw(input_size), exclude=list(exclude or []), topk=topk,
                           method=method)
    if not isinstance(model, nn.Module):
        raise LtmError(f"convert() needs a torch.nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise LtmError("this model is already converted; convert the original model instead")
    if not inplace:
        source = getattr(model, "ltm_source", None)
        model = copy.deepcopy(model)
        if source is not None:
            model.ltm_source = source
    size = config.input_size or default_input_size(model)
    config.input_size = tuple(size)  # type: ignore[assignment]
    _fit_resolution(model, tuple(size))
    was_training = model.training
    model.eval()

    plan = _trace_blocks(model, size, config.exclude)
    base_flops = None if config.keep else count_flops(model, size)
    images = example_input(model, size)
    calls = {} if plan.ffn_grids else capture_block_calls(model, plan.block_names, lambda: run_model(model, images))
    modules = dict(model.named_modules())
    ctx = LtmContext()
    new_blocks: list[LtmBlock] = []
    masks: list[ffn_grid.FfnGridMerge] = []
    if plan.ffn_grids:  # Swin / EfficientViT: each block merges inside its FFN (ffn_grid.py)
        masks = ffn_grid.convert_ffn_sites(model, plan.ffn_grids, config.method)
        adapters = []
    elif plan.grids:  # MobileViT-style: blocks on unfolded 2-D patch grids (grid.py)
        new_blocks = grid.convert_grid_blocks(model, plan, calls, ctx, _set_module, config.method)
        adapters: list[str] = []
    else:
        for i, match in enumerate(plan.blocks):
            block = modules[match.name]
            rewriter = pick_rewriter(block, match)
            new = rewriter.rewrite(block, match, calls[match.name], context=ctx, prefix=plan.prefix_tokens,
                                   first=(i == 0), topk=config.topk, method=config.method)
            _set_module(model, match.name, new)
            new_blocks.append(new)
        adapters = install_head_adapters(model, plan, ctx)
    model.__dict__["_ltm_context"] = ctx

    if config.keep:
        if plan.ffn_grids:
            ffn_grid.apply_choice(masks, ffn_grid.choice_from_keep(plan.ffn_grids, config.keep))
        elif plan.grids:
            grid.apply_grid_choice(new_blocks, plan, grid.choice_from_keep(plan, config.keep))
        else:
            _apply_keep(new_blocks, plan, config.keep)
    else:
        counted = meta_copy(model)  # solve on a weightless copy, then copy the counts over
        meta_blocks = [counted.get_submodule(name) for name in plan.block_names]

        def measure() -> int:
            return count_flops(counted, size)

        if plan.ffn_grids:
            meta_masks = ffn_grid.model_masks(counted)
            solved = ffn_grid.solve(meta_masks, plan.ffn_grids, config.ratio, counted, size, base_flops,
                                    plan.model_class)
            ffn_grid.apply_choice(masks, solved["grids"])
        elif plan.grids:
            solved = grid.solve_grids([(g.grid, g.tokens) for g in plan.grids],
                                      lambda choice: grid.apply_grid_choice(meta_blocks, plan, choice),
                                      config.ratio, measure, base_flops, plan.model_class)
            grid.apply_grid_choice(new_blocks, plan, solved["grids"])
        else:
            solve(meta_blocks, config.ratio, plan.num_tokens, plan.prefix_tokens, measure=measure,
                  base_flops=base_flops)
            for blk, meta_blk in zip(new_blocks, meta_blocks):
                blk.ltm_tokens_in, blk.ltm_keep, blk.ltm_prop_attn = (
                    meta_blk.ltm_tokens_in, meta_blk.ltm_keep, meta_blk.ltm_prop_attn)
        config.keep = ({m.ltm_name: m.tokens_out for m in masks} if masks else
                       {name: blk.ltm_keep for name, blk in zip(plan.block_names, new_blocks)})
    model.ltm_config = config
    model.ltm_plan = plan
    model.ltm_base_flops = base_flops
    model.ltm_head_adapters = adapters
    model.train(was_training)
    return model


def _apply_keep(blocks: list[LtmBlock], plan: ConversionPlan, keep: dict[str, int]) -> None:
    """Replay a saved schedule exactly (used by io.load)."""
    missing = [n for n in plan.block_names if n not in keep]
    if missing:
        raise LtmError(f"the saved schedule does not cover blocks {missing[:3]}; the file belongs to another model")
    apply_fraction(blocks, 1.0, plan.num_tokens, plan.prefix_tokens)
    m = plan.num_tokens - plan.prefix_tokens
    merged = False
    for name, blk in zip(plan.block_names, blocks):
        k = int(keep[name])
        if not 1 <= k <= m:
            raise LtmError(f"the saved schedule keeps {k} tokens in {name}, which receives {m}; the file is corrupt")
        blk.ltm_tokens_in, blk.ltm_keep, blk.ltm_prop_attn = plan.prefix_tokens + m, k, merged
        merged = merged or k < m
        m = k


def describe(model: nn.Module) -> dict[str, Any]:
    """A JSON-able summary of a converted model: schedule, FLOPs before/after, parameters added."""
    if not is_converted(model):
        raise LtmError("describe() needs a converted model; call convert() first")
    config: LtmConfig = model.ltm_config
    plan: ConversionPlan = model.ltm_plan
    size = tuple(config.input_size)
    converted_flops = count_flops(model, size)
    base = getattr(model, "ltm_base_flops", None)
    if base is None:
        base = model.ltm_base_flops = _original_flops(model, size)
    added = sum(p.numel() for n, p in model.named_parameters() if _is_ltm_name(n))
    total = sum(p.numel() for p in model.parameters())
    blocks = merge_counts(model)
    source = getattr(model, "ltm_source", None)
    extra = {}
    if plan.grids:
        extra = {"grids": grid.grid_groups_summary(plan, [b for _, b in ltm_blocks(model)])}
    elif plan.ffn_grids:
        extra = {"grids": ffn_grid.summary(ffn_grid.model_masks(model))}
    return {
        **extra,
        "model": type(model).__name__,
        "source": source.to_dict() if source is not None else None,
        "ratio": config.ratio,
        "input_size": list(size),
        "method": config.method,
        "topk": config.topk if config.method == "ltm" else None,
        "prefix_tokens": plan.prefix_tokens,
        "head": ", ".join(plan.heads),
        "blocks": blocks,
        "flops_original": int(base),
        "flops_converted": int(converted_flops),
        "flops_ratio": converted_flops / base if base else 1.0,
        "params_original": int(total - added),
        "params_added": int(added),
    }


def merge_counts(model: nn.Module) -> list[dict[str, Any]]:
    """Per converted block: its name and the tokens it receives and passes on (to its FFN, for
    grid blocks that merge inside the FFN)."""
    if getattr(model, "ltm_plan", None) is not None and model.ltm_plan.ffn_grids:
        return [{"name": m.ltm_name, "tokens_in": m.tokens_in, "tokens_out": m.tokens_out}
                for m in ffn_grid.model_masks(model)]
    return [{"name": name, "tokens_in": blk.ltm_tokens_in, "tokens_out": blk.ltm_prefix + blk.ltm_keep}
            for name, blk in ltm_blocks(model)]


def _original_flops(model: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of the model with merging switched off (identical to the original model)."""
    counted = meta_copy(model)
    disable_merging(counted)
    return count_flops(counted, size)


def disable_merging(model: nn.Module) -> None:
    """Make every LTM block keep all its tokens: the original model's computation, same weights."""
    plan: ConversionPlan = model.ltm_plan
    blocks = [b for _, b in ltm_blocks(model)]
    if plan.ffn_grids:
        masks = ffn_grid.model_masks(model)
        ffn_grid.apply_choice(masks, [m.grid for m in masks])
    elif plan.grids:
        grid.apply_grid_choice(blocks, plan, [g.grid for g in plan.grids])
    else:
        apply_fraction(blocks, 1.0, plan.num_tokens, plan.prefix_tokens)


def unmerged_copy(model: nn.Module) -> nn.Module:
    """A copy of a converted model that merges nothing (teacher for fine-tuning, bench baseline)."""
    original = copy.deepcopy(model)
    disable_merging(original)
    return original


def _is_ltm_name(name: str) -> bool:
    return any(part.startswith("ltm_") for part in name.split("."))


def ltm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters conversion added (all live under an ``ltm_`` name)."""
    return [(n, p) for n, p in model.named_parameters() if _is_ltm_name(n)]
