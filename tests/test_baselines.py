"""Baseline methods (ToMe, ToFu, LTMP) behind convert(method=...): parity, FLOPs, static shapes,
merge rules, records, save/load. Small random-weight models; the mask modules are also tested alone."""
from __future__ import annotations

import pytest
import torch
from model_zoo import hf_model, images_for, timm_model

from ltm_convert.api import convert, describe, ltm_blocks, ltm_parameters
from ltm_convert.flops import count_flops
from ltm_convert.merge.baselines import LtmpMask, ToMeMask
from ltm_convert.merge.baselines.common import rounds
from ltm_convert.merge.methods import MaskSpec, mask_factory, method_names
from ltm_convert.model_inputs import all_outputs, run_model

BASELINES = ["tome", "tofu", "ltmp"]


def _outputs(model, x):
    with torch.no_grad():
        return all_outputs(run_model(model, x))


def test_methods_are_registered():
    assert set(BASELINES) <= set(method_names())


@pytest.mark.parametrize("method,family", [("tome", "dinov2-registers"), ("tofu", "dinov2-registers"),
                                           ("ltmp", "dinov2-registers"), ("tome", "vit-avg"), ("ltmp", "ViTModel")])
def test_parity_flops_and_static_shapes(method, family):
    model = timm_model(family) if family != "ViTModel" else hf_model(family)
    x = images_for(model, batch=3)
    ref = _outputs(model, x)
    same = convert(model, 1.0, method=method)
    out = _outputs(same, x)
    for key in ref:
        assert (out[key] - ref[key]).abs().max().item() <= 1e-5, key

    merged = convert(model, 0.6, method=method)
    info = describe(merged)
    assert info["method"] == method
    assert abs(info["flops_ratio"] - 0.6) <= 0.02 * 0.6
    assert info["flops_converted"] == count_flops(merged)
    out = _outputs(merged, x)
    for key in ref:
        assert torch.isfinite(out[key]).all()
    # static shapes: every merging block emits exactly prefix + keep tokens, whatever the images
    from ltm_convert.merge.state import recording

    with torch.no_grad(), recording() as records:
        run_model(merged, x)
    blocks = dict(ltm_blocks(merged))
    assert records
    for rec in records:
        blk = blocks[rec["block"]]
        m = rec["tokens_in"] - blk.ltm_prefix
        assert rec["assign"].shape == (3, m, blk.keep_for(rec["tokens_in"]))
        assert rec["targets"].shape == (3, blk.keep_for(rec["tokens_in"]))
    # batch independence: image 0 alone gives the same output as inside the batch
    alone = _outputs(merged, x[:1])
    for key in ref:
        if out[key].shape[0] == 3:
            assert torch.allclose(alone[key][0], out[key][0], atol=1e-4), key


def test_only_ltmp_adds_trainable_parameters():
    model = timm_model("vit-token")
    for method in ("tome", "tofu"):
        converted = convert(model, 0.7, method=method)
        assert all(not p.requires_grad for _, p in ltm_parameters(converted))
    converted = convert(model, 0.7, method="ltmp")
    trainable = [n for n, p in ltm_parameters(converted) if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("theta_merge", "theta_prune") for n in trainable)
    assert all(".ltm_mask." in n for n in trainable)
    # every threshold gets a gradient through the straight-through gates
    converted.train()
    x = images_for(converted, batch=2)
    converted(x).square().mean().backward()
    merging = [b for _, b in ltm_blocks(converted) if b.merges()]
    for blk in merging[:-1]:  # the last block's merge cannot reach a class-token output
        assert blk.ltm_mask.theta_merge.grad is not None and blk.ltm_mask.theta_merge.grad != 0


def test_save_load_round_trip(tmp_path):
    from ltm_convert.io import load, save
    from ltm_convert.sources import load_model

    model = load_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, num_classes=7)
    x = images_for(model)
    for method in ("tofu", "ltmp"):
        converted = convert(model, 0.6, method=method)
        save(converted, tmp_path / f"{method}.pt")
        loaded = load(tmp_path / f"{method}.pt")
        assert loaded.ltm_config.method == method
        assert [type(b.ltm_mask) for _, b in ltm_blocks(loaded)] == [type(b.ltm_mask) for _, b in ltm_blocks(converted)]
        assert [repr(b.ltm_mask) for _, b in ltm_blocks(loaded)] == [repr(b.ltm_mask) for _, b in ltm_blocks(converted)]
        with torch.no_grad():
            assert torch.equal(loaded(x), converted(x))


