"""CaiT (class attention) converts: self-attention blocks merge, class attention reads the merged
tokens by size (rewriters/class_attention.py). Tiny random-weight models; layer scale set to 1 so
every block changes its output (timm initialises it to 1e-4)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from model_zoo import CLASS_ATTENTION_TIMM, cait_model

from ltm_convert.api import convert, describe
from ltm_convert.flops import count_flops
from ltm_convert.io import load, save
from ltm_convert.merge.state import TokenState, with_state

NAME, ZOO = CLASS_ATTENTION_TIMM["cait"]
KW = dict(ZOO, num_classes=4)  # 64 patch tokens, 2 class-attention blocks (as cait_model builds it)
_cait = cait_model


def _images(batch=2, seed=0):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cait():
    return _cait()


@pytest.fixture(scope="module")
def merged(cait):
    return convert(cait, 0.5)


def test_plan_names_the_class_attention_blocks(merged):
    plan = merged.ltm_plan
    assert plan.family == "class-attention"
    assert plan.block_names == ["blocks.0", "blocks.1"] and plan.prefix_tokens == 0
    assert plan.heads == ["class-attention:blocks_token_only.0.attn", "class-attention:blocks_token_only.1.attn",
                          "token:0"]


@pytest.mark.parametrize("depth_token_only", [1, 2])
def test_ratio_one_is_the_original(depth_token_only):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, depth_token_only=depth_token_only, **KW).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(convert(model, 1.0)(x), model(x))


@pytest.mark.parametrize("ratio", [0.8, 0.65, 0.5])
def test_flops_on_target_counting_class_attention_on_merged_tokens(cait, ratio):
    model = convert(cait, ratio)
    info = describe(model)
    assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio
    assert info["flops_converted"] == count_flops(model)
    # the solver's own model of the FLOPs is the count: class attention on the kept tokens included
    from ltm_convert.flops import meta_copy

    cost = model.ltm_family.cost_model(meta_copy(model), model.ltm_plan)
    assert cost.flops(model.ltm_config.keep) == pytest.approx(info["flops_converted"], rel=1e-9)
    tokens = [b["tokens_out"] for b in info["blocks"]]
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < 64


def test_class_attention_weighs_merged_tokens_like_the_patches_they_hold(cait, merged):
    """A token of size s counts as s identical tokens: exact against the original block fed the
    duplicated tokens (class attention), and the same for the talking-heads self-attention."""
    x, cls = torch.randn(2, 5, 192), torch.randn(2, 1, 192)
    sizes = torch.tensor([[1.0, 2, 3, 1, 4], [2, 2, 2, 1, 1]])
    with torch.no_grad():
        out = merged.blocks_token_only[0](with_state(x.clone(), TokenState(sizes)), cls)
        attn = merged.blocks[1].attn(x, attn_mask=sizes.log()[:, None, None, :])
        for b in range(2):
            dup = x[b:b + 1].repeat_interleave(sizes[b].long(), dim=1)
            ref = cait.blocks_token_only[0](dup, cls[b:b + 1])
            assert torch.allclose(out[b:b + 1], ref, atol=1e-5)
            first = torch.cumsum(sizes[b].long(), 0) - sizes[b].long()  # each token's first copy
            assert torch.allclose(attn[b], cait.blocks[1].attn(dup)[0, first], atol=1e-5)
        plain = merged.blocks_token_only[0](x.clone(), cls)  # no sizes: the original code
    assert not torch.allclose(out, plain, atol=1e-4)
    assert torch.equal(plain, cait.blocks_token_only[0](x, cls))


def test_batch_independence(merged):
    x = _images(batch=4, seed=3)
    with torch.no_grad():
        full = merged(x)
        singles = torch.cat([merged(x[i:i + 1]) for i in range(4)])
    assert full.shape == (4, 4)
    assert torch.allclose(full, singles, atol=1e-5)


def test_save_load_round_trip(merged, tmp_path):
    x = _images(batch=3, seed=1)
    loaded = load(save(merged, tmp_path / "cait.pt"))  # replays the recorded plan, class attention included
    assert loaded.ltm_plan.family == "class-attention"
    assert loaded.ltm_config.keep == merged.ltm_config.keep
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_pickle_deepcopy_and_compile_fullgraph(merged):
    x = _images()
    with torch.no_grad():
        ref = merged(x)
        assert torch.equal(pickle.loads(pickle.dumps(merged))(x), ref)
        assert torch.equal(copy.deepcopy(merged)(x), ref)
    torch._dynamo.reset()
    compiled = torch.compile(merged, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), ref, atol=1e-5)


def test_forward_intermediates_are_full_grid_maps(cait, merged):
    x = _images()
    with torch.no_grad():
        final, maps = merged.forward_intermediates(x)
        _, ref = cait.forward_intermediates(x)
    assert [m.shape for m in maps] == [r.shape for r in ref] == [(2, 192, 8, 8)] * 2
    assert final.shape[1] == 1 + merged.blocks[1].ltm_keep_mergeable
