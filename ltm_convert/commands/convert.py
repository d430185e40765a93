"""`ltm-convert convert MODEL --ratio R -o OUT` and `ltm-convert inspect MODEL_OR_FILE`."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from ltm_convert.commands._common import (
    CalibrationImagesOpt,
    DEFAULT_RATIO,
    CheckpointOpt,
    DenseOpt,
    ExcludeOpt,
    InputSizeOpt,
    JsonOpt,
    MethodOpt,
    ModelKwargsOpt,
    NoPretrainedOpt,
    NumClassesOpt,
    RatioOpt,
    ScheduleOpt,
    TopkOpt,
    _UsageError,
    check_output,
    emit_json,
    model_kwargs_callback,
    quiet_stdout,
    render_summary,
    resolve_model,
    say,
)
from ltm_convert.errors import LtmError

CONVERT_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert convert bundled --ratio 0.8 -o out/dinov2_s_ltm.pt

  ltm-convert convert vit_base_patch16_224 --ratio 0.8 -o model.pt --no-pretrained

  ltm-convert convert deit_small_patch16_224 -r 0.6 --checkpoint deit_s.safetensors -o deit_ltm/

  ltm-convert convert vit_tiny_patch16_224 --checkpoint my_2class.pth --num-classes 2 -o mine.pt

  ltm-convert convert hf:./my-local-vit --ratio 0.7 --input-size 384 --dry-run

  ltm-convert convert vit_tiny_patch16_224 --no-pretrained --exclude blocks.0 --dry-run --json

  ltm-convert convert vit_small_patch16_224 --no-pretrained --dense -o dense.pt   # full-grid feature maps
"""

INSPECT_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert inspect out/dinov2_s_ltm.pt

  ltm-convert inspect deit_ltm/ --json

  ltm-convert inspect vit_small_patch16_224 --no-pretrained --ratio 0.6 --input-size 224
"""


def model_options(model: str, num_classes: Optional[int], model_kwargs: Optional[list]) -> dict:
    """--num-classes / --model-kwargs as the source's constructor options (HF spells it num_labels)."""
    options = dict(model_kwargs) if isinstance(model_kwargs, dict) else (model_kwargs_callback(model_kwargs) or {})
    if num_classes is not None:
        options["num_labels" if model.startswith("hf:") else "num_classes"] = num_classes
    return options


def register(app: typer.Typer) -> None:
    @app.command(epilog=CONVERT_EPILOG, no_args_is_help=True)
    def convert(
        model: Annotated[str, typer.Argument(
            metavar="MODEL", show_default=False,
            help="A timm model name, 'hf:<id or local dir>', or 'bundled' (DINOv2 ViT-S/14, offline).")],
        output: Annotated[Optional[Path], typer.Option(
            "--output", "-o", metavar="OUT",
            help="Where to save: OUT.pt = one weights-only torch file; anything else = a directory "
                 "(config JSON + safetensors). Required unless --dry-run.")] = None,
        ratio: RatioOpt = None,
        no_pretrained: NoPretrainedOpt = False,
        checkpoint: CheckpointOpt = None,
        num_classes: NumClassesOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        input_size: InputSizeOpt = None,
        exclude: ExcludeOpt = None,
        method: MethodOpt = None,
        topk: TopkOpt = None,
        schedule: ScheduleOpt = None,
        calibration_images: CalibrationImagesOpt = None,
        dense: DenseOpt = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Convert in memory and print the plan; write nothing.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Convert MODEL into an LTM model that uses --ratio of its FLOPs, and save it."""
        if output is None and not dry_run:
            raise _UsageError("missing option '--output' / '-o' (required unless --dry-run)")
        if not dry_run:
            check_output(output, model=True)
        photos = None
        if calibration_images is not None:
            if schedule != "calibrated":
                raise _UsageError("--calibration-images only applies with --schedule calibrated")
            if not calibration_images.is_dir():
                raise _UsageError(f"--calibration-images {calibration_images} is not a folder; give a folder of photos")
            from ltm_convert.images import folder_photos  # torch: not at CLI import time

            photos = folder_photos(calibration_images, "--calibration-images")
        if topk is not None and (method or "ltm") != "ltm":
            raise _UsageError(f"--topk applies to the ltm method only (each merged token's targets); "
                              f"--method {method} has no such setting: leave --topk out")
        ratio = DEFAULT_RATIO if ratio is None else ratio
        with quiet_stdout(json_out):
            say(f"loading {model} ...", json_out)
            base, saved = resolve_model(model, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                        model_kwargs=model_options(model, num_classes, model_kwargs))
            if saved:
                raise LtmError(f"{model} is already a converted model; convert its original, or inspect it with "
                               f"`ltm-convert inspect {model}`")
            from ltm_convert.api import convert as api_convert
            from ltm_convert.api import describe

            say(f"converting at ratio {ratio:g} ...", json_out)
            options = {k: v for k, v in (("topk", topk), ("schedule", schedule)) if v is not None}
            # inplace: the base model was built for this command alone; a copy of its weights would
            # cost a ViT-B's 350 MB and a third of a second for nothing
            converted = api_convert(base, ratio=ratio, input_size=input_size, exclude=list(exclude) if exclude else None,
                                    method=method or "ltm", calibration_images=photos, dense=dense, inplace=True,
                                    **options)
            info = describe(converted)
            if not dry_run:
                from ltm_convert.io import save

                save(converted, str(output))
        if json_out:
            emit_json(info)
            return
        render_summary(info, title=f"LTM plan for {model}")
        if dry_run:
            say(f"dry run: nothing written{f' (would write {output})' if output is not None else ''}", json_out)
        else:
            say(f"saved to {output}", json_out)

    @app.command(epilog=INSPECT_EPILOG, no_args_is_help=True)
    def inspect(
        target: Annotated[str, typer.Argument(
            metavar="MODEL_OR_FILE", show_default=False,
            help="A saved LTM model (.pt file or a directory with ltm_config.json), or a model "
                 "source as for convert (then it is converted in memory at --ratio).")],
        ratio: RatioOpt = None,
        no_pretrained: NoPretrainedOpt = False,
        checkpoint: CheckpointOpt = None,
        num_classes: NumClassesOpt = None,
        model_kwargs: ModelKwargsOpt = None,
        input_size: InputSizeOpt = None,
        dense: DenseOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Show an LTM model's token schedule, FLOPs and added parameters."""
        with quiet_stdout(json_out):
            from ltm_convert.api import convert as api_convert
            from ltm_convert.api import describe

            model, saved = resolve_model(target, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                         model_kwargs=model_options(target, num_classes, model_kwargs),
                                         given={"--ratio": ratio is not None, "--input-size": input_size is not None,
                                                "--dense": dense})
            if not saved:
                model = api_convert(model, ratio=DEFAULT_RATIO if ratio is None else ratio, input_size=input_size,
                                    dense=dense, inplace=True)
            info = describe(model)
        if json_out:
            emit_json(info)
            return
        render_summary(info, title=f"LTM model {target}")
