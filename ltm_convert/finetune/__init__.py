"""Fine-tune a converted model against its frozen original (``ltm-convert finetune``).

    from ltm_convert.finetune import finetune
    model, history = finetune("out/dinov2_ltm.pt", "fashion-mnist", epochs=1, output="tuned.pt")

Works in one process, or under ``torchrun --nproc_per_node N`` (DistributedDataParallel; gloo on
CPU, nccl on GPU). See loop.py for the loop, validation.py for what validation measures and
losses.py for the losses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ltm_convert.errors import LtmError, TrainingDiverged

if TYPE_CHECKING:
    from ltm_convert.finetune.loop import FinetuneConfig, Trainer

__all__ = ["finetune", "prepare_model", "FinetuneConfig", "Trainer"]


def __getattr__(name: str) -> Any:
    """FinetuneConfig and Trainer load torch: imported when first asked for, so that importing a light
    submodule (scratch_config, scratch_data's folder check) lets the CLI refuse bad input at once."""
    if name in ("FinetuneConfig", "Trainer"):
        from ltm_convert.finetune import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_model(model: Any, *, ratio: float = 0.5, pretrained: bool = True, checkpoint: str | None = None,
                  input_size: Any = None):
    """A converted model from: a converted nn.Module, an nn.Module to convert at ``ratio``, a
    saved LTM model path, or any model source ``convert`` accepts (timm name, 'hf:...', 'bundled')."""
    from torch import nn

    from ltm_convert.api import convert, is_converted

    if isinstance(model, nn.Module):
        return model if is_converted(model) else convert(model, ratio, input_size=input_size)
    if not isinstance(model, (str, os.PathLike)):
        raise LtmError(f"finetune needs a model, a saved LTM model path or a model name, got {type(model).__name__}")
    from ltm_convert.io import is_saved_model, load

    path = Path(model)
    if path.exists() and (path.is_dir() or path.suffix in (".pt", ".pth")):
        if not is_saved_model(path):
            raise LtmError(f"{path} is not a saved LTM model; convert it first with 'ltm-convert convert'")
        return load(path)
    if path.suffix in (".pt", ".pth"):
        raise LtmError(f"no such file: {path}")
    from ltm_convert.sources import load_model

    base = load_model(str(model), pretrained=pretrained, checkpoint=checkpoint)
    return convert(base, ratio, input_size=input_size)


def finetune(model: Any, data: Any, *, output: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
             resume: bool | str | os.PathLike = False, ratio: float = 0.5, pretrained: bool = True,
             checkpoint: str | None = None, input_size: Any = None, val_fraction: float = 0.1,
             train_samples: int | None = None, val_samples: int | None = None,
             config: FinetuneConfig | None = None, **options: Any):
    """Fine-tune and return ``(model, history)``; ``history`` holds the JSON-lines log records.

    ``data``: 'fashion-mnist', an ImageFolder directory, a local HF datasets directory, or a
    ready :class:`ltm_convert.finetune.data.DataBundle`. ``options`` set fields of
    :class:`FinetuneConfig` (epochs, batch_size, lr, mask_lr, train, ib_weight, ema, ...).
    Checkpoints and ``log.jsonl`` go to ``workdir`` (default ``<output>.run`` or ``./ltm_finetune``).
    """
    from ltm_convert.finetune.data import DataBundle, build_data
    from ltm_convert.finetune.loop import FinetuneConfig, Trainer

    cfg = config or FinetuneConfig()
    for key, value in options.items():
        if not hasattr(cfg, key):
            raise LtmError(f"unknown fine-tuning option {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise LtmError(f"--val-fraction must be a fraction in [0, 1), got {val_fraction}")
    for flag, n in (("--train-samples", train_samples), ("--val-samples", val_samples)):
        if n is not None and n < 1:
            raise LtmError(f"{flag} must be >= 1 (leave it out to use every image), got {n}")
    from ltm_convert.device import pick_device

    pick_device(cfg.device)  # a device this machine does not have: refused before any work
    student = prepare_model(model, ratio=ratio, pretrained=pretrained, checkpoint=checkpoint, input_size=input_size)
    size = tuple(student.ltm_config.input_size)
    bundle = data if isinstance(data, DataBundle) else build_data(
        data, student, input_size=size, val_fraction=val_fraction, train_samples=train_samples,
        val_samples=val_samples, seed=cfg.seed)
    if workdir is None:
        workdir = Path(str(output) + ".run") if output else Path("ltm_finetune")
    trainer = Trainer(student, bundle, cfg, Path(workdir))
    try:
        if resume:
            trainer.resume(None if resume is True else Path(resume))
        if bundle.skipped and trainer.dist.main:
            trainer._log({"type": "data", "step": trainer.state.global_step, "skipped_images": bundle.skipped})
        try:
            history = trainer.fit()
        except TrainingDiverged as exc:
            raise _rescued(trainer, exc, output) from None
        final = trainer.final_model()
        if output is not None and trainer.dist.main:
            from ltm_convert.io import save

            save(final, str(output))
        return final, history
    finally:
        trainer.close()


def _rescued(trainer: Trainer, exc: TrainingDiverged, output: str | os.PathLike | None) -> TrainingDiverged:
    """After a divergence, write the best validated weights so far (the unchanged start at least, with
    ``keep_best``) to ``output``, so the run leaves a usable model, and say so in the error. Every
    process words the same line; the main one writes."""
    if output is None:
        return exc
    if trainer.best is None:
        why = "--no-keep-best" if not trainer.cfg.keep_best else "no weights were validated yet"
        return TrainingDiverged(f"{exc}; nothing was written to {output} ({why})")
    if trainer.dist.main:
        model = trainer.best_model()
        if model is None:
            return TrainingDiverged(f"{exc}; nothing was written to {output} (the best weights' file "
                                    f"{trainer.best_path} is gone)")
        from ltm_convert.io import save

        try:
            save(model, str(output))
        except (LtmError, OSError) as failed:
            return TrainingDiverged(f"{exc}; writing the best weights to {output} failed too: {failed}")
    best = trainer.best
    return TrainingDiverged(f"{exc}; the best validated weights so far (step {best['step']}, agreement "
                            f"{best['agreement']:.4f}) were written to {output}")