# -- the mask modules alone ---------------------------------------------------------------------

def _spec(first: bool = False, index: int = 0) -> MaskSpec:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4).eval()
    return MaskSpec(dim=32, block=block, attn=block.attn, pre_norm="norm1", first=first, topk=0, index=index)


def _tokens(b=2, n=21, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("keep", [19, 11, 6, 1])
def test_tome_conserves_size_and_averages(keep):
    mask = ToMeMask(_spec())
    z = _tokens()
    sizes = torch.rand(2, 21) * 3 + 0.5
    out, out_sizes, _ = mask(z, sizes, 1, keep)
    assert out.shape == (2, 1 + keep, 32) and out_sizes.shape == (2, 1 + keep)
    assert torch.equal(out[:, 0], z[:, 0]) and torch.equal(out_sizes[:, 0], sizes[:, 0])  # prefix untouched
    assert torch.allclose(out_sizes.sum(1), sizes.sum(1), atol=1e-4)  # merging conserves total size
    # size-weighted: the weighted sum of tokens is conserved too
    total_in = (z * sizes.unsqueeze(-1)).sum(1)
    total_out = (out * out_sizes.unsqueeze(-1)).sum(1)
    assert torch.allclose(total_in, total_out, atol=1e-3)


def test_tome_merges_duplicates_first():
    mask = ToMeMask(_spec())
    z = _tokens(n=10)
    z[:, 3] = z[:, 4]  # token 3 (A) duplicates token 4 (B): the strongest edge
    out, sizes, _ = mask(z, None, 0, 9)
    assert sizes.max().item() == 2.0
    assert torch.allclose(out[sizes == 2.0], z[:, 4], atol=1e-5)


def test_rounds_cover_any_keep():
    for m in range(1, 40):
        for keep in range(1, m + 1):
            r = rounds(m, keep)
            assert sum(r) == m - keep
            left = m
            for step in r:
                assert 1 <= step <= (left + 1) // 2
                left -= step


def test_tofu_prunes_early_and_mlerps_later():
    specs = [_spec(first=True)] + [_spec(index=i) for i in range(1, 5)]
    masks = [mask_factory("tofu")(s) for s in specs]
    assert [m.prune for m in masks] == [True, True, True, False, False]
    z = _tokens()
    out, sizes, _ = masks[0](z, None, 1, 12)
    # pruning: every output token is an input token unchanged; sizes do not grow
    for b in range(2):
        for t in range(out.shape[1]):
            assert (out[b, t] - z[b]).abs().amax(-1).min().item() == 0.0
    assert sizes.max().item() == 1.0
    out, sizes, _ = masks[-1](z, None, 1, 12)
    # MLERP: a merged token takes the largest norm among the tokens merged into it
    norms = z[:, 1:].norm(dim=-1)
    assert torch.all(out[:, 1:].norm(dim=-1) <= norms.max(dim=1, keepdim=True).values + 1e-4)
    assert torch.allclose(sizes.sum(1), torch.full((2,), 21.0))


def test_ltmp_thresholds_choose_merge_or_prune():
    mask = LtmpMask(_spec())
    z = _tokens()
    with torch.no_grad():
        mask.theta_prune.fill_(10.0)  # everything below the prune threshold: the removed tokens are dropped
        _, sizes, _ = mask(z, None, 0, 12)
    assert torch.allclose(sizes.sum(1), torch.full((2,), 12.0))
    with torch.no_grad():
        mask.theta_prune.fill_(-10.0)  # nothing prunable: the removed tokens are merged
        _, sizes, _ = mask(z, None, 0, 12)
    assert torch.allclose(sizes.sum(1), torch.full((2,), 21.0))


@pytest.mark.parametrize("cls", [ToMeMask, LtmpMask])
def test_record_assign_rows(cls):
    mask = cls(_spec())
    z = _tokens()
    from ltm_convert.merge.state import recording

    with recording() as record:
        record.append({"block": "b", "tokens_in": 21})
        out, sizes, _ = mask(z, None, 1, 7)
    rec = record[-1]
    assign = rec["assign"]
    assert assign.shape == (2, 20, 7)
    # every token lands in exactly one output slot (merged) or none (pruned)
    assert torch.all((assign.sum(-1) == 1) | (assign.sum(-1) == 0))
    # the mass in each slot is the merged size
    assert torch.allclose(assign.sum(1), sizes[:, 1:])
