"""ScratchConfig: every option of training from scratch (``ltm-convert train``), checked up front.

The defaults are the recipe the LTM paper's repository trains its models with, through timm's own
training pieces: AdamW (lr 1e-3, weight decay 0.05), a cosine schedule with 5 warm-up epochs, an EMA
of the weights (decay 0.9998), RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, Mixup 0.8 /
CutMix 1.0 with label smoothing 0.1, mixed precision on GPU, 300 epochs. Every one is overridable,
so a comparison (original / LTM / ToMe) runs one recipe with only the model changed.

Importing this module stays light (no torch), so the CLI checks options before any work.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ltm_convert.errors import LtmError

PAPER_AA = "rand-m9-mstd0.5-inc1"
AMP_MODES = ("auto", "none", "bf16", "fp16")
MERGE_MODES = ("hard", "relaxed")

# options that decide what a run computes: a resumed run must use the same values (another value
# would make another run, not the same one continued). The rest (epochs, step / time limits,
# workers, logging) may change on --resume.
FIXED_ON_RESUME = ("batch_size", "seed", "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "opt",
                   "mixup", "cutmix", "smoothing", "aa", "reprob", "color_jitter", "hflip", "model_ema",
                   "ema_decay", "amp", "clip_grad", "ratio", "method", "original", "pretrained", "checkpoint", "img_size",
                   "model_kwargs", "num_classes", "training_merge", "train_samples", "val_samples")


@dataclass
class ScratchConfig:
    # -- the model ---------------------------------------------------------------------------------
    ratio: float = 0.8  # FLOPs ratio of the conversion; 1.0 trains the unconverted original
    method: str = "ltm"  # merge method (ltm, or a training-free baseline: tome, tofu, ltmp)
    original: bool = False  # train the unconverted original (same as ratio 1.0)
    pretrained: bool = False  # from scratch by default; True starts from the source's pretrained weights
    checkpoint: str | None = None  # start from a local state-dict file of the model source instead
    img_size: tuple[int, int] | None = None  # training / schedule resolution; None: the model's own
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor options (timm spelling)
    num_classes: int | None = None  # classes of the head; None: the data's
    train_samples: int | None = None  # a seeded subset of the training images; None: all
    val_samples: int | None = None  # a seeded subset of the validation images; None: all
    # hard: the merge inference runs (the converted model's token counts, and its speed, in training
    # too, as the paper's merged models train); relaxed: the LTM mask's continuous relaxation (every
    # token stays, weighted; as slow as the original)
    training_merge: str = "hard"
    # -- optimisation (timm: create_optimizer_v2, create_scheduler_v2) --------------------------------
    epochs: int = 300
    batch_size: int = 128  # global: split over processes
    opt: str = "adamw"
    lr: float = 1e-3  # as given, not scaled by the batch size
    weight_decay: float = 0.05
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    clip_grad: float | None = None
    # -- data and regularisation (timm: create_transform, Mixup, the losses) --------------------------
    aa: str | None = PAPER_AA  # RandAugment policy; None or "none": off
    reprob: float = 0.25  # random erasing probability
    color_jitter: float = 0.4
    hflip: float = 0.5
    mixup: float = 0.8  # Mixup alpha; 0: off
    cutmix: float = 1.0  # CutMix alpha; 0: off
    smoothing: float = 0.1
    # -- EMA and precision -----------------------------------------------------------------------------
    model_ema: bool = True
    ema_decay: float = 0.9998
    amp: str = "auto"  # auto: bf16 on GPU, off on CPU
    # -- the run -----------------------------------------------------------------------------------------
    seed: int = 0
    workers: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (the schedule is unchanged)
    time_budget: float | None = None  # stop once training steps took this many seconds (schedule unchanged)
    save_every: int = 200  # checkpoint every N steps, and at every epoch end; 0: epoch ends only
    log_every: int = 10
    progress: bool = True
    device: str | None = None

    def aa_policy(self) -> str | None:
        return None if self.aa in (None, "", "none") else self.aa

    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def merges(self) -> bool:
        """Whether the model is converted (False: the original trains, unconverted)."""
        return not self.original and self.ratio < 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["img_size"] = list(self.img_size) if self.img_size else None
        return out

    def validate(self) -> None:
        """One clear error for the first option out of range (named as on the command line)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LtmError(f"{flag(f.name)} must be a finite number, got {value}")
        if self.amp not in AMP_MODES:
            raise LtmError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.training_merge not in MERGE_MODES:
            raise LtmError(f"--training-merge must be 'hard' or 'relaxed', got {self.training_merge!r}")
        if not isinstance(self.model_kwargs, dict):
            raise LtmError(f"model_kwargs must be a dict of constructor options, got {type(self.model_kwargs).__name__}")
        if self.img_size is not None:
            from ltm_convert.config import check_input_size

            self.img_size = check_input_size(self.img_size, "--img-size")
        checks = [
            ("ratio", 0 < self.ratio <= 1, "a FLOPs fraction in (0, 1] (1.0: the unconverted original)"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, "a whole number of epochs >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, --lr {self.lr:g}]"),
            ("warmup_lr", self.warmup_lr >= 0, ">= 0"),
            ("warmup_epochs", _is_int(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
             f"a whole number of epochs below --epochs {self.epochs} (0: no warm-up)"),
            ("clip_grad", self.clip_grad is None or self.clip_grad >= 0, ">= 0 (0: off)"),
            ("reprob", 0 <= self.reprob <= 1, "a probability in [0, 1]"),
            ("color_jitter", self.color_jitter >= 0, ">= 0"),
            ("hflip", 0 <= self.hflip <= 1, "a probability in [0, 1]"),
            ("mixup", self.mixup >= 0, ">= 0 (0: off)"),
            ("cutmix", self.cutmix >= 0, ">= 0 (0: off)"),
            ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"),
            ("ema_decay", 0 < self.ema_decay < 1, "a decay in (0, 1), e.g. 0.9998"),
            ("num_classes", self.num_classes is None or (_is_int(self.num_classes) and self.num_classes >= 2),
             ">= 2 (leave it out: the data's classes)"),
            ("train_samples", self.train_samples is None or (_is_int(self.train_samples) and self.train_samples >= 1),
             ">= 1 (leave it out to use every image)"),
            ("val_samples", self.val_samples is None or (_is_int(self.val_samples) and self.val_samples >= 1),
             ">= 1 (leave it out to use every image)"),
            ("workers", _is_int(self.workers) and self.workers >= 0, ">= 0"),
            ("max_steps", self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
             ">= 1 (leave it out for no limit)"),
            ("time_budget", self.time_budget is None or self.time_budget > 0, "> 0 seconds (leave it out for no limit)"),
            ("save_every", _is_int(self.save_every) and self.save_every >= 0, ">= 0 (0: only at epoch ends)"),
            ("log_every", _is_int(self.log_every) and self.log_every >= 1, ">= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise LtmError(f"{flag(name)} must be {what}, got {getattr(self, name)}")
        if self.original and self.method != "ltm":
            raise LtmError(f"--original trains the unconverted model, which has no merge method; leave out "
                           f"--method {self.method} (or --original)")
        if self.mixup_active() and self.batch_size % 2:
            raise LtmError(f"Mixup / CutMix pair the images of a batch, so --batch-size must be even, got "
                           f"{self.batch_size}; use an even batch size, or --mixup 0 --cutmix 0")


def check_new_run(workdir: Any, resume: bool) -> None:
    """A run never starts over another run's checkpoint (it would be overwritten): continue it, or move."""
    from pathlib import Path

    if not resume and (Path(workdir) / "checkpoint.pt").is_file():
        raise LtmError(f"{workdir} already holds a training checkpoint; continue that run with --resume, or start a new "
                       "one in another --workdir (or delete it)")


def flag(name: str) -> str:
    """The command-line spelling of a config field."""
    return {"model_ema": "--model-ema", "aa": "--aa"}.get(name, "--" + name.replace("_", "-"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
