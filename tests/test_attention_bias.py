"""Proportional attention reaches attention modules that take no mask (rewriters/attention_bias.py,
used by the token-sequence family): such an attention is given one, so after a merge every key's
logit gets its log size, exactly as for an attention that takes ``attn_mask``; where its code
cannot take one, the user is warned. Tiny timm-style ViTs (tests/model_zoo.py maskless_vit)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from model_zoo import MasklessAttention, TimmAttention, images_for, maskless_vit

from ltm_convert.api import convert, ltm_blocks
from ltm_convert.rewriters.attention_bias import BiasedAttention


def _block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out.clone())) for _, b in ltm_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_a_maskless_attention_gets_the_size_bias_in_its_logits():
    """Converted at 0.5, blocks after the first merge see the bias (switching it off changes their
    outputs, not the earlier ones), and the model equals the same weights with timm's attention,
    which takes the bias as ``attn_mask``; that one is left as it is."""
    x = images_for(maskless_vit())
    merged = convert(maskless_vit(), 0.5)
    reference = convert(maskless_vit("mask"), 0.5)
    assert all(isinstance(b.attn, BiasedAttention) and isinstance(b.attn, MasklessAttention) for b in merged.blocks)
    assert all(type(b.attn) is TimmAttention for b in reference.blocks)  # takes a mask: untouched
    blocks = [b for _, b in ltm_blocks(merged)]
    first = next(i for i, b in enumerate(blocks) if b.merges())
    assert first < len(blocks) - 1 and all(b.ltm_prop_attn for b in blocks[first + 1:])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference(x), rtol=0, atol=1e-5)
    with_bias = _block_outputs(merged, x)
    for b in blocks:
        b.ltm_prop_attn = False
    without = _block_outputs(merged, x)
    for i, (a, b) in enumerate(zip(with_bias, without)):
        if i <= first:
            assert torch.equal(a, b), i
        else:
            assert (a - b).abs().max().item() > 1e-3, i


def test_a_maskless_attention_keeps_parity_pickles_copies_and_compiles():
    model = maskless_vit()
    x = images_for(model)
    same = convert(model, 1.0)
    merged = convert(model, 0.5)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
        expected = merged(x)
        assert torch.equal(pickle.loads(pickle.dumps(merged))(x), expected)
        assert torch.equal(copy.deepcopy(merged)(x), expected)
        compiled = torch.compile(merged, fullgraph=True, backend="eager", dynamic=False)
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-5)


def test_an_attention_that_cannot_take_a_bias_is_named_in_a_warning():
    model = maskless_vit("sigmoid")
    with pytest.warns(UserWarning, match=r"blocks\.0, blocks\.1, blocks\.2 takes no mask .*0 softmaxes.*no proportional attention"):
        merged = convert(model, 0.5)
    assert not any(isinstance(b.attn, BiasedAttention) for b in merged.blocks)
    with torch.no_grad():
        assert torch.isfinite(merged(images_for(model))).all()


def _attention_of(model: torch.nn.Module) -> torch.nn.Module:
    """The first attention given the bias (HF: the layer's ``attention`` child)."""
    return next(m for m in model.modules() if isinstance(m, BiasedAttention))


def _hf(kind: str) -> tuple[torch.nn.Module, torch.Tensor, float]:
    from model_zoo import clips_for, dense_model, grid_model, video_model

    if kind == "MobileViTModel":
        model = grid_model(kind)
        return model, images_for(model), 0.8
    if kind == "VideoMAEModel":
        model = video_model(kind)
        return model, clips_for(model), 0.6
    model = dense_model(kind)
    return model, images_for(model), 0.6


HF_SOFTMAX_BELOW = ["DPTForDepthEstimation", "VitPoseForPoseEstimation", "VideoMAEModel", "MobileViTModel"]


@pytest.mark.parametrize("kind", HF_SOFTMAX_BELOW)
def test_hf_attention_with_its_softmax_one_module_down_gets_the_size_bias(kind):
    """HF DPT, ViTPose, VideoMAE and MobileViT compute the softmax in a grandchild with the mask
    hard-coded None, and fx cannot trace it (they warned "no proportional attention" before). The
    bias now reaches those logits: attention over merged tokens with log sizes equals attention
    over the sequence where every token is repeated as often as its size (what proportional
    attention means), no warning, parity at 1.0, and switching the bias off changes the output."""
    import warnings

    from ltm_convert.model_inputs import main_output, run_model

    original, x, ratio = _hf(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert(copy.deepcopy(original), ratio)
    assert not [w for w in caught if "ltm_convert: the attention of" in str(w.message)]
    attn = _attention_of(model).eval()
    width = next(p for p in attn.parameters() if p.dim() == 2).shape[1]
    torch.manual_seed(3)
    tokens = torch.randn(2, 7, width)
    sizes = torch.tensor([[1, 3, 1, 2, 1, 1, 4], [2, 1, 1, 1, 3, 1, 1]])
    bias = sizes.float().log()[:, None, None, :]
    repeated = [torch.repeat_interleave(tokens[b], sizes[b], dim=0) for b in range(2)]
    first = [torch.cumsum(sizes[b], 0) - sizes[b] for b in range(2)]

    def out(t: torch.Tensor, **kw) -> torch.Tensor:
        y = attn(t, **kw)
        return y[0] if isinstance(y, tuple) else y

    with torch.no_grad():
        got = out(tokens, attn_mask=bias)
        for b in range(2):
            want = out(repeated[b][None])[0, first[b]]
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
        assert (out(tokens) - got).abs().max() > 1e-4  # the sizes matter
        same = convert(copy.deepcopy(original), 1.0)
        torch.testing.assert_close(main_output(run_model(same, x)), main_output(run_model(original, x)), rtol=0, atol=1e-6)
        with_bias = main_output(run_model(model, x))
        blocks = [b for _, b in ltm_blocks(model)]
        assert any(b.merges() for b in blocks[:-1])
        for b in blocks:
            b.ltm_prop_attn = False
        scale = with_bias.abs().max()  # a random tiny MobileViT's output is ~1e-41: compare relatively
        assert scale > 0 and (main_output(run_model(model, x)) - with_bias).abs().max() > 1e-3 * scale


def test_hf_attention_given_the_bias_by_mode_compiles_exports_and_copies(tmp_path):
    """The bias rides on a torch-function mode around the attention's own forward: it must survive
    torch.compile(fullgraph), deep copies, and ONNX export with the same result."""
    from model_zoo import dense_model

    from ltm_convert.tools.export import export_onnx, verify_onnx

    model = convert(dense_model("Dinov2Backbone"), 0.5)  # takes a mask: the plain path, for contrast
    assert not any(isinstance(m, BiasedAttention) for m in model.modules())
    model = convert(_hf("DPTForDepthEstimation")[0], 0.6).eval()
    x = images_for(model)
    with torch.no_grad():
        expected = model(pixel_values=x).predicted_depth
        assert torch.equal(copy.deepcopy(model)(pixel_values=x).predicted_depth, expected)  # HF's own hooks do not pickle
        compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
        torch.testing.assert_close(compiled(pixel_values=x).predicted_depth, expected, rtol=0, atol=1e-5)
    path = export_onnx(model, tmp_path / "dpt.onnx")
    verify_onnx(model, path)


@pytest.mark.parametrize("kind", ["DPTForDepthEstimation", "ViTModel"])
def test_flex_attention_is_refused_in_one_line_not_silently_unbiased(kind):
    """flex_attention takes no additive bias and runs no softmax the mode can reach: switched on after
    conversion it silently dropped proportional attention (DPT, VideoMAE) or failed with a misleading
    calling-convention message (ViT, Dinov2); converting a model set to it was refused as "no
    attention". Each is now one line naming the fix."""
    from model_zoo import dense_model, hf_model

    from ltm_convert.errors import LtmError, UnsupportedModelError
    from ltm_convert.model_inputs import main_output

    build = (lambda: dense_model(kind)) if kind.startswith("DPT") else (lambda: hf_model(kind))
    model = convert(build(), 0.6)
    x = images_for(model)
    model.set_attn_implementation("flex_attention")
    with pytest.raises(LtmError) as err, torch.no_grad():
        model(pixel_values=x)
    message = str(err.value)
    assert "\n" not in message and "set_attn_implementation('sdpa')" in message
    assert "BlockMask" in message or "softmax" in message
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.isfinite(main_output(model(pixel_values=x))).all()
    flex = build()
    flex.set_attn_implementation("flex_attention")
    with pytest.raises(UnsupportedModelError, match=r"runs attn_implementation 'flex_attention'.*set_attn_implementation\('sdpa'\)"):
        convert(flex, 0.6)
