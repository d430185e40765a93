"""`ltm-convert bench MODEL_OR_FILE [--ratio R ...] [--method M ...] [--batch-size B ...] [--json]`.

Wire into the CLI with ``register(app)``. The measuring lives in :mod:`ltm_convert.bench`; errors a
user can fix are :class:`LtmError` (one line, exit 2) through the CLI's own ``main``.
"""

import warnings
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from ltm_convert.commands._common import (
    CheckpointOpt,
    InputSizeOpt,
    NoPretrainedOpt,
    emit_json,
    method_callback,
    quiet_stdout,
    resolve_model,
    say,
)
from ltm_convert.errors import LtmError

BENCH_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert bench bundled --ratio 0.8 --ratio 0.5 --method ltm --method tome

  ltm-convert bench out/dinov2_s_ltm.pt --batch-size 1 --batch-size 32 --json

  ltm-convert bench vit_small_patch16_224 --no-pretrained -r 0.65 -m ltm -m tofu -m ltmp -b 8 --repeats 3

  ltm-convert bench bundled -r 0.5 --device cuda --dtype bf16 --compile
"""

DEFAULT_BENCH_RATIOS = (0.8, 0.65, 0.5)


def _ratios(values: Optional[List[str]]) -> Optional[List[float]]:
    if not values:
        return None
    from ltm_convert.config import validate_ratio

    try:
        return [validate_ratio(v) for v in values]
    except LtmError as exc:
        raise typer.BadParameter(str(exc)) from None


def _methods(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return list(dict.fromkeys(method_callback(v) for v in values))


MAX_BENCH_BATCH = 4096  # a larger batch only asks the allocator for tens of GB


def _batches(values: Optional[List[int]]) -> Optional[List[int]]:
    if not values:
        return None
    if any(v < 1 for v in values):
        raise typer.BadParameter("batch sizes must be positive")
    if max(values) > MAX_BENCH_BATCH:
        raise typer.BadParameter(f"batch size {max(values)} is too large to time; use at most {MAX_BENCH_BATCH} "
                                 "(throughput stops growing long before)")
    return sorted(set(values))


def load_models(target: str, *, ratios: Optional[List[float]], methods: Optional[List[str]], no_pretrained: bool,
                checkpoint: Optional[Path], input_size: Optional[tuple], log=None) -> tuple[Any, dict[str, Any]]:
    """(original, {name: converted}). A saved file is compared with itself with merging switched off."""
    model, saved = resolve_model(target, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                 given={"--ratio": bool(ratios), "--method": bool(methods),
                                        "--input-size": input_size is not None})
    if saved:
        from ltm_convert.api import unmerged_copy

        config = model.ltm_config
        return unmerged_copy(model), {f"{config.method}@{config.ratio:g}": model}
    from ltm_convert.tools.bench import convert_all

    return model, convert_all(model, ratios or DEFAULT_BENCH_RATIOS, methods or ["ltm"], input_size=input_size, log=log)


def render(result: dict) -> None:
    from rich.table import Table

    from ltm_convert.commands._common import console as make_console

    console = make_console()
    console.print(f"{result['device']}, {result['dtype']}, torch {result['torch']}"
                  f"{', torch.compile' if result['compile'] else ''}, input {result['input_size'][0]}x"
                  f"{result['input_size'][1]}, median of {result['repeats']} paired repeats")
    table = Table(title_justify="left")
    for col in ("model", "FLOPs ratio", "1/FLOPs", "params added", "cosine"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for b in result["batches"]:
        table.add_column(f"b{b} ms", justify="right")
        table.add_column(f"b{b} im/s", justify="right")
        table.add_column(f"b{b} speed-up", justify="right")
    orig = result["original"]
    cells = ["original", "1.000", "1.00x", "0", "1.0000"]
    for b in result["batches"]:
        t = orig["timing"][str(b)]
        cells += [f"{t['latency_ms']:.1f}", f"{t['throughput']:.1f}", "1.00x"]
    table.add_row(*cells)
    for row in result["models"]:
        cos = f"{row['cosine_mean']:.4f}" if "cosine_mean" in row else "-"
        cells = [row["name"], f"{row['flops_ratio']:.3f}", f"{row['ideal_speedup']:.2f}x",
                 f"{row['params_added']:,}", cos]
        for b in result["batches"]:
            t = row["timing"][str(b)]
            cells += [f"{t['latency_ms']:.1f}", f"{t['throughput']:.1f}", f"{t['speedup']:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    compared = sorted({row["compared"] for row in result["models"] if "compared" in row})
    if compared:
        console.print(f"cosine: agreement with the original on real photos, of {', '.join(compared)}")


def register(app: typer.Typer) -> None:
    @app.command(epilog=BENCH_EPILOG, no_args_is_help=True)
    def bench(
        target: Annotated[str, typer.Argument(
            metavar="MODEL_OR_FILE",
            help="A saved LTM model (.pt or a directory; compared with itself with merging off), or a model "
                 "source as for convert (converted in memory once per --ratio and --method).", show_default=False)],
        ratio: Annotated[Optional[List[str]], typer.Option(
            "--ratio", "-r", metavar="R", callback=_ratios, show_default=False,
            help="FLOPs fraction(s) to convert at; repeatable. Default 0.8, 0.65 and 0.5.")] = None,
        method: Annotated[Optional[List[str]], typer.Option(
            "--method", "-m", metavar="M", callback=_methods, show_default=False,
            help="Merge method(s): ltm, tome, tofu, ltmp; repeatable. Default ltm.")] = None,
        batch_size: Annotated[Optional[List[int]], typer.Option(
            "--batch-size", "-b", metavar="B", callback=_batches, show_default=False,
            help="Batch size(s) to time; repeatable. Default 1, 8, 32 (and 256 on GPU).")] = None,
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats per batch size (medians).")] = 5,
        warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up runs per model and batch size.")] = 1,
        device: Annotated[Optional[str], typer.Option(
            "--device", metavar="DEV", help="cpu or cuda[:N] (default: cuda if available).")] = None,
        dtype: Annotated[Optional[str], typer.Option(
            "--dtype", metavar="bf16|fp16|fp32", help="Autocast dtype on GPU (default bf16); CPU runs fp32.")] = None,
        compile: Annotated[bool, typer.Option(
            "--compile", help="Time torch.compile(fullgraph=True) versions of both models.")] = False,
        no_images: Annotated[bool, typer.Option(
            "--no-agreement", help="Skip the agreement column (cosine with the original on real photos).")] = False,
        no_pretrained: NoPretrainedOpt = False,
        checkpoint: CheckpointOpt = None,
        input_size: InputSizeOpt = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")] = False,
    ) -> None:
        """Measure FLOPs, parameters, latency, throughput and agreement of converted models against the original."""
        if dtype is not None and dtype.lower() not in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
            raise typer.BadParameter(f"expected bf16, fp16 or fp32, got {dtype!r}", param_hint="--dtype")
        with quiet_stdout(json_out):
            from ltm_convert.tools.bench import pick_device

            pick_device(device)  # an impossible device is refused before anything loads
            from ltm_convert.model_inputs import as_model_input, planned_input_size
            from ltm_convert.tools.bench import benchmark, pick_device
            from ltm_convert.images import sample_photos

            def log(msg: str) -> None:
                say(msg, json_out)

            say(f"loading {target} ...", json_out)
            original, converted = load_models(target, ratios=ratio, methods=method, no_pretrained=no_pretrained,
                                              checkpoint=checkpoint, input_size=input_size, log=log)
            images = None
            if not no_images:
                first = next(iter(converted.values()))
                size = planned_input_size(first)
                try:
                    images = as_model_input(first, sample_photos(size))  # still clips for a video model
                except LtmError as exc:
                    warnings.warn(f"{exc}; agreement column skipped", UserWarning, stacklevel=1)
            result = benchmark(original, converted, batches=batch_size, repeats=repeats, warmup=warmup,
                               device=device, dtype=dtype, compile=compile, images=images, log=log)
        if json_out:
            emit_json(result)
            return
        render(result)
