"""Variable-size inputs (rewriters/naflex.py, merge/padding.py): timm ``naflexvit_*`` converts, on plain
images and on padded NaFlex batches built by timm's own Patchify + NaFlexCollator. At ratio 1.0 both
match the original, and a sample's output does not depend on the padding around it; below 1.0 real
tokens never share a merged token with padding (checked on the source map and sizes the merge state
tracks), every sample keeps the same token count, the attention mask follows the merged tokens (the
padding's content cannot reach the output), and the FLOPs target is stated for its input size. HF
``Siglip2VisionModel`` converts too: tests/test_siglip2.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from model_zoo import NAFLEX_SMALL, NAFLEX_TIMM, check_intermediates_hold_their_tokens
from timm.data.naflex_dataset import NaFlexCollator
from timm.data.naflex_transforms import Patchify

import ltm_convert
from ltm_convert.api import describe
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.flops import count_flops
from ltm_convert.merge.state import capturing, tracking_sources

SIZE = (64, 64)  # 64 patches of 8 px


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gap-keyonly":  # a key-only attention mask (B, 1, 1, N) instead of the symmetric one
        return timm.create_model(NAFLEX_TIMM["gap"][0], use_key_only_attn_mask=True, **NAFLEX_SMALL).eval()
    name, options = NAFLEX_TIMM[kind]
    return ltm_convert.load_model(name, pretrained=False, **options).eval()


def _batch(images: list[torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
    """A NaFlex batch as timm's data pipeline makes one: each image patchified, padded to ``seq_len``."""
    patchify = Patchify(NAFLEX_SMALL["patch_size"])
    batch, _ = NaFlexCollator(max_seq_len=seq_len)([(patchify(im), 0) for im in images])
    return batch


def _images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 48, generator=g), torch.randn(3, 64, 64, generator=g), torch.randn(3, 56, 40, generator=g)]


