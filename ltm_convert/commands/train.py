"""`ltm-convert train MODEL --data DATA -o OUT`: train from scratch with labels only (no teacher).

The LTM paper's own experiment: a model converted at --ratio (or the original, --ratio 1.0, or the
ToMe baseline, --method tome) trained from random weights with timm's recipe (the paper
repository's settings as defaults, each overridable). Wire into the CLI with ``register(app)``;
errors are :class:`LtmError` (one line, exit 2). Several processes:
``torchrun --nproc_per_node N -m ltm_convert.cli train ...``. Python: ltm_convert.finetune.scratch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ltm_convert.commands._common import CheckpointOpt, MethodOpt, ModelKwargsOpt, RatioOpt, parse_input_size
from ltm_convert.errors import LtmError

TRAIN_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert train vit_tiny_patch16_224 --data ./images --epochs 100 -o ltm_tiny.pt

  ltm-convert train vit_tiny_patch16_224 --data ./images --ratio 1.0 -o original_tiny.pt

  ltm-convert train mobilevit_xxs --data fashion-mnist --img-size 64 --method tome -o tome_xxs.pt

  ltm-convert train out/dinov2_s_ltm.pt --data ./images --epochs 30 --batch-size 64 -o scratch/

  torchrun --nproc_per_node 4 -m ltm_convert.cli train mobilevit_s --data ./imagenet -o ltm_mvit_s.pt

  ltm-convert train vit_tiny_patch16_224 --data ./images -o ltm_tiny.pt --resume

DATA is an image folder with DATA/train/<class>/ and DATA/val/<class>/ (or 'fashion-mnist').
The run's checkpoint, log.jsonl and metrics.json (per-epoch loss, val top-1 of the model and its
EMA, images/s, times) go to --workdir (default OUT.run).
"""


def _img_size(value: Optional[str]):
    return parse_input_size(value)


