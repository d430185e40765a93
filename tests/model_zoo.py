"""Small random-weight models of every supported family, for structure tests (fast on 2 cores)."""
from __future__ import annotations

import torch
from torch import nn

TIMM_FAMILIES = {
    # id: (timm name, kwargs)
    "vit-token": ("vit_small_patch16_224", dict(depth=3, img_size=96)),
    "vit-avg": ("vit_small_patch16_224", dict(depth=3, img_size=96, global_pool="avg", class_token=False)),
    "vit-avg-cls": ("vit_small_patch16_224", dict(depth=3, img_size=96, global_pool="avg", fc_norm=True)),
    "vit-qknorm": ("vit_small_patch16_224", dict(depth=3, img_size=96, qk_norm=True)),
    "siglip-map": ("vit_base_patch16_siglip_224", dict(depth=2, img_size=96, embed_dim=192, num_heads=3)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(depth=3, img_size=96)),
    "deit3-layerscale": ("deit3_small_patch16_224", dict(depth=3, img_size=96)),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=98)),
    "dinov2": ("vit_small_patch14_dinov2", dict(depth=3, img_size=98)),
}

HF_FAMILIES = ["ViTModel", "ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
               "Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
               "CLIPVisionModel", "SiglipVisionModel"]

# models whose blocks run on unfolded 2-D patch grids (ltm_convert/grid.py)
GRID_TIMM = {"mobilevit-xxs": ("mobilevit_xxs", {}), "mobilevit-s": ("mobilevit_s", {})}
GRID_HF = ["MobileViTModel", "MobileViTForImageClassification"]


def grid_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in GRID_TIMM:
        import timm

        name, kwargs = GRID_TIMM[kind]
        return timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    import transformers as T

    extra = {"num_labels": 5} if "Classification" in kind else {}
    model = getattr(T, kind)(T.MobileViTConfig(image_size=256, **extra)).eval()
    with torch.no_grad():  # HF zero-initialises the classifier; give the logits something to show
        for n, p in model.named_parameters():
            if n.startswith("classifier"):
                p.normal_(0, 0.02)
    return model


def timm_model(family: str) -> nn.Module:
    import timm

    name, kwargs = TIMM_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    # random init leaves LayerScale near zero; make it matter so parity tests see it
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    return model


def hf_model(cls_name: str) -> nn.Module:
    import transformers as T

    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                 image_size=64, patch_size=8)
    config_cls = {
        "ViT": T.ViTConfig, "DeiT": T.DeiTConfig, "Dinov2W": T.Dinov2WithRegistersConfig,
        "Dinov2": T.Dinov2Config, "CLIP": T.CLIPVisionConfig, "Siglip": T.SiglipVisionConfig,
    }
    key = next(k for k in ("Dinov2W", "Dinov2", "DeiT", "ViT", "CLIP", "Siglip") if cls_name.startswith(k))
    extra = {"num_labels": 5} if "Classification" in cls_name else {}
    if key == "Dinov2W":
        extra["num_register_tokens"] = 4
    torch.manual_seed(0)
    model = getattr(T, cls_name)(config_cls[key](**small, **extra)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda1" in n:
                p.uniform_(0.5, 1.5)
    return model


def images_for(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from ltm_convert.model_inputs import default_input_size

    h, w = default_input_size(model)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
