"""FinetuneConfig: every fine-tuning option, checked before any work starts.

Every number is checked for type, finiteness and range here, so a run never starts with a
learning rate of NaN or a step limit of 0 that silently means "no limit".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ltm_convert.errors import LtmError


@dataclass
class FinetuneConfig:
    epochs: float = 1.0
    batch_size: int = 32  # global: split evenly over ranks
    # Adam moves every weight by about lr per step whatever its gradient, so near a good start the
    # rate must be tiny: on the bundled DINOv2 at ratio 0.5 (350 held-out photos) 20 steps at 1e-5
    # lowered agreement by 0.013, at 1e-6 they raised it by 0.002 (benchmarks/README.md)
    lr: float = 1e-6  # the non-mask weights with --train all
    mask_lr: float = 1e-5  # ltm_* parameters (no weight decay); 1e-4 lowered held-out agreement
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of all steps with linear warm-up
    min_lr_ratio: float = 0.01
    clip_grad: float | None = 1.0
    amp: str = "auto"  # auto | none | bf16 | fp16
    train: str = "mask"  # mask | all
    # before the first step, fit the LTM keep terms to first-order merge prices on this many training
    # images (keep_fit.py; 0: off); kept only if validation agrees at least as well as before
    fit_keep: int = 0
    # relaxed: the LTM mask's continuous relaxation in training (every token stays, weighted);
    # hard: the inference merge itself (gradients through the merge weights, not the keep choice)
    training_merge: str = "relaxed"
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    ib_weight: float = 0.0  # off: measured on 350 held-out photos it changed nothing (benchmarks/README.md)
    ib_warmup: float = 0.3  # IB term switched on after this fraction of the steps
    ib_clusters: int = 64
    ib_beta: float = 10.0  # sharpness of the cluster assignments (1.0 left them uniform: no signal)
    ib_compression: float = 0.1  # weight of the compression term KL(p(b|x) || p(b)) inside the IB loss
    ema: float | None = None  # EMA decay, e.g. 0.999
    # substrings of parameter names kept frozen (none by default: every part of the version-2 mask has a
    # signal that means something; for a 0.1.0 model, ("ltm_mask.kappa", "ltm_mask.size_weight") keeps
    # its straight-through keep score out of training, as 0.1.0 did)
    freeze: tuple[str, ...] = ()
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    save_every: int = 50  # steps; also at the end of each epoch
    log_every: int = 10
    eval_before: bool = True
    # the model returned and written is the one that validated best (the unchanged start included),
    # not the last one: measured, fine-tuning can lower agreement on unseen images (benchmarks/README.md)
    keep_best: bool = True
    num_workers: int = 0
    progress: bool = True
    device: str | None = None

    def validate(self) -> None:
        """One clear error for the first option out of range (names as on the command line)."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LtmError(f"{flag(f.name)} must be a finite number, got {value}")
        if self.train not in ("mask", "all"):
            raise LtmError(f"--train must be 'mask' or 'all', got {self.train!r}")
        if self.training_merge not in ("relaxed", "hard"):
            raise LtmError(f"--training-merge must be 'relaxed' or 'hard', got {self.training_merge!r}")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise LtmError(f"--amp must be auto, none, bf16 or fp16, got {self.amp!r}")
        checks = [
            ("epochs", self.epochs > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr >= 0, ">= 0"),
            ("mask_lr", self.mask_lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup", 0 <= self.warmup < 1, "a fraction of training in [0, 1)"),
            ("ib_warmup", 0 <= self.ib_warmup <= 1, "a fraction of training in [0, 1]"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("clip_grad", self.clip_grad is None or self.clip_grad >= 0, ">= 0 (0 turns it off)"),
            ("temperature", self.temperature > 0, "> 0"),
            ("kd_weight", self.kd_weight >= 0, ">= 0"),
            ("ce_weight", self.ce_weight >= 0, ">= 0"),
            ("ib_weight", self.ib_weight >= 0, ">= 0"),
            ("ib_clusters", self.ib_clusters >= 1, ">= 1"),
            ("ib_beta", self.ib_beta > 0, "> 0"),
            ("ib_compression", self.ib_compression >= 0, ">= 0"),
            ("ema", self.ema is None or 0 < self.ema < 1, "a decay in (0, 1), e.g. 0.999"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 (leave it out for no limit)"),
            ("save_every", self.save_every >= 0, ">= 0 (0: only at epoch ends)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("fit_keep", self.fit_keep >= 0, ">= 0 images (0: off)"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise LtmError(f"{flag(name).replace('--num-workers', '--workers')} must be {what}, got {getattr(self, name)}")
