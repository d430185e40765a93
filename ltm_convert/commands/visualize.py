"""`ltm-convert visualize MODEL_OR_FILE IMAGE... [--block N] [--targets K] -o OUT.png`.

Wire into the CLI with ``register(app)``. Errors a user can fix are :class:`LtmError` (one line,
exit 2) through the CLI's own ``main``. The drawing lives in :mod:`ltm_convert.tools.visualize`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ltm_convert.commands._common import check_output, ratio_callback, resolve_model
from ltm_convert.errors import LtmError

VISUALIZE_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert visualize bundled cat.jpg --ratio 0.5 -o merges.png

  ltm-convert visualize out/dinov2_s_ltm.pt cat.jpg dog.png --block 5 --targets 3 -o merges.png

  ltm-convert visualize vit_small_patch16_224 --no-pretrained img.jpg --method tome -o tome.png
"""

DEFAULT_VIS_RATIO = 0.5


def _ratio(value: Optional[str]) -> Optional[float]:
    return ratio_callback(value)


def _block(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise typer.BadParameter("expected a block index (0 = first merging block, -1 = last) or a block name")
    return value


def load_for_visualize(target: str, *, ratio: Optional[float] = None, no_pretrained: bool = False,
                       checkpoint: Optional[Path] = None, input_size: Optional[int] = None,
                       method: Optional[str] = None):
    """A saved LTM file (loaded as is), or a model source converted in memory at ``ratio``."""
    model, saved = resolve_model(target, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                 given={"--ratio": ratio is not None, "--input-size": input_size is not None,
                                        "--method": method is not None})
    if saved:
        return model
    from ltm_convert.api import convert

    return convert(model, ratio=DEFAULT_VIS_RATIO if ratio is None else ratio, input_size=input_size,
                   method=method or "ltm")


def register(app: typer.Typer) -> None:
    @app.command(epilog=VISUALIZE_EPILOG, no_args_is_help=True)
    def visualize(
        target: Annotated[str, typer.Argument(
            metavar="MODEL_OR_FILE",
            help="A saved LTM model (.pt or a directory with ltm_config.json), or a model source as for "
                 "convert (then converted in memory at --ratio).", show_default=False)],
        images: Annotated[List[Path], typer.Argument(
            metavar="IMAGE...", help="Image files (any format Pillow reads); one row each.",
            exists=True, dir_okay=False, readable=True, show_default=False)],
        output: Annotated[Path, typer.Option(
            "--output", "-o", metavar="OUT.png", help="Where to write the PNG.")],
        block: Annotated[Optional[str], typer.Option(
            "--block", metavar="N", callback=_block,
            help="Merging block whose targets are shown: index among the merging blocks (0 = first, "
                 "-1 = last; default last) or a block name such as blocks.5.")] = None,
        targets: Annotated[int, typer.Option(
            "--targets", "-k", metavar="K", min=0, max=16,
            help="Heat-maps for the K targets of the block that absorbed the most patches.")] = 4,
        ratio: Annotated[Optional[str], typer.Option(
            "--ratio", "-r", metavar="R", callback=_ratio, show_default=False,
            help=f"FLOPs fraction when MODEL_OR_FILE must be converted first. Default {DEFAULT_VIS_RATIO}.")] = None,
        no_pretrained: Annotated[bool, typer.Option(
            "--no-pretrained", help="Build the architecture with random weights (no download).")] = False,
        checkpoint: Annotated[Optional[Path], typer.Option(
            "--checkpoint", "-c", metavar="FILE", exists=True, dir_okay=False, readable=True,
            help="Load the base model's weights from a local state-dict file.")] = None,
        input_size: Annotated[Optional[int], typer.Option(
            "--input-size", "-s", metavar="N", min=1,
            help="Square resolution when converting (default: the model's own).")] = None,
        method: Annotated[Optional[str], typer.Option(
            "--method", "-m", metavar="NAME",
            help="Merging method when converting: ltm (default) or a baseline such as tome.")] = None,
        panel: Annotated[Optional[int], typer.Option(
            "--panel", metavar="PX", min=32, max=1024,
            help="Width of each panel in pixels (default: the model's input width).")] = None,
    ) -> None:
        """Draw which tokens a converted model merges: targets, heat-maps and the final partition."""
        from rich.console import Console

        from ltm_convert.tools.visualize import save_png
        from ltm_convert.tools.visualize import visualize as draw

        console = Console(highlight=False, soft_wrap=True)
        if output.suffix.lower() != ".png":
            raise LtmError(f"--output must end in .png, got {output}")
        check_output(output)
        console.print(f"loading {target} ...")
        model = load_for_visualize(target, ratio=ratio, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                   input_size=input_size, method=method)
        block_arg = int(block) if block is not None and block.lstrip("-").isdigit() else block
        figure, trace = draw(model, [str(p) for p in images], block=block_arg, targets=targets, panel=panel)
        save_png(figure, output)
        li = trace.index(block_arg)
        console.print(f"{trace.blocks[li]}: {trace.sizes[li].shape[1]} targets; "
                      f"{trace.sizes[-1].shape[1]} tokens after {trace.blocks[-1]}; "
                      f"{len(images)} image(s) -> {output} ({figure.width}x{figure.height})")
