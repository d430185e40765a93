"""HF SigLIP2 NaFlex (``Siglip2VisionModel``, ``Siglip2ForImageClassification``) converts (it was
refused: it takes patches, not images). The tool feeds it images cut into patches in its processor's
order (model_inputs.naflex_batch); users feed it what ``Siglip2ImageProcessor`` makes: patches padded
to ``max_num_patches`` with ``pixel_attention_mask`` and ``spatial_shapes``. The NaFlex family
(rewriters/naflex.py) merges real tokens among themselves and padding with padding, rebuilds the
attention mask after each merge, and hands the head the full sequence back for its masked pooling.
Tiny random-weight configs; the processor is the real one (it needs no download)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_zoo import NAFLEX_HF, naflex_hf_model
from transformers import Siglip2ImageProcessor

import ltm_convert
from ltm_convert.api import describe
from ltm_convert.flops import count_flops
from ltm_convert.merge.state import capturing, tracking_sources
from ltm_convert.model_inputs import call_kwargs, naflex_batch

SIZE = (64, 64)  # 64 patches of 8 px


def _model(kind: str = "Siglip2VisionModel") -> torch.nn.Module:
    return naflex_hf_model(kind)


def _processed(max_patches: int = 64) -> dict[str, torch.Tensor]:
    """Three photos-to-be of different shapes through SigLIP2's own processor: 60, 64 and 32 real
    patches, padded to ``max_patches``."""
    g = np.random.default_rng(1)
    images = [g.integers(0, 255, (40, 90, 3), dtype=np.uint8), g.integers(0, 255, (64, 64, 3), dtype=np.uint8),
              g.integers(0, 255, (64, 32, 3), dtype=np.uint8)]
    out = Siglip2ImageProcessor(patch_size=8, max_num_patches=max_patches)(images=images, return_tensors="pt")
    return dict(out)


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def test_default_input_size_is_the_position_table_square():
    from ltm_convert.model_inputs import default_input_size

    assert default_input_size(_model()) == (64, 64)  # num_patches 64 of 8 px
    assert default_input_size(_model("Siglip2ForImageClassification")) == (64, 64)


def test_images_feed_the_model_as_its_processor_would():
    """naflex_batch cuts an image into patches in the processor's order: the same pixels give the
    same patches (the processor also rescales and normalises; here both see the same values)."""
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=64, do_resize=False)
    theirs = processor(images=[image], return_tensors="pt")
    normalised = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    ours = naflex_batch(_model(), normalised[None])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    assert ours["spatial_shapes"].tolist() == theirs["spatial_shapes"].tolist() == [[8, 8]]
    assert ours["pixel_attention_mask"].bool().all()


@pytest.mark.parametrize("kind", NAFLEX_HF)
def test_converts_with_parity_flops_and_batch_independence(kind):
    model = _model(kind)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    plain = call_kwargs(model, x)[1]
    same = ltm_convert.convert(model, 1.0, input_size=SIZE)
    assert same.ltm_plan.family == "naflex"
    torch.testing.assert_close(_out(same, plain), _out(model, plain), rtol=0, atol=1e-6)
    batch = _processed()
    torch.testing.assert_close(_out(same, batch), _out(model, batch), rtol=1e-5, atol=1e-5)
    merged = ltm_convert.convert(model, 0.6, input_size=SIZE)
    info = describe(merged)
    assert info["flops_converted"] == count_flops(merged, SIZE) and abs(info["flops_ratio"] - 0.6) <= 0.012
    assert info["flops_for"].startswith("one 64x64 image: 64 tokens")
    assert info["blocks"][-1]["tokens_out"] < 64
    out = _out(merged, plain)
    first = {k: v[:1] for k, v in plain.items()}
    torch.testing.assert_close(_out(merged, first), out[:1], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(_out(merged, batch)).all()


def test_padded_batches_keep_padding_apart_and_out_of_the_output():
    model = _model()
    batch = _processed(max_patches=80)
    valid = batch["pixel_attention_mask"].bool()
    real = valid.sum(1)  # 60, 64 and 32 real patches of 80
    assert real.tolist() != [80, 80, 80]
    same = ltm_convert.convert(model, 1.0, input_size=SIZE)
    n = int(real[2])
    alone = {"pixel_values": batch["pixel_values"][2:, :n], "pixel_attention_mask": batch["pixel_attention_mask"][2:, :n],
             "spatial_shapes": batch["spatial_shapes"][2:]}  # image 2 with no padding
    assert (_out(model, batch)[2] - _out(model, alone)[0]).abs().max() < 1e-4  # the original: independent
    assert (_out(same, batch)[2] - _out(same, alone)[0]).abs().max() < 1e-4
    merged = ltm_convert.convert(model, 0.5, input_size=SIZE)
    with tracking_sources(), capturing() as states:
        with torch.no_grad():
            out = merged(**batch)
    checked = 0
    for name, state in states.items():
        if state is None:
            continue
        assert state.valid is not None and state.sizes.shape[0] == 3
        for b in range(3):
            holder = state.source[b]
            assert state.valid[b, holder[valid[b]]].all(), f"{name}: a real patch sits in a padding token"
            assert not state.valid[b, holder[~valid[b]]].any(), f"{name}: a padding patch sits in a real token"
            assert abs(state.sizes[b][state.valid[b]].sum() - real[b]) < 1e-3
            checked += 1
    assert checked >= 3
    assert out.last_hidden_state.shape == (3, 80, 64)  # the head's masked pooling gets the full sequence
    noisy = dict(batch, pixel_values=torch.where(valid[..., None], batch["pixel_values"],
                                                 torch.randn_like(batch["pixel_values"]) * 5))
    torch.testing.assert_close(_out(merged, noisy), out.pooler_output, rtol=1e-5, atol=1e-5)


def test_few_tokens_per_block_still_keep_an_image_independent_of_its_padding():
    """With a 16-patch table an image of 12 real patches in block 3 (4 tokens in, 2 kept) had no slot
    left for its padding and kept one real token instead of two (1.7e-2 from its output alone); the
    batch now keeps one token more there."""
    model = ltm_convert.convert(_model(), 0.6, input_size=SIZE)
    g = np.random.default_rng(2)
    images = [g.integers(0, 255, (64, 64, 3), dtype=np.uint8), g.integers(0, 255, (300, 100, 3), dtype=np.uint8)]
    batch = dict(Siglip2ImageProcessor(patch_size=8, max_num_patches=16)(images=images, return_tensors="pt"))
    n = int(batch["pixel_attention_mask"][1].sum())
    assert n < 16
    alone = {"pixel_values": batch["pixel_values"][1:, :n], "pixel_attention_mask": batch["pixel_attention_mask"][1:, :n],
             "spatial_shapes": batch["spatial_shapes"][1:]}
    assert (_out(model, batch)[1] - _out(model, alone)[0]).abs().max() < 1e-4


def test_save_load_round_trip(tmp_path):
    merged = ltm_convert.convert(_model("Siglip2ForImageClassification"), 0.6, input_size=SIZE)
    path = tmp_path / "siglip2.pt"
    ltm_convert.save(merged, path)
    loaded = ltm_convert.load(path)
    assert loaded.ltm_plan.family == "naflex"
    batch = _processed()
    torch.testing.assert_close(_out(loaded, batch), _out(merged, batch), rtol=1e-6, atol=1e-6)


def test_onnx_export_at_a_static_batch_matches_and_a_dynamic_one_says_why_not(tmp_path):
    """Fed images, no patch is padding: the converted model takes the plain merge (the padded path's
    per-count loop and stable sort do not export). SigLIP2 sizes its position table per image in a
    loop, so its ONNX graph runs only at the batch it was exported with (the original's too): the
    check at another batch says to export with --static-batch."""
    from ltm_convert.errors import LtmError
    from ltm_convert.tools.export import export_onnx, verify_onnx

    model = ltm_convert.convert(_model(), 0.7, input_size=SIZE)
    path = export_onnx(model, tmp_path / "static.onnx", dynamic_batch=False, batch=2)
    check = verify_onnx(model, path, batch=2)
    assert check["ok"] and check["max_abs_diff"] < 1e-4
    path = export_onnx(model, tmp_path / "dynamic.onnx")
    with pytest.raises(LtmError, match="--static-batch"):
        verify_onnx(model, path)
