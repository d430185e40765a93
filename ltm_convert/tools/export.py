"""Export a converted model to ONNX and check the exported graph against PyTorch with onnxruntime.

The token schedule is static per resolution, so the exported graph has fixed token counts; the
batch dimension stays dynamic. The merge ops export as standard ONNX: TopK (topk / argsort),
GatherElements (gather), ScatterElements with reduction "add" (scatter_add, opset >= 16), MatMul.
The default exporter is the TorchScript one (``dynamo=False``); ``dynamo=True`` uses torch.export.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.model_inputs import (
    example_input,
    is_hf_model,
    main_output,
    planned_input_size,
)

DEFAULT_OPSET = 17
MIN_OPSET = 16
MAX_OPSET = 20  # the TorchScript exporter's highest (torch.onnx._constants)
MAX_OPSET_DYNAMO = 23


class _Wrapped(nn.Module):
    """model(images) -> main output tensor (logits / pooled feature), for any supported family."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hf = is_hf_model(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images) if self.hf else self.model(images)
        return main_output(out)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
                batch: int = 2, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                dynamo: bool = False) -> Path:
    """Write ``model`` (converted or not) as ONNX with one input ``images`` and one output ``output``."""
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
    kwargs: dict[str, Any] = dict(input_names=["images"], output_names=["output"], opset_version=opset)

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python ints: the schedule is static
            if dynamo:
                dyn = {"images": {0: torch.export.Dim("batch")}} if dynamic_batch else None
                torch.onnx.export(wrapped, (x,), tmp, dynamo=True, dynamic_shapes=dyn, **kwargs)
            else:
                dyn_axes = {"images": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(wrapped, (x,), tmp, dynamo=False, dynamic_axes=dyn_axes, **kwargs)

    try:
        replace_atomically(path, write)
    finally:
        model.train(was_training)
    return path


def verify_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor | None = None, *,
                batch: int | None = None, atol: float = 1e-3, rtol: float = 1e-3) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime (CPU) and compare with the PyTorch model on ``images``
    (default: ``batch`` random images, 3 unless given; a batch other than the export's checks the
    dynamic batch dimension)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LtmError("verifying an ONNX export needs onnxruntime; run `pip install onnxruntime`") from exc
    if images is None:
        images = example_input(model, planned_input_size(model), batch=batch or 3,
                               generator=torch.Generator().manual_seed(123))
    images = images.detach().float().cpu()
    with torch.no_grad():
        ref = _Wrapped(model).eval()(images.to(next(model.parameters()).device)).float().cpu()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(["output"], {"images": images.numpy()})
    out = torch.from_numpy(out)
    if out.shape != ref.shape:
        raise LtmError(f"the ONNX model returned shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    diff = (out - ref).abs()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    ok = bool(torch.allclose(out, ref, atol=atol, rtol=rtol))
    return {"max_abs_diff": float(diff.max()), "cosine_min": float(cos.min()), "batch": int(images.shape[0]),
            "ok": ok, "atol": atol, "rtol": rtol}
