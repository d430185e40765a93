"""`ltm-convert export MODEL_OR_FILE -o OUT.onnx [--ratio R] [--method M] [--opset N]`.

Wire into the CLI with ``register(app)``. The export and the onnxruntime check live in
:mod:`ltm_convert.tools.export`; errors a user can fix are :class:`LtmError` (one line, exit 2).
"""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ltm_convert.commands._common import (
    DEFAULT_RATIO,
    CheckpointOpt,
    InputSizeOpt,
    JsonOpt,
    MethodOpt,
    NoPretrainedOpt,
    RatioOpt,
    check_output,
    emit_json,
    quiet_stdout,
    resolve_model,
    say,
)
from ltm_convert.errors import LtmError

EXPORT_EPILOG = """\
[bold]Examples[/bold]

  ltm-convert export out/dinov2_s_ltm.pt -o dinov2_s_ltm.onnx

  ltm-convert export bundled --ratio 0.5 --method tome -o tome.onnx

  ltm-convert export vit_small_patch16_224 --no-pretrained -r 0.7 -o vit.onnx --no-verify --json
"""


def load_converted(target: str, *, ratio: Optional[float], method: Optional[str], no_pretrained: bool,
                   checkpoint: Optional[Path], input_size: Optional[tuple]) -> Any:
    model, saved = resolve_model(target, no_pretrained=no_pretrained, checkpoint=checkpoint,
                                 given={"--ratio": ratio is not None, "--method": method is not None,
                                        "--input-size": input_size is not None})
    if saved:
        return model
    from ltm_convert.api import convert

    return convert(model, DEFAULT_RATIO if ratio is None else ratio, method=method or "ltm", input_size=input_size)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EXPORT_EPILOG, no_args_is_help=True)
    def export(
        target: Annotated[str, typer.Argument(
            metavar="MODEL_OR_FILE",
            help="A saved LTM model (.pt or a directory), or a model source as for convert (converted in "
                 "memory at --ratio with --method first).", show_default=False)],
        output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT.onnx", help="Where to write the ONNX file.")],
        ratio: RatioOpt = None,
        method: MethodOpt = None,
        opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 16..20 (>= 16 for ScatterElements add).")] = 17,
        static_batch: Annotated[bool, typer.Option(
            "--static-batch", help="Fix the batch dimension (default: dynamic batch).")] = False,
        batch: Annotated[int, typer.Option(
            "--batch", min=1, max=4096, help="Batch the model is traced at: with --static-batch, the batch the file "
                                             "takes (default 2).")] = 2,
        verify: Annotated[bool, typer.Option(
            "--verify/--no-verify", help="Run the file with onnxruntime and compare with PyTorch (default on).")] = True,
        no_pretrained: NoPretrainedOpt = False,
        checkpoint: CheckpointOpt = None,
        input_size: InputSizeOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Export a converted model to ONNX (static token schedule, dynamic batch) and verify it with onnxruntime."""
        if output.suffix != ".onnx":
            raise typer.BadParameter(f"the file name must end in .onnx, got {str(output)!r}", param_hint="--output")
        check_output(output)
        from ltm_convert.tools.export import MAX_OPSET, MIN_OPSET

        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise LtmError(f"--opset {opset} is not supported: the merge needs opset >= {MIN_OPSET} and this torch "
                           f"exports up to {MAX_OPSET}; choose {MIN_OPSET}..{MAX_OPSET}")
        with quiet_stdout(json_out):
            from ltm_convert.tools.export import declared_outputs, export_onnx, verify_onnx

            say(f"loading {target} ...", json_out)
            model = load_converted(target, ratio=ratio, method=method, no_pretrained=no_pretrained,
                                   checkpoint=checkpoint, input_size=input_size)
            say(f"exporting to {output} (opset {opset}) ...", json_out)
            path = export_onnx(model, output, opset=opset, dynamic_batch=not static_batch, batch=batch)
            info: dict[str, Any] = {"output": str(path), "opset": opset, "dynamic_batch": not static_batch,
                                    "method": model.ltm_config.method, "ratio": model.ltm_config.ratio,
                                    "input_size": list(model.ltm_config.input_size),
                                    "outputs": declared_outputs(path)}
            if verify:
                check = verify_onnx(model, path, batch=batch if static_batch else None)
                info["verify"] = check
                if not check["ok"]:
                    bad = ", ".join(name for name, c in check["outputs"].items() if not c["ok"])
                    raise LtmError(f"the exported model differs from PyTorch in {bad} (max abs diff "
                                   f"{check['max_abs_diff']:.3g}, cosine {check['cosine_min']:.6f}); {path} was "
                                   f"written anyway")
        if json_out:
            emit_json(info)
            return
        msg = f"wrote {path}"
        outputs = info["outputs"]
        if len(outputs) > 1:
            msg += f" ({len(outputs)} outputs: {', '.join(outputs)})"
        if verify:
            msg += (f"; onnxruntime matches PyTorch{' on every output' if len(outputs) > 1 else ''} (max abs diff "
                    f"{info['verify']['max_abs_diff']:.2e}, batch {info['verify']['batch']})")
        say(msg, json_out)
