"""What fine-tuning optimises and how: parameter groups, the learning-rate schedule, mixed precision,
the weight EMA, and whether a converted model merges anything a mask could learn from."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn

from ltm_convert.api import merge_counts
from ltm_convert.config import is_ltm_name
from ltm_convert.errors import LtmError
from ltm_convert.finetune.config import FinetuneConfig


def merges_tokens(model: nn.Module) -> bool:
    """Whether any merge site of a converted model passes on fewer tokens than it receives (a model
    converted at ratio 1.0 merges none: its masks are never used, so they get no gradient)."""
    try:
        counts = merge_counts(model)
    except LtmError:  # not a converted model: nothing to tell
        return True
    return any(c.get("tokens_out", 0) < c.get("tokens_in", 0) for c in counts)


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Mask parameters at --mask-lr without weight decay (the merge temperature learns faster through
    its parametrisation, ltm_mask.TAU_RATE), the rest (--train all) at --lr with weight decay on matrices."""
    mask, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if any(pat and pat in name for pat in cfg.freeze):
            p.requires_grad_(False)
        elif is_ltm_name(name):
            p.requires_grad_(True)
            mask.append(p)
        elif cfg.train == "all":
            p.requires_grad_(True)
            (decay if p.ndim >= 2 else no_decay).append(p)
        else:
            p.requires_grad_(False)
    if not mask and cfg.train == "mask":
        raise LtmError("the model has no ltm_ parameters to train (a training-free merge, or ratio 1); fine-tune its "
                       "weights with --train all, or convert it with the 'ltm' method at a ratio < 1")
    groups = [{"params": mask, "lr": cfg.mask_lr, "weight_decay": 0.0, "name": "ltm"}] if mask else []
    if decay:
        groups.append({"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def merge_hard(model: nn.Module) -> None:
    """Make the merge masks of a model in training mode merge as at inference (hard merges: the
    converted model's token counts, and its speed); a mask's ``soft()`` follows its mode."""
    for module in model.modules():
        if callable(getattr(module, "soft", None)):
            module.eval()


def cosine_with_warmup(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def amp_settings(cfg: FinetuneConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return False, torch.float32
    return True, torch.bfloat16 if mode == "bf16" else torch.float16


class Ema:
    """Exponential moving average of the trainable weights (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for (_, e), (_, p) in zip(self.model.state_dict().items(), model.state_dict().items()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            else:
                e.copy_(p)
