"""How to call a model: its default input size, an example input, and the call itself.

timm models take an image tensor positionally; HF vision models take ``pixel_values=``. Every
stage (tracing, FLOP counting, benchmarks) goes through these helpers so that they agree.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ltm_convert.errors import LtmError


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers PreTrainedModel (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _as_hw(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 3:  # (C, H, W)
        value = value[1:]
    return (value[0], value[1]) if len(value) == 2 else None


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a model was built for: timm's patch embed (also inside a wrapper such as timm's
    ``features_only`` FeatureGetterNet) / pretrained cfg, or HF config.image_size (also of the
    backbone of a DPT or Depth Anything)."""
    patch_embed = getattr(model, "patch_embed", None) or getattr(getattr(model, "model", None), "patch_embed", None)
    size = _as_hw(getattr(patch_embed, "img_size", None))
    if size:
        return size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = _as_hw(cfg.get("input_size"))
    if size:
        return size
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None)):
        size = _as_hw(getattr(holder, "image_size", None))
        if size:
            return size
    return (224, 224)


def in_channels(model: nn.Module) -> int:
    """Channels of the input image. The first convolution decides where there is one: timm keeps the
    pretrained config's 3 channels in ``pretrained_cfg`` for a model built with ``in_chans=1``."""
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "vision_config", None)):
        if holder is not None and getattr(holder, "num_channels", None):
            return int(holder.num_channels)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        return int(first_conv.in_channels)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][0])
    return 3


def planned_input_size(model: nn.Module, given: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (H, W) to run a model at: ``given``, else the size a converted model's schedule was
    solved for (its ``ltm_config``), else the model's own default. Every tool that feeds a model
    asks here, so a converted model always runs at the size its token counts were planned for."""
    if given:
        return (int(given[0]), int(given[1]))
    config = getattr(model, "ltm_config", None)
    if config is not None and config.input_size:
        return (int(config.input_size[0]), int(config.input_size[1]))
    return default_input_size(model)


def example_input(model: nn.Module, input_size: tuple[int, int] | None = None, batch: int = 1,
                  device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A deterministic image batch at the model's resolution (random normal, like a normalised image)."""
    h, w = input_size or default_input_size(model)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    if torch.device(device).type == "meta":
        return torch.empty(batch, in_channels(model), h, w, device="meta")
    gen = generator or torch.Generator().manual_seed(0)
    return torch.randn(batch, in_channels(model), h, w, generator=gen).to(device)


def call_kwargs(model: nn.Module, images: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) that feed ``images`` to the model's forward."""
    if is_hf_model(model):
        return (), {"pixel_values": images}
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise LtmError(f"cannot tell how to feed images to {type(model).__name__}.forward; it takes no positional input")
    return (images,), {}


def run_model(model: nn.Module, images: torch.Tensor) -> Any:
    args, kwargs = call_kwargs(model, images)
    return model(*args, **kwargs)


def main_output(output: Any) -> torch.Tensor:
    """The tensor a comparison should look at: logits, pooled output, or the last hidden state."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "pooler_output", "last_hidden_state", "image_embeds"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LtmError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def all_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Every tensor field of a model output, for parity checks."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, (tuple, list)):
        return {str(i): t for i, t in enumerate(output) if isinstance(t, torch.Tensor)}
    items = output.items() if hasattr(output, "items") else vars(output).items()
    return {k: v for k, v in items if isinstance(v, torch.Tensor)}
