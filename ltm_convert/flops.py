"""FLOPs as torch counts them (torch.utils.flop_counter), the unit every ratio here is measured in.

Counting runs on a copy of the model on the ``meta`` device: shapes are all FlopCounterMode needs,
so nothing is computed and the user's model is left alone.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltm_convert.model_inputs import example_input, run_model


def meta_copy(model: nn.Module) -> nn.Module:
    """A weightless copy of the model for counting (same structure, tensors on ``meta``)."""
    if next(model.parameters()).device.type == "meta":
        return model
    memo: dict[int, object] = {}
    for p in list(model.parameters()) + list(model.buffers()):  # do not copy the weights themselves
        memo[id(p)] = (nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                       if isinstance(p, nn.Parameter) else torch.empty_like(p, device="meta"))
    return copy.deepcopy(model, memo)


def count_flops(model: nn.Module, input_size: tuple[int, int] | None = None, batch: int = 1) -> int:
    """Forward FLOPs (2 x multiply-accumulates) of one batch at ``input_size``, in eval mode."""
    counted = meta_copy(model)
    images = example_input(counted, input_size, batch=batch, device="meta")
    counted.eval()
    # FlopCounterMode's module tracker trips on parameters that require grad under no_grad
    for p in counted.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run_model(counted, images)
    return int(counter.get_total_flops())


def count_flops_by_module(model: nn.Module, input_size: tuple[int, int] | None, names: list[str]) -> dict[str, int]:
    """Forward FLOPs spent inside each named sub-module (module paths), from one counted run."""
    counted = meta_copy(model)
    images = example_input(counted, input_size, batch=1, device="meta")
    counted.eval()
    for p in counted.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run_model(counted, images)
    root = type(counted).__name__
    per_module = counter.get_flop_counts()
    return {n: int(sum(per_module.get(f"{root}.{n}", {}).values())) for n in names}


def count_call(fn: "Callable[[], object]") -> int:
    """FLOPs of one call (on meta tensors, under no_grad): the cost of a piece of a model."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def meta_like(t: torch.Tensor, shape: "tuple[int, ...] | None" = None) -> torch.Tensor:
    """An empty meta tensor with t's dtype (and its shape, or ``shape``); a tuple / list of tensors
    (HF's rotary ``(cos, sin)``) gives one of the same kind."""
    if isinstance(t, (tuple, list)) and shape is None:
        return type(t)(meta_like(v) for v in t)
    return torch.empty(tuple(t.shape) if shape is None else shape, dtype=t.dtype, device="meta")
