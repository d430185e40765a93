"""Export a converted model to ONNX and check the exported graph against PyTorch with onnxruntime.

The token schedule is static per resolution, so the exported graph has fixed token counts; the
batch dimension stays dynamic. The merge ops export as standard ONNX: TopK (topk / argsort),
GatherElements (gather), ScatterElements with reduction "add" (scatter_add, opset >= 16), MatMul.
The default exporter is the TorchScript one (``dynamo=False``); ``dynamo=True`` uses torch.export.
A model's outputs keep their shape: one tensor is the output ``output``; several feature maps (timm
``features_only``, HF ``*Backbone``) are ``output_0``, ``output_1`` ..., each checked by
:func:`verify_onnx`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.model_inputs import (
    example_input,
    output_tensors,
    planned_input_size,
    run_model,
)

DEFAULT_OPSET = 17
MIN_OPSET = 16
MAX_OPSET = 20  # the TorchScript exporter's highest (torch.onnx._constants)
MAX_OPSET_DYNAMO = 23


class _Wrapped(nn.Module):
    """model(images) -> what the model hands its user (:func:`output_tensors`): its main tensor
    (logits / pooled feature / dense map), or a tuple of its feature maps, for any supported family."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return output_tensors(run_model(self.model, images))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = tuple(self.outputs(images).values())
        return values[0] if len(values) == 1 else values


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
                batch: int = 2, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                dynamo: bool = False) -> Path:
    """Write ``model`` (converted or not) as ONNX with one input ``images`` and the outputs of
    :func:`output_tensors`: ``output``, or ``output_0``, ``output_1`` ... for each feature map.

    A failure of torch's exporter (an operator without an ONNX form ...) is one :class:`LtmError`
    line: what torch's exporter cannot do, and whether it fails with merging switched off too. What
    the exporter prints itself (the TorchScript one dumps the whole Torch IR graph on stdout when it
    fails) is held back (in the error's notes for a traceback); no partial file is left."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise LtmError(f"the ONNX file name must end in .onnx, got {str(path)!r}")
    top = MAX_OPSET_DYNAMO if dynamo else MAX_OPSET
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise LtmError(f"--opset {opset} is not supported: the merge needs opset >= {MIN_OPSET} (ScatterElements "
                       f"with reduction 'add') and this torch exports up to {top}; choose {MIN_OPSET}..{top}")
    from ltm_convert.io import check_writable, replace_atomically

    check_writable(path)
    was_training = model.training
    model.eval()
    wrapped = _Wrapped(model).eval()
    size = planned_input_size(model, input_size)
    x = example_input(model, size, batch=batch)
    with torch.no_grad():
        shapes = {name: tuple(t.shape) for name, t in wrapped.outputs(x).items()}
    try:
        replace_atomically(path, lambda tmp: _write(wrapped, x, tmp, shapes, opset=opset, dynamic_batch=dynamic_batch,
                                                    dynamo=dynamo))
    except (LtmError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch's exporter: any failure is one line about the model
        raise LtmError(_export_failure(model, exc, opset=opset, dynamo=dynamo)) from exc
    finally:
        model.train(was_training)
    return path


def _write(wrapped: _Wrapped, x: torch.Tensor, tmp: str, shapes: dict[str, tuple[int, ...]], *, opset: int,
           dynamic_batch: bool, dynamo: bool) -> None:
    names = list(shapes)
    kwargs: dict[str, Any] = dict(input_names=["images"], output_names=names, opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings(), held_back_stdout() as printed:
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints: the schedule is static
        try:
            if dynamo:
                dyn = {"images": {0: torch.export.Dim("batch")}} if dynamic_batch else None
                torch.onnx.export(wrapped, (x,), tmp, dynamo=True, dynamic_shapes=dyn, **kwargs)
            else:
                dyn_axes = {name: {0: "batch"} for name in ["images", *names]} if dynamic_batch else None
                torch.onnx.export(wrapped, (x,), tmp, dynamo=False, dynamic_axes=dyn_axes, **kwargs)
        except Exception as exc:
            text = printed.text()
            if text and hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"the exporter printed:\n{text}")
            raise
    _declare_output_shapes(tmp, shapes, dynamic_batch)


def _declare_output_shapes(file: str, shapes: dict[str, tuple[int, ...]], dynamic_batch: bool) -> None:
    """Declare each output's real shape. The token schedule fixes every size but the batch, yet the
    TorchScript exporter's shape inference leaves them symbolic and can even name a spatial axis
    after the batch axis (an exported DPT declared [batch, batch, W])."""
    import onnx

    graph = onnx.load(file, load_external_data=False)
    for output in graph.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shapes[output.name]):
            dim = dims.add()
            if axis == 0 and dynamic_batch:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size
    onnx.save(graph, file)


def declared_outputs(path: str | os.PathLike) -> dict[str, list[int | str]]:
    """The outputs an ONNX file declares, by name: their shapes ("batch" for a dynamic batch axis)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}


