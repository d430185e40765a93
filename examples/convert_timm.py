"""Convert a timm ViT to LTM at a FLOPs ratio, check it, save it and load it back.

Uses a small random-weight ViT so it runs offline in seconds; for real weights use
``load_model("deit_small_patch16_224", checkpoint="deit_s.safetensors")``, a model name with hub
access, or the bundled DINOv2 ViT-S/14 (``ltm_convert.sources.bundled.bundled_timm()``).

Run: python examples/convert_timm.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ltm_convert import convert, load, load_model, save
from ltm_convert.api import describe, ltm_parameters


def main() -> None:
    torch.manual_seed(0)
    # any timm name works; the keyword arguments go to timm.create_model and are saved with the model
    base = load_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=4, num_classes=10)

    ltm = convert(base, ratio=0.6)  # 60% of the original FLOPs at 96x96
    info = describe(ltm)
    print(f"{info['model']} at {info['input_size'][0]}x{info['input_size'][1]}: "
          f"{info['flops_original'] / 1e6:.1f} -> {info['flops_converted'] / 1e6:.1f} MFLOPs "
          f"(ratio {info['flops_ratio']:.3f}, target {info['ratio']})")
    for block in info["blocks"]:
        print(f"  {block['name']}: {block['tokens_in']} -> {block['tokens_out']} tokens")
    print(f"new parameters: {info['params_added']:,} in {len(ltm_parameters(ltm))} tensors (all named *ltm_*)")

    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref, out = base(x), ltm(x)
    cos = torch.cosine_similarity(out, ref).min().item()
    print(f"logits {tuple(out.shape)}; cosine to the original {cos:.3f} (ratio 1.0 would give the original exactly)")

    with tempfile.TemporaryDirectory() as tmp:
        path = save(ltm, Path(tmp) / "vit_tiny_ltm.pt")  # recipe + config + weights, no pickled code
        again = load(path)
        with torch.no_grad():
            diff = (again(x) - out).abs().max().item()
        print(f"saved {path.name} ({path.stat().st_size / 1e6:.1f} MB), reloaded: max diff {diff:.1e}")
    assert abs(info["flops_ratio"] - 0.6) <= 0.02 * 0.6
    assert diff == 0.0
    print("ok")


if __name__ == "__main__":
    main()
