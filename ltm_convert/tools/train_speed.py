"""Time training steps the way `ltm-convert finetune` runs them: the real Trainer, on synthetic data.

A benchmark of training speed must time the product's own step (teacher forward, student forward
and backward, AdamW, gradient clipping, the finiteness checks), not a hand-written loop that is
faster than what users get. The Trainer is built here on random images of the planned size (the
content does not change the static shapes, hence not the time); its teacher forward is also timed
on its own, so a table can say what distillation costs.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ltm_convert.tools.bench import clock_fn


@dataclass
class StepTiming:
    """Seconds per step (median over ``steps``), images per second, and the spread (quartiles)."""

    step_s: float
    images_per_s: float
    quartiles_s: tuple[float, float]
    teacher_s: float | None = None  # the teacher's forward alone, per step
    peak_mem_mb: float | None = None
    samples_s: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(student: nn.Module, *, batch: int, size: tuple[int, int], train: str = "all",
                 training_merge: str = "hard", amp: str = "auto", device: str | None = None,
                 workdir: str | Path | None = None, classes: int = 10) -> Any:
    """A Trainer over ``2 * batch`` random images (no checkpoints are written while timing)."""
    from ltm_convert.finetune import Trainer
    from ltm_convert.finetune.config import FinetuneConfig
    from ltm_convert.finetune.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 3, *size, generator=g)
    y = torch.randint(0, classes, (2 * batch,), generator=g)
    data = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:batch], y[:batch]),
                      classes=[str(i) for i in range(classes)], skipped=0)
    cfg = FinetuneConfig(batch_size=batch, train=train, training_merge=training_merge, amp=amp, device=device,
                         progress=False, eval_before=False, save_every=10**9, log_every=10**9, lr=1e-6,
                         mask_lr=1e-5)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ltm_train_speed."))
    return Trainer(student, data, cfg, work)


def time_steps(trainer: Any, *, steps: int = 5, warmup: int = 2, teacher: bool = True,
               clock: str = "wall") -> StepTiming:
    """Median seconds of ``trainer.train_step`` on one fixed batch, after ``warmup`` steps, on the
    ``clock`` named (see :func:`ltm_convert.tools.bench.clock_fn`)."""
    now = clock_fn(clock)
    if clock == "cpu" and trainer.dist.device.type != "cpu":
        raise ValueError("the cpu clock times CPU runs only")
    device = trainer.dist.device
    images, labels = trainer.data.train.tensors
    images = images[: trainer.per_rank].to(device)
    labels = labels[: trainer.per_rank].to(device)
    for _ in range(warmup):
        trainer.train_step(images, labels)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(steps):
        start = now()
        trainer.train_step(images, labels)
        _sync(device)
        samples.append(now() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    teacher_s = None
    if teacher:
        t = []
        for i in range(max(2, steps // 2) + 1):
            start = now()
            with torch.no_grad(), trainer._autocast():
                trainer.tap_t(trainer.teacher, images)
            _sync(device)
            if i:  # the first call warms up
                t.append(now() - start)
        teacher_s = statistics.median(t)
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) >= 2 else [med, med, med]
    return StepTiming(step_s=med, images_per_s=len(images) / med, quartiles_s=(q[0], q[2]), teacher_s=teacher_s,
                      peak_mem_mb=peak, samples_s=samples)


def time_steps_interleaved(trainers: dict[str, Any], *, steps: int = 5, warmup: int = 1,
                           clock: str = "wall") -> tuple[dict[str, list[float]], list[float]]:
    """Round-robin timing on a machine whose load drifts: every round runs one step of each trainer
    and one teacher forward (the trainers share one base model, hence one teacher cost), so round r's
    samples saw the same conditions and per-round ratios cancel the drift. Returns (step seconds per
    trainer, one sample per round; teacher seconds per round)."""
    now = clock_fn(clock)
    batches = {}
    for name, trainer in trainers.items():
        if clock == "cpu" and trainer.dist.device.type != "cpu":
            raise ValueError("the cpu clock times CPU runs only")
        images, labels = trainer.data.train.tensors
        batches[name] = (images[: trainer.per_rank].to(trainer.dist.device), labels[: trainer.per_rank].to(trainer.dist.device))
    first = next(iter(trainers.values()))
    for _ in range(warmup):
        for name, trainer in trainers.items():
            trainer.train_step(*batches[name])
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    teacher: list[float] = []
    images = batches[next(iter(trainers))][0]
    for r in range(steps):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))  # no model always runs first
        for name in order:
            start = now()
            trainers[name].train_step(*batches[name])
            _sync(trainers[name].dist.device)
            samples[name].append(now() - start)
        start = now()
        with torch.no_grad(), first._autocast():
            first.tap_t(first.teacher, images)
        _sync(first.dist.device)
        teacher.append(now() - start)
    return samples, teacher
