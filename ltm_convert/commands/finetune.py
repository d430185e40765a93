"""`ltm-convert finetune MODEL_OR_CONVERTED --data DATA --epochs E -o OUT`.

Wire into the CLI with ``register(app)``. Errors are :class:`LtmError` (one line, exit 2) through
the CLI's own ``main``. Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m ltm_convert.cli finetune ...``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ltm_convert.commands._common import InputSizeOpt
from ltm_convert.errors import LtmError

FINETUNE_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert finetune out/dinov2_s_ltm.pt --data fashion-mnist --epochs 1 -o tuned.pt

  ltm-convert finetune bundled --ratio 0.5 --input-size 112 --data fashion-mnist --train-samples 2000 -o tuned.pt

  ltm-convert finetune model.pt --data ./imagenet_subset --train all --training-merge hard -o tuned/

  torchrun --nproc_per_node 2 -m ltm_convert.cli finetune model.pt --data ./images -o tuned.pt

  ltm-convert finetune model.pt --data ./images -o tuned.pt --resume
"""


def register(app: typer.Typer) -> None:
    @app.command(epilog=FINETUNE_EPILOG, no_args_is_help=True)
    def finetune(
        model: Annotated[str, typer.Argument(
            metavar="MODEL_OR_CONVERTED",
            help="A saved LTM model (.pt or directory), or a model source as for convert "
                 "(converted in memory at --ratio first).", show_default=False)],
        data: Annotated[str, typer.Option(
            "--data", "-d", metavar="DATA",
            help="'fashion-mnist' (offline Debian package), an ImageFolder dir (class folders, or "
                 "train/ and val/ inside), or a local HuggingFace datasets dir.")],
        output: Annotated[Optional[Path], typer.Option(
            "--output", "-o", metavar="OUT", help="Where to save the fine-tuned LTM model (.pt or a directory).")] = None,
        epochs: Annotated[float, typer.Option("--epochs", "-e", help="Epochs (fractions allowed).")] = 1.0,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Global batch size (split over processes).")] = 32,
        train: Annotated[str, typer.Option("--train", help="mask: only ltm_* parameters; all: every weight.")] = "mask",
        fit_keep: Annotated[int, typer.Option("--fit-keep", metavar="N", help="Before training, fit the LTM keep terms to first-order merge prices on N training views (the training images in a seeded random order, again with new crops past their number; a closed-form fit, about 0.25 s per image on 2 CPU cores for ViT-S); kept only if validation agrees at least as well. 0: off.")] = 0,
        training_merge: Annotated[str, typer.Option("--training-merge", help="relaxed: the LTM mask's continuous relaxation while training; hard: the inference merge itself (the backbone adapts to exactly what runs later).")] = "relaxed",
        lr: Annotated[float, typer.Option("--lr", help="Learning rate of the non-mask weights (--train all). Small on purpose: Adam moves each weight by about this much per step, and 1e-5 already undid a pretrained model's agreement.")] = 1e-6,
        mask_lr: Annotated[float, typer.Option("--mask-lr", help="Learning rate of the ltm_* parameters (no weight decay).")] = 1e-5,
        weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
        warmup: Annotated[float, typer.Option("--warmup", help="Fraction of steps with linear LR warm-up.")] = 0.1,
        clip_grad: Annotated[float, typer.Option("--clip-grad", help="Gradient norm clip; 0 turns it off.")] = 1.0,
        amp: Annotated[str, typer.Option("--amp", help="auto (bf16 on GPU, off on CPU), none, bf16 or fp16.")] = "auto",
        temperature: Annotated[float, typer.Option("--temperature", "-T", help="Distillation temperature.")] = 1.0,
        ce_weight: Annotated[float, typer.Option("--ce-weight", help="Cross-entropy weight (labels and a matching head).")] = 1.0,
        ib_weight: Annotated[float, typer.Option("--ib-weight", help="lambda_IB, e.g. 0.1; 0 (the default) turns the IB loss off: it measured no effect (benchmarks/README.md).")] = 0.0,
        ib_warmup: Annotated[float, typer.Option("--ib-warmup", help="Fraction of training before the IB term is on.")] = 0.3,
        ib_clusters: Annotated[int, typer.Option("--ib-clusters", help="K, clusters of the IB loss.")] = 64,
        ib_compression: Annotated[float, typer.Option("--ib-compression", help="Weight of the IB loss's compression term (KL to the cluster marginal).")] = 0.1,
        ema: Annotated[Optional[float], typer.Option("--ema", metavar="DECAY", help="Keep an EMA of the weights (e.g. 0.999); evaluated and saved.")] = None,
        freeze: Annotated[Optional[list[str]], typer.Option("--freeze", metavar="NAME", help="Keep parameters whose name contains NAME frozen. Repeatable. Default: none (every ltm_ parameter trains).")] = None,
        ratio: Annotated[float, typer.Option("--ratio", "-r", help="FLOPs ratio when MODEL must be converted first.")] = 0.5,
        no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random weights for a model source (trying things out).")] = False,
        input_size: InputSizeOpt = None,
        train_samples: Annotated[Optional[int], typer.Option("--train-samples", help="Use a seeded subset of the training images.")] = None,
        val_samples: Annotated[Optional[int], typer.Option("--val-samples", help="Use a seeded subset of the validation images.")] = None,
        val_fraction: Annotated[float, typer.Option("--val-fraction", help="Held out when DATA has no val split.")] = 0.1,
        workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Checkpoints and log.jsonl (default OUT.run).")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from WORKDIR/checkpoint.pt exactly.")] = False,
        save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (and each epoch end).")] = 50,
        max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimiser steps.")] = None,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when available).")] = None,
        workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
        keep_best: Annotated[bool, typer.Option("--keep-best/--no-keep-best", help="Write the weights that validated best (the unchanged start included), not the last ones.")] = True,
    ) -> None:
        """Fine-tune an LTM model against its frozen original (distillation + CE + IB loss)."""
        from rich.console import Console

        from ltm_convert.finetune import FinetuneConfig
        from ltm_convert.finetune import finetune as run

        if output is None and workdir is None:
            raise LtmError("give --output/-o (the fine-tuned model) or --workdir (checkpoints only)")
        from ltm_convert.commands._common import check_output

        check_output(output, model=True)  # refused before any model or data is loaded
        check_output(workdir if workdir is not None else Path(f"{output}.run"), replace=False)  # resumed from
        cfg = FinetuneConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, mask_lr=mask_lr, weight_decay=weight_decay,
            warmup=warmup, clip_grad=clip_grad or None, amp=amp, train=train, temperature=temperature,
            ce_weight=ce_weight, ib_weight=ib_weight, ib_warmup=ib_warmup, ib_clusters=ib_clusters, ib_compression=ib_compression, ema=ema, freeze=FinetuneConfig.freeze if freeze is None else tuple(f for f in freeze if f != "none"),
            seed=seed, max_steps=max_steps, save_every=save_every, num_workers=workers,
            progress=not no_progress, device=device, keep_best=keep_best, training_merge=training_merge,
            fit_keep=fit_keep)
        _, history = run(model, data, output=output, workdir=workdir, resume=resume, ratio=ratio,
                         pretrained=not no_pretrained, input_size=input_size, val_fraction=val_fraction,
                         train_samples=train_samples, val_samples=val_samples, config=cfg)
        import os

        if int(os.environ.get("RANK", "0")) != 0:
            return
        console = Console(highlight=False)
        evals = [h for h in history if h.get("type") == "eval"]
        for h in evals:
            extra = f"  top-1 agreement {h['top1_agreement']:.4f}" if "top1_agreement" in h else ""
            extra += f"  accuracy {h['accuracy']:.4f}" if "accuracy" in h else ""
            console.print(f"eval epoch {h['epoch']} ({h['when']}): agreement {h['agreement']:.4f}  "
                          f"kd {h['kd']:.5f}{extra}")
        if output is not None:
            console.print(f"saved to {output}")