def register(app: typer.Typer) -> None:
    @app.command(epilog=TRAIN_EPILOG, no_args_is_help=True)
    def train(
        model: Annotated[str, typer.Argument(
            metavar="MODEL", show_default=False,
            help="A timm model name, 'hf:<local dir>', 'bundled', or a model saved by `ltm-convert convert` (its "
                 "architecture and schedule).")],
        data: Annotated[str, typer.Option(
            "--data", "-d", metavar="DATA",
            help="An image folder with train/<class>/ and val/<class>/ inside, or 'fashion-mnist'.")],
        output: Annotated[Optional[Path], typer.Option(
            "--output", "-o", metavar="OUT", help="Where to save the trained model (.pt or a directory).")] = None,
        workdir: Annotated[Optional[Path], typer.Option(
            "--workdir", "-w", help="Checkpoint, log.jsonl and metrics.json (default OUT.run).")] = None,
        ema_output: Annotated[Optional[Path], typer.Option(
            "--ema-output", metavar="PATH", help="Also save the EMA of the weights here.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in WORKDIR exactly.")] = False,
        ratio: RatioOpt = None,
        original: Annotated[bool, typer.Option(
            "--original", help="Train the unconverted original (same as --ratio 1.0), with the same recipe.")] = False,
        method: MethodOpt = None,
        pretrained: Annotated[bool, typer.Option(
            "--pretrained/--no-pretrained",
            help="Start from the source's pretrained weights (default: random weights, from scratch).")] = False,
        checkpoint: CheckpointOpt = None,
        img_size: Annotated[Optional[str], typer.Option(
            "--img-size", "--input-size", "-s", metavar="H W|HxW|N", callback=_img_size,
            help="Training resolution, and the one the token schedule is solved for (default: the model's own).")] = None,
        model_kwargs: ModelKwargsOpt = None,
        num_classes: Annotated[Optional[int], typer.Option(
            "--num-classes", metavar="N", help="Outputs of the head (default: the data's classes).")] = None,
        train_samples: Annotated[Optional[int], typer.Option(
            "--train-samples", metavar="N", help="Train on a seeded subset of N training images.")] = None,
        val_samples: Annotated[Optional[int], typer.Option(
            "--val-samples", metavar="N", help="Validate on a seeded subset of N validation images.")] = None,
        training_merge: Annotated[str, typer.Option(
            "--training-merge", help="hard: merge as at inference (the converted model's speed in training too); "
                                     "relaxed: the LTM mask's continuous relaxation (every token stays).")] = "hard",
        epochs: Annotated[int, typer.Option("--epochs", "-e")] = 300,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Global batch size (split over processes).")] = 128,
        opt: Annotated[str, typer.Option("--opt", help="timm optimizer name.")] = "adamw",
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (as given, not scaled by batch size).")] = 1e-3,
        weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
        min_lr: Annotated[float, typer.Option("--min-lr", help="End of the cosine schedule.")] = 1e-5,
        warmup_lr: Annotated[float, typer.Option("--warmup-lr")] = 1e-6,
        warmup_epochs: Annotated[int, typer.Option("--warmup-epochs")] = 5,
        clip_grad: Annotated[Optional[float], typer.Option("--clip-grad", help="Gradient norm clip (default off).")] = None,
        aa: Annotated[str, typer.Option("--aa", help="RandAugment policy (timm spelling); 'none' turns it off.")] = "rand-m9-mstd0.5-inc1",
        reprob: Annotated[float, typer.Option("--reprob", help="Random erasing probability.")] = 0.25,
        color_jitter: Annotated[float, typer.Option("--color-jitter")] = 0.4,
        hflip: Annotated[float, typer.Option("--hflip", help="Horizontal flip probability.")] = 0.5,
        mixup: Annotated[float, typer.Option("--mixup", help="Mixup alpha; 0 turns it off.")] = 0.8,
        cutmix: Annotated[float, typer.Option("--cutmix", help="CutMix alpha; 0 turns it off.")] = 1.0,
        smoothing: Annotated[float, typer.Option("--smoothing", help="Label smoothing.")] = 0.1,
        model_ema: Annotated[bool, typer.Option("--model-ema/--no-model-ema", help="Keep an EMA of the weights (validated too).")] = True,
        ema_decay: Annotated[float, typer.Option("--ema-decay")] = 0.9998,
        amp: Annotated[str, typer.Option("--amp", help="auto (bf16 on GPU, off on CPU), none, bf16 or fp16.")] = "auto",
        seed: Annotated[int, typer.Option("--seed")] = 0,
        workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
        max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimiser steps (the schedule is unchanged).")] = None,
        time_budget: Annotated[Optional[float], typer.Option(
            "--time-budget", metavar="SECONDS",
            help="Stop once training steps took this long (validation not counted; the schedule is unchanged).")] = None,
        save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (and each epoch end).")] = 200,
        device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when available).")] = None,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    ) -> None:
        """Train a model from scratch with labels only: converted at --ratio, the original, or ToMe."""
        from ltm_convert.commands._common import check_output, model_kwargs_callback
        from ltm_convert.finetune.scratch_config import ScratchConfig, check_new_run

        if output is None and workdir is None:
            raise LtmError("give --output/-o (the trained model) or --workdir (checkpoints and metrics only)")
        cfg = ScratchConfig(
            ratio=1.0 if ratio is None and original else (0.8 if ratio is None else ratio), method=method or "ltm",
            original=original, pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None,
            img_size=img_size,
            model_kwargs=model_kwargs_callback(model_kwargs) or {}, num_classes=num_classes,
            train_samples=train_samples, val_samples=val_samples,
            training_merge=training_merge, epochs=epochs, batch_size=batch_size, opt=opt, lr=lr,
            weight_decay=weight_decay, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
            clip_grad=clip_grad or None, aa=aa, reprob=reprob, color_jitter=color_jitter, hflip=hflip, mixup=mixup,
            cutmix=cutmix, smoothing=smoothing, model_ema=model_ema, ema_decay=ema_decay, amp=amp, seed=seed,
            workers=workers, max_steps=max_steps, time_budget=time_budget, save_every=save_every,
            progress=not no_progress, device=device)
        cfg.validate()
        if original and ratio is not None and ratio < 1:
            raise LtmError(f"--original trains the unconverted model; leave out --ratio {ratio:g} (or --original)")
        _check_data(data)  # refused before any model or data is loaded (and before torch is imported)
        run_dir = workdir if workdir is not None else Path(f"{output}.run")
        check_new_run(run_dir, resume)
        for path in (output, ema_output):
            check_output(path)
        check_output(run_dir, replace=False)
        from ltm_convert.finetune.scratch import train_from_scratch

        result = train_from_scratch(model, data, cfg, workdir, output=output, ema_output=ema_output, resume=resume)
        import os

        if int(os.environ.get("RANK", "0")) != 0:
            return
        from ltm_convert.commands._common import console

        final = result.metrics["final"]
        ema = f", EMA {final['ema_val_top1']:.4f}" if "ema_val_top1" in final else ""
        out = console()
        out.print(f"{result.metrics['method']}, step {final['step']} ({final['stopped']}): val top-1 "
                  f"{final['val_top1']:.4f}{ema}; {final['img_s']:.1f} img/s, {final['train_seconds']:.0f} s")
        out.print(f"metrics in {result.workdir / 'metrics.json'}")
        for path in (result.output, result.ema_output):
            if path is not None:
                out.print(f"saved to {path}")


def _check_data(data: str) -> None:
    """A bad data folder is refused before any model is built (fashion-mnist is checked when read)."""
    from ltm_convert.config import FASHION_MNIST_NAMES
    from ltm_convert.finetune.scratch_data import data_folders

    if data.lower() not in FASHION_MNIST_NAMES:
        data_folders(data)
