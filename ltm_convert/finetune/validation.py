"""Validation: how a model being fine-tuned is compared with its frozen original.

The teacher is the converted model with merging switched off (it computes the original's outputs
exactly); both models are read through a :class:`FeatureTap` (main output, and the head's input);
:func:`validate` scores the student on the validation images with the agreement of
``ltm_convert.metrics`` (the one definition bench, calibrate and the benchmarks use), the
distillation loss, and for classifiers top-1 agreement and accuracy. The loop (loop.py) keeps the
weights that :func:`validates_better`.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from ltm_convert.finetune import distributed as D
from ltm_convert.finetune.losses import distill
from ltm_convert.metrics import agreement, pool_tokens, top1_agreement
from ltm_convert.model_inputs import call_kwargs, main_output


def head_module(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001
            head = None
        if isinstance(head, nn.Module):
            return head
    for name in ("classifier", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def has_logits(model: nn.Module) -> bool:
    head = head_module(model)
    return head is not None and not isinstance(head, nn.Identity) and any(True for _ in head.parameters())


class FeatureTap:
    """Runs the model and returns (main output, pooled final feature = the head's input)."""

    def __init__(self, model: nn.Module) -> None:
        self.captured: torch.Tensor | None = None
        self.active = False  # capture only inside __call__: a forward elsewhere (the keep fit, user code)
        # must not leave a tensor, and its graph, held by a hook that deepcopy would then copy
        head = head_module(model)
        self.handle = head.register_forward_pre_hook(self._hook) if head is not None else None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.active and args and isinstance(args[0], torch.Tensor):
            self.captured = args[0]

    def __call__(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.captured = None
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        args, kwargs = call_kwargs(inner, images)  # DDP forwards them to the wrapped model
        self.active = True
        try:
            out = main_output(model(*args, **kwargs))
        finally:
            self.active = False
        feat = self.captured if self.captured is not None else out
        self.captured = None
        return out, pool_tokens(feat)


def make_teacher(student: nn.Module) -> nn.Module:
    """The original model: a frozen copy of the converted one with merging switched off
    (ratio 1.0 reproduces the original outputs exactly)."""
    from ltm_convert.api import unmerged_copy

    teacher = unmerged_copy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def validate(model: nn.Module, tap: FeatureTap, teacher: nn.Module, teacher_tap: FeatureTap,
             batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
             autocast: Callable[[], ContextManager], logits: bool, use_ce: bool,
             temperature: float) -> dict[str, Any]:
    """Mean agreement, distillation loss and (classifiers) top-1 agreement / accuracy of ``model``
    against ``teacher`` over ``batches`` of (images, labels), summed over every process."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        with autocast():
            t_out, _ = teacher_tap(teacher, images)
            s_out, _ = tap(model, images)
        s_out, t_out = s_out.float(), t_out.float()
        kd = distill(s_out, t_out, logits=logits, temperature=temperature)
        n = images.shape[0]
        agree = agreement(s_out, t_out).sum()
        top1 = top1_agreement(s_out, t_out).sum() if logits else torch.tensor(0.0)
        acc = t_acc = torch.tensor(0.0)
        if use_ce:
            acc = (s_out.argmax(-1) == labels).sum()
            t_acc = (t_out.argmax(-1) == labels).sum()
        sums += torch.tensor([n, float(agree), float(kd) * n, float(acc), float(t_acc), float(top1)],
                             dtype=torch.float64)
    sums = D.all_reduce_sum(sums.to(device)).cpu()
    n = max(1.0, float(sums[0]))
    out = {"agreement": float(sums[1]) / n, "kd": float(sums[2]) / n, "val_images": int(sums[0])}
    if logits:
        out["top1_agreement"] = float(sums[5]) / n
    if use_ce:
        out["accuracy"], out["teacher_accuracy"] = float(sums[3]) / n, float(sums[4]) / n
    return out


def validates_better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether validation result ``a`` is strictly better than ``b``: higher agreement, then lower
    distillation loss (equal results are not better: ties go to the later weights)."""
    return (a["agreement"], -a["kd"]) > (b["agreement"], -b["kd"])
