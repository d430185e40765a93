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


def test_grid_blocks_whose_attention_takes_no_mask_are_named_in_a_warning():
    """HF MobileViT's attention computes its softmax in a grandchild and takes no mask, so the blocks
    after a group's merge cannot weigh merged tokens by size: the conversion says so (it was silent,
    and the bias was dropped). timm's MobileViT attention takes a mask: no warning."""
    import warnings

    from model_zoo import grid_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(grid_model("MobileViTModel"), 0.8)
    messages = [str(w.message) for w in caught if str(w.message).startswith("ltm_convert: the attention of")]
    assert len(messages) == 1 and "transformer.layer.1" in messages[0] and "no proportional attention" in messages[0]
    import timm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(timm.create_model("mobilevit_xxs", pretrained=False, img_size=64), 0.8, input_size=64)
    assert not [w for w in caught if "ltm_convert: the attention of" in str(w.message)]
