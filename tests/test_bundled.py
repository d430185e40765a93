"""The bundled real model (DINOv2 ViT-S/14 weights) and ViT-B/16: parity, FLOPs targets, quality."""
from __future__ import annotations

import pytest
import torch

from ltm_convert.api import convert, describe
from ltm_convert.sources.bundled import bundled_hf, bundled_timm
from ltm_convert.images import preprocess


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    return preprocess([skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()], 224)


@pytest.fixture(scope="module")
def dinov2():
    return bundled_timm()


def test_bundled_timm_parity(dinov2, real_images):
    with torch.no_grad():
        ref = dinov2.forward_features(real_images)
        out = convert(dinov2, 1.0).forward_features(real_images)
    assert (out - ref).abs().max().item() <= 1e-5


def test_bundled_hf_parity(real_images):
    model = bundled_hf()
    with torch.no_grad():
        ref = model(pixel_values=real_images)
        out = convert(model, 1.0, input_size=224)(pixel_values=real_images)
    for key in ("last_hidden_state", "pooler_output"):
        assert (getattr(out, key) - getattr(ref, key)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
def test_bundled_flops_target_and_quality(dinov2, real_images, ratio):
    converted = convert(dinov2, ratio)
    info = describe(converted)
    assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio
    with torch.no_grad():
        cos = torch.cosine_similarity(converted(real_images), dinov2(real_images))
    # untrained merging on real photos keeps the pooled feature close to the original
    floor = {0.8: 0.98, 0.65: 0.9, 0.5: 0.7}[ratio]
    assert cos.min().item() > floor, cos.tolist()


@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
def test_vit_base_flops_target(ratio):
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    info = describe(convert(model, ratio, inplace=True))
    assert info["flops_original"] == 35_150_649_344 or info["flops_original"] > 3e10
    assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio
