"""How to call a model: its default input size, an example input, and the call itself.

timm models take an image tensor positionally; HF vision models take ``pixel_values=`` (HF V-JEPA 2:
``pixel_values_videos=``). Every stage (tracing, FLOP counting, benchmarks) goes through these
helpers so that they agree.

Video models (HF VideoMAE, TimeSformer, ViViT, V-JEPA 2) take clips (B, T, C, H, W). The frame count
T is a property of the model (its config's ``num_frames`` / ``frames_per_clip``: the temporal
position table is sized for it), so an input size stays (H, W) everywhere and the example input of
a video model is a clip of its own T frames; a saved file replays with the same clip because the
rebuilt model carries the same config.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ltm_convert.errors import LtmError, UnsupportedModelError


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
    size = _as_hw(getattr(model, "img_size", None))  # MobileSAM-style TinyViT encoders (their own class)
    if size:
        return size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = _as_hw(cfg.get("input_size"))
    if size:
        return size
    for holder in _configs(model):
        size = _as_hw(getattr(holder, "image_size", None) or getattr(holder, "crop_size", None))
        if size:
            return size
    for holder in _configs(model):  # HF SigLIP2 NaFlex: a square image of its position table's patches
        patches, patch = getattr(holder, "num_patches", None), getattr(holder, "patch_size", None)
        if isinstance(patches, int) and isinstance(patch, int) and math.isqrt(patches) ** 2 == patches:
            return (math.isqrt(patches) * patch,) * 2
    return (224, 224)


def _configs(model: nn.Module) -> list[Any]:
    """The HF config objects that describe the model's input: its config, a vision sub-config, and the
    backbone config of a dense head (DPT, Depth Anything)."""
    config = getattr(model, "config", None)
    return [c for c in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None))
            if c is not None]


def input_frames(model: nn.Module) -> int | None:
    """Frames per clip of a video model (HF ``config.num_frames``, V-JEPA 2's ``frames_per_clip``);
    None for an image model."""
    if not is_hf_model(model):
        return None
    for holder in _configs(model):
        for key in ("num_frames", "frames_per_clip"):
            value = getattr(holder, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def input_shape(model: nn.Module, input_size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """One sample's input shape: (C, H, W) for an image model, (T, C, H, W) for a video model."""
    h, w = input_size or default_input_size(model)
    frames = input_frames(model)
    return (in_channels(model), h, w) if frames is None else (frames, in_channels(model), h, w)


def as_model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) as the model's input: for a video model, N still clips (each image
    repeated over the model's frames), so photo-based tools (calibration, agreement) feed it."""
    frames = input_frames(model)
    if frames is None or images.dim() != 4:
        return images
    return images.unsqueeze(1).expand(-1, frames, -1, -1, -1).contiguous()


def in_channels(model: nn.Module) -> int:
    """Channels of the input image. The first convolution decides where there is one: timm keeps the
    pretrained config's 3 channels in ``pretrained_cfg`` for a model built with ``in_chans=1``."""
    for holder in _configs(model):
        for key in ("num_channels", "in_chans"):  # V-JEPA 2 spells it in_chans
            if getattr(holder, key, None):
                return int(getattr(holder, key))
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
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
    """A deterministic batch at the model's resolution (random normal, like a normalised image):
    (B, C, H, W) images, or (B, T, C, H, W) clips for a video model (:func:`input_shape`)."""
    shape = (batch, *input_shape(model, input_size))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    gen = generator or torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device)


# HF forward arguments of models that take patchified, padded (NaFlex) batches instead of an image
NAFLEX_HF_INPUTS = ("pixel_attention_mask", "spatial_shapes")


