"""Convert a HuggingFace vision transformer (here a small Dinov2Model built from a config).

Any ``transformers`` ViT-style model works the same way (ViT, DeiT, Dinov2, CLIP / SigLIP vision
towers): ``load_model("hf:<id or local dir>")`` builds one from the hub or a local folder, and
``load_model("bundled:dinov2_vits14-hf")`` gives the real DINOv2 ViT-S/14 weights offline.
Pass ``--bundled`` to use the latter (slower: ~22 M parameters).

Run: python examples/convert_hf.py [--bundled]
"""
from __future__ import annotations

import sys

import torch

from ltm_convert import convert
from ltm_convert.api import describe
from ltm_convert.model_inputs import main_output


def build(bundled: bool):
    if bundled:
        from ltm_convert import load_model

        return load_model("bundled:dinov2_vits14-hf"), 224
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192,
                          image_size=64, patch_size=8)
    return Dinov2Model(config).eval(), 64


def main() -> None:
    model, size = build("--bundled" in sys.argv[1:])
    ltm = convert(model, ratio=0.7, input_size=size)
    info = describe(ltm)
    print(f"{info['model']} ({info['head']} head, {info['prefix_tokens']} prefix token): "
          f"FLOPs ratio {info['flops_ratio']:.3f} for target {info['ratio']}")
    print("tokens per block:", ", ".join(f"{b['tokens_in']}->{b['tokens_out']}" for b in info["blocks"]))

    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(pixel_values=pixel_values)
        out = ltm(pixel_values=pixel_values)  # same call, same output type
    print(f"last_hidden_state {tuple(ref.last_hidden_state.shape)} -> {tuple(out.last_hidden_state.shape)} "
          "(fewer tokens after merging)")
    cos = torch.cosine_similarity(main_output(out), main_output(ref)).min().item()
    print(f"pooled output cosine to the original: {cos:.3f} (untrained merge; fine-tune to recover)")
    assert abs(info["flops_ratio"] - 0.7) <= 0.02 * 0.7
    assert out.pooler_output.shape == ref.pooler_output.shape
    print("ok")


if __name__ == "__main__":
    main()
