"""Dense heads get full-grid maps (issue 24 item 1): the ``dense`` conversion option keeps patch tokens
to the last block of a class-token model, and the FLOPs target still holds; saved with the config."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch
from model_zoo import timm_model

from ltm_convert.api import convert, describe
from ltm_convert.config import REACH_TOLERANCE, LtmConfig


def _spatial_std(maps: torch.Tensor) -> float:
    """Mean over images and channels of the spread of a (B, C, H, W) map over space."""
    return float(maps.flatten(2).std(dim=-1).mean())


def test_dense_keeps_patch_tokens_to_the_last_block_and_meets_the_flops_target():
    """A DINOv2-like class-token ViT (the bundled model's layout): by default its last block merges every
    patch into one token (its classifier reads the class token only); dense keeps patches there, and the
    schedule still meets the FLOPs target with that block merging like the others."""
    original = timm_model("dinov2")
    plain = describe(convert(copy.deepcopy(original), 0.5))
    model = convert(copy.deepcopy(original), 0.5, dense=True)
    info = describe(model)
    prefix = info["prefix_tokens"]
    assert plain["blocks"][-1]["tokens_out"] == prefix + 1 and not plain["dense"]
    assert info["dense"] and info["blocks"][-1]["tokens_out"] > prefix + 1
    assert abs(info["flops_ratio"] - 0.5) <= REACH_TOLERANCE * 0.5
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (last,) = model.forward_intermediates(x, indices=[2], intermediates_only=True)
        (ref,) = original.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert last.shape == ref.shape and _spatial_std(last) > 0.2 * _spatial_std(ref)


def test_dense_is_saved_with_the_model_and_old_configs_load_without_it(tmp_path):
    from ltm_convert.io import load, save

    old = LtmConfig(ratio=0.5, keep={"blocks.0": 3}).to_dict()
    old.pop("dense")
    assert LtmConfig.from_dict(old).dense is False
    model = convert(timm_model("dinov2"), 0.5, dense=True)
    save(model, tmp_path / "dense.pt")
    back = load(tmp_path / "dense.pt")
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(1))
    assert back.ltm_config.dense and describe(back)["blocks"] == describe(model)["blocks"]
    with torch.no_grad():
        torch.testing.assert_close(back.forward_intermediates(x, indices=1, intermediates_only=True),
                                   model.forward_intermediates(x, indices=1, intermediates_only=True))


def test_cli_convert_dense_then_inspect(tmp_path):
    """`ltm-convert convert --dense` writes a dense model; `inspect` says so."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ltm_convert.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)

    kwargs = ["--model-kwargs", "img_size=64", "--model-kwargs", "depth=3"]
    done = cli("convert", "vit_tiny_patch16_224", "--no-pretrained", *kwargs, "--ratio", "0.6", "--dense", "-o", "d.pt")
    assert done.returncode == 0, done.stderr
    shown = cli("inspect", "d.pt", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["dense"] is True and info["blocks"][-1]["tokens_out"] > info["prefix_tokens"] + 1
    text = cli("inspect", "d.pt")
    assert text.returncode == 0 and "dense" in text.stdout
