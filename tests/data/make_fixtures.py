"""Writes the tests/data/<prefix>_* fixtures: files as a given ltm_convert version wrote them, kept for the
record; test_compat.py only reads the outputs. Run from the repository root of that version:

    python tests/data/make_fixtures.py f1   # 2026-12-06, file format 1 before the plan was recorded
    python tests/data/make_fixtures.py f2   # 2026-12-06 (64364dd), plan recorded with the old count names
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import ltm_convert
from ltm_convert.model_inputs import main_output, run_model

DATA = Path(__file__).parent


def timm(name: str, **kw):
    torch.manual_seed(0)
    return ltm_convert.load_model(name, pretrained=False, **kw).eval()


def hf_vit():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=128, num_labels=5)
    return T.ViTForImageClassification(cfg).eval()


def hf_mobilevit():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MobileViTConfig(image_size=64, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                            num_labels=5)
    model = T.MobileViTForImageClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.02)
    return model


VIT = dict(depth=3, embed_dim=64, num_heads=2, img_size=64, num_classes=5)
SWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), img_size=64, window_size=2, num_classes=5)
CASES = {
    "vit_avg_ltm.pt": (lambda: timm("vit_tiny_patch16_224", global_pool="avg", class_token=False, **VIT), {}),
    "vit_token_tome": (lambda: timm("vit_tiny_patch16_224", **VIT), {"method": "tome"}),
    "hf_vit_ltm.pt": (hf_vit, {}),
    "swin_ltm.pt": (lambda: timm("swin_tiny_patch4_window7_224", **SWIN), {}),
    "hf_mobilevit_ltm.pt": (hf_mobilevit, {}),
}


def main(prefix: str) -> None:
    expected = {}
    for case, (build, options) in CASES.items():
        name = f"{prefix}_{case}"
        model = ltm_convert.convert(build(), 0.6, **options)
        ltm_convert.save(model, DATA / name)
        size = tuple(model.ltm_config.input_size)
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected[name] = {"input_size": list(size),
                              "output": main_output(run_model(ltm_convert.load(DATA / name), x)).tolist()}
    (DATA / f"{prefix}_expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main(sys.argv[1])