def _run(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("kind", sorted(NAFLEX_TIMM))
def test_plain_images_parity_flops_and_target_size(kind):
    model = _model(kind)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    same = ltm_convert.convert(model, 1.0, input_size=SIZE)
    assert same.ltm_plan.family == "naflex"
    torch.testing.assert_close(_run(same, x), _run(model, x), rtol=0, atol=0)
    merged = ltm_convert.convert(model, 0.6, input_size=SIZE)
    info = describe(merged)
    assert info["flops_converted"] == count_flops(merged, SIZE) and abs(info["flops_ratio"] - 0.6) <= 0.012
    tokens = 64 + model.num_prefix_tokens
    assert info["flops_for"].startswith(f"one 64x64 image: {tokens} tokens")  # the size the target holds for
    assert info["blocks"][-1]["tokens_out"] < tokens
    out = _run(merged, x)
    torch.testing.assert_close(_run(merged, x[:1]), out[:1], rtol=1e-4, atol=1e-4)  # batch independence


@pytest.mark.parametrize("kind", ["gap", "siglip"])
def test_naflex_batch_parity_and_padding_independence_at_ratio_1(kind):
    model = _model(kind)
    same = ltm_convert.convert(model, 1.0, input_size=SIZE)
    images = _images()
    padded, alone = _batch(images, 96), _batch(images[:1], 24)  # image 0: 24 patches, padded with 72
    ref = _run(model, padded)
    out = _run(same, padded)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out[0] - _run(same, alone)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("kind, ratio", [("gap", 0.6), ("siglip", 0.6), ("gap", 0.4)])
def test_below_1_an_images_output_does_not_depend_on_the_batch_padding(kind, ratio):
    """Each image keeps the share of its tokens it would keep alone, so more padding never lets a short
    image fit its tokens into spare slots and merge less: alone, padded to 80 or to 200, the same
    output (before: 0.12 apart on a 0.25 scale; cosine 0.58 against the original at 80, 1.0 at 200)."""
    merged = ltm_convert.convert(_model(kind), ratio, input_size=SIZE)
    images = _images()
    alone = _run(merged, _batch(images[:1], 24))[0]  # image 0: 24 patches
    for length in (64, 80, 200):  # 64 at 0.4 was refused ("this block keeps 1 token of 6")
        out = _run(merged, _batch(images, length))
        torch.testing.assert_close(out[0], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gap", "siglip", "gap-keyonly"])
def test_real_tokens_never_absorb_padding_and_counts_stay_static(kind):
    model = _model(kind)
    merged = ltm_convert.convert(model, 0.5, input_size=SIZE)
    images = _images()
    batch = _batch(images, 80)
    valid = batch["patch_valid"]
    real = valid.sum(1)  # 24, 64, 35 real patches of 80
    with tracking_sources(), capturing() as states:
        out = _run(merged, batch)
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    prefix = model.num_prefix_tokens
    checked = 0
    for name, state in states.items():
        if state is None:  # the last block hands the head the full grid
            continue
        assert state.valid is not None and state.sizes.shape[0] == 3  # one static count for every sample
        for b in range(3):
            holder = state.source[b]  # the token holding each original patch
            assert state.valid[b, holder[valid[b]]].all(), f"{name}: a real patch sits in a padding token"
            assert not state.valid[b, holder[~valid[b]]].any(), f"{name}: a padding patch sits in a real token"
            # sizes agree: the real tokens hold exactly the real patches
            held = state.sizes[b, prefix:][state.valid[b, prefix:]].sum()
            assert abs(held - real[b]) < 1e-3, (name, b, held, real[b])
            checked += 1
    assert checked >= 3
    # the mask follows the merged tokens: what the padding holds cannot reach any sample's output
    noisy = dict(batch, patches=torch.where(valid[..., None], batch["patches"], torch.randn_like(batch["patches"]) * 5))
    torch.testing.assert_close(_run(merged, noisy), out, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_plain_and_naflex(tmp_path):
    model = _model("gap")
    merged = ltm_convert.convert(model, 0.6, input_size=SIZE)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    batch = _batch(_images(), 80)
    path = tmp_path / "naflex.pt"
    ltm_convert.save(merged, path)
    loaded = ltm_convert.load(path)
    assert loaded.ltm_plan.family == "naflex"
    torch.testing.assert_close(_run(loaded, x), _run(merged, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_run(loaded, batch), _run(merged, batch), rtol=1e-6, atol=1e-6)


def test_training_on_padded_batches_hard_merge_only():
    from ltm_convert.api import ltm_parameters
    from ltm_convert.finetune.optim import merge_hard

    merged = ltm_convert.convert(_model("gap"), 0.6, input_size=SIZE)
    merged.train()
    batch = _batch(_images(), 80)
    with pytest.raises(LtmError, match="relaxed merge of training .* cannot hold padding apart"):
        merged(batch)
    merged(torch.randn(2, 3, *SIZE))  # plain images train as before
    merge_hard(merged)  # --training-merge hard: the inference merge, with gradients
    merged(batch).square().mean().backward()
    reached = [n for n, p in ltm_parameters(merged) if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached and merged.embeds.proj.weight.grad.abs().sum() > 0


def test_cli_inspect_states_what_the_flops_target_is_for():
    kwargs = [arg for key, value in NAFLEX_SMALL.items() for arg in ("--model-kwargs", f"{key}={json.dumps(value)}")]
    done = subprocess.run([sys.executable, "-m", "ltm_convert.cli", "inspect", NAFLEX_TIMM["gap"][0], "--no-pretrained",
                           "--ratio", "0.7", "--input-size", "64", *kwargs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "FLOPs for" in text and "one 64x64 image: 68 tokens (4 prefix)" in text, done.stdout


# -- forward_intermediates: the blocks' outputs on the full patch grid -----------------------------------

def _intermediates(model: torch.nn.Module, x) -> dict[str, torch.Tensor]:
    """NaFlexVit.forward_intermediates in its forms: NCHW maps (images only) and NLC tokens, with prefix
    tokens and as a dict."""
    out = {}
    with torch.no_grad():
        if isinstance(x, torch.Tensor):
            out.update({f"map{i}": m for i, m in enumerate(model.forward_intermediates(x, intermediates_only=True))})
        nlc = model.forward_intermediates(x, indices=[1, 0], output_fmt="NLC", norm=True, return_prefix_tokens=True,
                                          intermediates_only=True)
        got = model.forward_intermediates(x, indices=1, output_fmt="NLC", output_dict=True)
    for i, item in enumerate(nlc):
        tokens, *front = item if isinstance(item, tuple) else (item,)
        out[f"nlc{i}"] = tokens
        out.update({f"prefix{i}": p for p in front})
    out["dict"] = got["image_intermediates"][0]
    if "patch_valid" in got:
        out["dict valid"] = got["patch_valid"]
    return out


@pytest.mark.parametrize("kind", sorted(NAFLEX_TIMM))
def test_forward_intermediates_of_plain_images_are_full_grid(kind):
    """They were the merged tokens: 29 of 64 reshaped into an (8, 8) map of nonsense, or 29 NLC tokens. Now
    every output has the original's shape, equals it at 1.0, and below every patch holds its token's value."""
    model = _model(kind)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    ref = _intermediates(model, x)
    assert ref["map0"].shape == (2, 64, 8, 8)
    same = _intermediates(ltm_convert.convert(model, 1.0, input_size=SIZE), x)
    assert same.keys() == ref.keys()
    for name, value in same.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-5, msg=name)
    for dense in (False, True):
        merged = ltm_convert.convert(model, 0.6, input_size=SIZE, dense=dense)
        got = _intermediates(merged, x)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
        assert check_intermediates_hold_their_tokens(
            merged, lambda: merged.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)) >= 1
        assert torch.equal(got["map0"].flatten(2).transpose(1, 2),  # the map: the same values, on the grid
                           merged.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0])


@pytest.mark.parametrize("kind", ["gap", "siglip"])
def test_forward_intermediates_of_a_padded_batch_cover_every_slot(kind):
    """A padded NaFlex batch (NLC only, as in timm): full-length outputs, every slot (padding included)
    holding its token's value, equal to the original at 1.0; the patch_valid the dict returns lines up
    with them. Asking it for NCHW maps is refused in one line."""
    model = _model(kind)
    batch = _batch(_images(), 80)
    ref = _intermediates(model, batch)
    same = _intermediates(ltm_convert.convert(model, 1.0, input_size=SIZE), batch)
    for name, value in same.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-5, msg=name)
    merged = ltm_convert.convert(model, 0.6, input_size=SIZE)
    got = _intermediates(merged, batch)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert torch.equal(got["dict valid"], batch["patch_valid"])
    assert check_intermediates_hold_their_tokens(
        merged, lambda: merged.forward_intermediates(batch, output_fmt="NLC", intermediates_only=True)) >= 1
    as_tensors = {k: batch[k] for k in ("patch_coord", "patch_valid")}  # patches passed as a tensor: the same
    with torch.no_grad():
        tokens = merged.forward_intermediates(batch["patches"], output_fmt="NLC", intermediates_only=True, **as_tensors)
        from_dict = merged.forward_intermediates(batch, output_fmt="NLC", intermediates_only=True)
    assert len(tokens) == 2 and all(torch.equal(a, b) for a, b in zip(tokens, from_dict))
    with pytest.raises(LtmError) as caught:
        merged.forward_intermediates(batch, intermediates_only=True)
    assert "\n" not in str(caught.value) and "output_fmt='NLC'" in str(caught.value)