def call_kwargs(model: nn.Module, images: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) that feed ``images`` to the model's forward."""
    if is_hf_model(model):
        params = inspect.signature(type(model).forward).parameters
        if all(n in params for n in NAFLEX_HF_INPUTS):
            return (), naflex_batch(model, images)
        kwargs = {_hf_input_name(model): images}
        if "skip_predictor" in params:  # V-JEPA 2: the encoder; its predictor is a pretraining head
            kwargs["skip_predictor"] = True
        return (), kwargs
    params = [p for p in inspect.signature(type(model).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise LtmError(f"cannot tell how to feed images to {type(model).__name__}.forward; it takes no positional input")
    return (images,), {}


def naflex_batch(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (B, C, H, W) as the NaFlex batch an HF SigLIP2-style model takes: patches (B, h*w, p*p*C)
    in its processor's order (row by row, each patch's pixels row by row, channels last), every patch
    valid, and each image's (h, w) patch grid."""
    config = next((c for c in _configs(model) if getattr(c, "patch_size", None)), None)
    if config is None:
        raise LtmError(f"cannot tell the patch size of {type(model).__name__}: its config has no patch_size")
    p = int(config.patch_size)
    B, C, H, W = images.shape
    if H % p or W % p:
        raise LtmError(f"{type(model).__name__} cuts images into {p}x{p} patches; {H}x{W} is not a multiple of {p}: "
                       f"pass an --input-size that is")
    h, w = H // p, W // p
    patches = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
    # the model reads these values (its position table's size; whether any patch is padding): real ones,
    # on the CPU, even for a weightless (meta) count, where "no mask" stands for "every patch valid"
    meta = images.device.type == "meta"
    where = "cpu" if meta else images.device
    return {"pixel_values": patches,
            "pixel_attention_mask": None if meta else torch.ones(B, h * w, dtype=torch.long, device=where),
            "spatial_shapes": torch.tensor([[h, w]] * B, dtype=torch.long, device=where)}


def _hf_input_name(model: nn.Module) -> str:
    """``pixel_values``, or ``pixel_values_videos`` for a model whose forward takes only that (V-JEPA 2)."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "pixel_values"
    return "pixel_values_videos" if "pixel_values_videos" in params and "pixel_values" not in params \
        else "pixel_values"


def run_model(model: nn.Module, images: torch.Tensor) -> Any:
    args, kwargs = call_kwargs(model, images)
    return model(*args, **kwargs)


MAIN_OUTPUT_KEYS = ("logits", "pooler_output", "last_hidden_state", "image_embeds", "predicted_depth", "heatmaps")


def feature_maps(output: Any) -> list[torch.Tensor] | None:
    """The feature maps of a model that hands out several (timm ``features_only``: a list of NCHW
    maps; an HF ``*Backbone``: ``feature_maps``), in the model's order; None for any other output.
    A sequence counts as maps only when every item is a 4-D tensor, so a tuple such as (logits,
    distillation logits) stays one output."""
    maps = output if isinstance(output, (tuple, list)) else getattr(output, "feature_maps", None)
    if isinstance(maps, (tuple, list)) and maps and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in maps):
        return list(maps)
    return None


def _main(output: Any) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return "output", output
    for key in MAIN_OUTPUT_KEYS:
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return key, value
    maps = feature_maps(output)
    if maps is not None:
        field = "output" if isinstance(output, (tuple, list)) else "feature_maps"
        return f"{field}[{len(maps) - 1}] (the last of {len(maps)} feature maps)", maps[-1]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return "output[0]", output[0]
    raise LtmError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def main_output(output: Any) -> torch.Tensor:
    """The tensor a comparison should look at: logits, pooled output, the last hidden state, a dense
    head's map, or of several feature maps the last one (timm and HF list them shallow to deep, so
    the one every merge reaches; timm keeps ``out_indices`` in the order given)."""
    return _main(output)[1]


def main_output_name(output: Any) -> str:
    """Which tensor :func:`main_output` picks, in words for a report (``logits``, ``feature_maps[1]
    (the last of 2 feature maps)`` ...)."""
    return _main(output)[0]


def output_tensors(output: Any) -> dict[str, torch.Tensor]:
    """What a model hands its user, by the names an exported graph gives them: ``output`` for one
    tensor (a tensor, or the main field of an HF output); ``output_0``, ``output_1`` ... for a
    model that returns feature maps (a list, even of one map: its user indexes it)."""
    _, value = _main(output)
    maps = feature_maps(output)
    if maps is not None and value is maps[-1]:
        return {f"output_{i}": m for i, m in enumerate(maps)}
    return {"output": value}


def all_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a model output, for parity checks; tuples of tensors inside it (an HF
    backbone's ``feature_maps``, ``hidden_states``) by ``name.index``."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, (tuple, list)):
        items = [(str(i), t) for i, t in enumerate(output)]
    else:
        items = list(output.items() if hasattr(output, "items") else vars(output).items())
    found: dict[str, torch.Tensor] = {}
    for k, v in items:
        if isinstance(v, torch.Tensor):
            found[k] = v
        elif isinstance(v, (tuple, list)):
            found.update({f"{k}.{i}": t for i, t in enumerate(v) if isinstance(t, torch.Tensor)})
    return found
