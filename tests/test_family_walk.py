"""Every family we meet is either converted correctly or refused with one clear reason.

A walk over timm and HF model families (small random configurations): each one must convert with
parity at ratio 1.0 and run at ratio 0.7, or raise :class:`UnsupportedModelError` at convert time,
never crash inside a forward or convert wrongly (0.1.0 crashed on rotary-embedding ViTs and EVA;
they convert now, tests/test_rotary.py).
"""
from __future__ import annotations

import pytest
import timm
import torch

from ltm_convert.api import convert
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.model_inputs import all_outputs, run_model

SMALL = dict(depth=2, num_classes=4)
TIMM = {
    "vit_tiny_patch16_224": dict(SMALL, img_size=64),
    "deit_tiny_distilled_patch16_224": dict(SMALL, img_size=64),
    "deit3_small_patch16_224": dict(SMALL, img_size=64),
    "vit_small_patch14_reg4_dinov2": dict(SMALL, img_size=56),
    "vit_base_patch16_siglip_224": dict(SMALL, img_size=64, embed_dim=96, num_heads=2),
    "eva02_tiny_patch14_224": dict(SMALL, img_size=56),  # rotary position embeddings
    "vit_medium_patch16_rope_reg1_gap_256": dict(SMALL, img_size=64),  # rotary position embeddings
    "eva_giant_patch14_224": dict(SMALL, img_size=56, embed_dim=64, num_heads=2),
    "beit_base_patch16_224": dict(SMALL, img_size=64, embed_dim=96, num_heads=2),
    "cait_xxs24_224": dict(depth=2, num_classes=4, img_size=64),
    "xcit_nano_12_p16_224": dict(depth=2, num_classes=4, img_size=64),
    "pit_ti_224": dict(num_classes=4, img_size=64),
    "levit_128s": dict(num_classes=4, img_size=64),
    "pvt_v2_b0": dict(num_classes=4, img_size=64),
    "coat_lite_tiny": dict(num_classes=4, img_size=64),
    "crossvit_tiny_240": dict(num_classes=4),
    "tiny_vit_5m_224": dict(num_classes=4),  # any input size (no img_size option): converted and run at its 224
    "fastvit_t8": dict(num_classes=4),
    "convnext_atto": dict(num_classes=4),
}
HF = ["ViTModel", "DeiTForImageClassificationWithTeacher", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel",
      "BeitModel", "YolosModel", "DINOv3ViTModel", "MLCDVisionModel"]


def _check(model: torch.nn.Module, x: torch.Tensor) -> str:
    try:
        merged = convert(model, 0.7)
    except UnsupportedModelError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("not supported yet"), message
        return "refused"
    same = convert(model, 1.0)
    with torch.no_grad():
        ref, out = all_outputs(run_model(model, x)), all_outputs(run_model(same, x))
        for key in ref:
            assert (out[key] - ref[key]).abs().max().item() <= 1e-5, key
        for value in all_outputs(run_model(merged, x)).values():
            assert torch.isfinite(value).all()
    return "converted"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family_converts_or_is_refused(name):
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, **TIMM[name]).eval()
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    size = TIMM[name].get("img_size", cfg[-1])
    x = torch.randn(2, 3, size, size)
    verdict = _check(model, x)
    if name.startswith(("eva02", "vit_medium_patch16_rope")):  # rotary: converted since rewriters/rotary.py
        assert verdict == "converted"
    if name.startswith("tiny_vit"):  # a convolution between attention and MLP: converted since issue 24 (ffn-grid)
        assert verdict == "converted"


@pytest.mark.slow
@pytest.mark.parametrize("cls_name", HF)
def test_hf_family_converts_or_is_refused(cls_name):
    import transformers

    cls = getattr(transformers, cls_name)
    kind = cls.config_class
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
              patch_size=16)
    if cls_name.startswith("Yolos"):
        kw["image_size"] = [64, 64]
    config = kind(**kw)
    torch.manual_seed(0)
    model = cls(config).eval()
    _check(model, torch.randn(2, 3, 64, 64))
