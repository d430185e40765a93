"""FLOPs as torch counts them (torch.utils.flop_counter), the unit every ratio here is measured in."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ltm_convert.model_inputs import example_input, run_model


def count_flops(model: nn.Module, input_size: tuple[int, int] | None = None, batch: int = 1) -> int:
    """Forward FLOPs (2 x multiply-accumulates) of one batch at ``input_size``, in eval mode."""
    images = example_input(model, input_size, batch=batch)
    was_training = model.training
    # FlopCounterMode's module tracker trips on parameters that require grad under no_grad
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_model(model, images)
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return int(counter.get_total_flops())