def _export_failure(model: nn.Module, exc: Exception, *, opset: int, dynamo: bool) -> str:
    """One line for a failed export: the operator or the exporter's first line, and whether the
    model fails the same way with merging switched off (then it is the model, not the merge)."""
    op = re.search(r"operator '([^']+)'", str(exc))
    cause = (f"it has no ONNX conversion for the operator '{op[1]}' at opset {opset}" if op else
             f"{type(exc).__name__}: {_first_line(exc)}")
    which = "torch.export-based" if dynamo else "TorchScript"
    message = f"torch's {which} ONNX exporter cannot export {type(model).__name__}: {cause}"
    unmerged = _exports_unmerged(model, opset=opset, dynamo=dynamo)
    if unmerged is False:
        return (f"{message}; the model fails the same way with merging switched off, so it cannot be exported to "
                f"ONNX by torch's exporter: run it in PyTorch instead")
    if unmerged is True:
        return (f"{message}; with merging switched off it exports, so the merge is at fault: please report this "
                f"(LTM_DEBUG=1 shows the traceback)")
    return f"{message}; this model cannot be exported to ONNX by torch's exporter: run it in PyTorch instead"


def _exports_unmerged(model: nn.Module, *, opset: int, dynamo: bool) -> bool | None:
    """Whether a converted model exports with merging switched off (None: not a converted model,
    or no copy to try)."""
    if getattr(model, "ltm_config", None) is None:
        return None
    from ltm_convert.api import unmerged_copy

    try:
        plain = _Wrapped(unmerged_copy(model)).eval()
    except Exception:  # noqa: BLE001 - the question stays open
        return None
    x = example_input(plain.model, planned_input_size(plain.model), batch=2)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with torch.no_grad():
                shapes = {name: tuple(t.shape) for name, t in plain.outputs(x).items()}
            _write(plain, x, os.path.join(tmp, "unmerged.onnx"), shapes, opset=opset, dynamic_batch=True,
                   dynamo=dynamo)
        except Exception:  # noqa: BLE001 - any failure answers the question
            return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    return text if len(text) <= 300 else text[:297] + "..."


class _Held:
    """What was written to stdout while it was held back."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def text(self) -> str:
        _flush_stdout()
        self.file.seek(0)
        return self.file.read().decode(errors="replace").strip()


@contextlib.contextmanager
def held_back_stdout() -> Iterator[_Held]:
    """Catch what is written to file descriptor 1 meanwhile, by Python or by C++ (torch's ONNX log
    writes there itself, past ``sys.stdout``), so that it cannot reach a user's stdout or a --json
    document; also switch torch's ONNX log back off, which its exporter leaves on."""
    was_logging = torch._C._jit_is_onnx_log_enabled()
    _flush_stdout()
    try:
        with tempfile.TemporaryFile() as file:
            try:
                saved: int | None = os.dup(1)
            except OSError:  # no stdout to protect
                saved = None
            try:
                if saved is not None:
                    os.dup2(file.fileno(), 1)
                yield _Held(file)
            finally:
                if saved is not None:
                    _flush_stdout()
                    os.dup2(saved, 1)
                    os.close(saved)
    finally:
        torch._C._jit_set_onnx_log_enabled(was_logging)


def _flush_stdout() -> None:
    """Flush Python's and C's stdout buffers (C++ std::cout writes through C's stdout)."""
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to ask
        pass


def verify_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor | None = None, *,
                batch: int | None = None, atol: float = 1e-3, rtol: float = 1e-3) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime (CPU) and compare every output with the PyTorch model's on
    ``images`` (default: ``batch`` random images, 3 unless given; a batch other than the export's
    checks the dynamic batch dimension). The totals (worst difference, lowest cosine, ok) cover
    all outputs; ``outputs`` has them per output."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LtmError("verifying an ONNX export needs onnxruntime; run `pip install onnxruntime`") from exc
    if images is None:
        images = example_input(model, planned_input_size(model), batch=batch or 3,
                               generator=torch.Generator().manual_seed(123))
    images = images.detach().float().cpu()
    with torch.no_grad():
        refs = _Wrapped(model).eval().outputs(images.to(next(model.parameters()).device))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = None
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        if names != list(refs):
            raise LtmError(f"{path} has the outputs {names}, the model hands out {list(refs)}: export it again")
        outs = session.run(names, {"images": images.numpy()})
    except LtmError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, one line
        declared = session.get_inputs()[0].shape[0] if session is not None else None  # "batch": dynamic
        hint = (" (checked at another batch size than the export's: a model that sizes a table per image in a "
                "loop, as HF SigLIP2 does, runs only at its own batch; export it with --static-batch)"
                if isinstance(declared, str) else "")
        raise LtmError(f"onnxruntime cannot run {path}: {_first_line(exc)}{hint}; the file was written, "
                       f"--no-verify skips this check") from exc
    per_output = {name: _compare(torch.from_numpy(out), refs[name].float().cpu(), name, atol=atol, rtol=rtol)
                  for name, out in zip(names, outs)}
    return {"max_abs_diff": max(c["max_abs_diff"] for c in per_output.values()),
            "cosine_min": min(c["cosine_min"] for c in per_output.values()), "batch": int(images.shape[0]),
            "ok": all(c["ok"] for c in per_output.values()), "atol": atol, "rtol": rtol, "outputs": per_output}


def _compare(out: torch.Tensor, ref: torch.Tensor, name: str, *, atol: float, rtol: float) -> dict[str, Any]:
    if out.shape != ref.shape:
        raise LtmError(f"the ONNX model's {name} has shape {tuple(out.shape)}, PyTorch's {tuple(ref.shape)}")
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    return {"shape": list(out.shape), "max_abs_diff": float((out - ref).abs().max()), "cosine_min": float(cos.min()),
            "ok": bool(torch.allclose(out, ref, atol=atol, rtol=rtol))}
