"""HF V-JEPA 2 converts (rewriters/vjepa2.py): it was refused because its attention derives rotary
positions from token indices. Merged tokens now rotate at the mean (frame, row, column) of the
tubelets they hold; the encoder hands its full sequence back, so the predictor and the classifier's
attentive pooler read the original shape. Tiny random-weight configs (tests/model_zoo.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import VJEPA2_HF, clips_for, video_model

from ltm_convert.api import convert, describe, ltm_blocks
from ltm_convert.config import REACH_TOLERANCE
from ltm_convert.flops import count_flops
from ltm_convert.rewriters.vjepa2 import ATTENTION, MergedPositionsAttention, tubelet_positions

RATIOS = {"VJEPA2Model": 0.6, "VJEPA2ForVideoClassification": 0.85}  # the pooler is a third of the tiny classifier


def _main(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values_videos=x, skip_predictor=True) if "skip_predictor" in \
            type(model).forward.__code__.co_varnames else model(pixel_values_videos=x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def test_index_positions_given_as_coordinates_rotate_as_the_model_does():
    """The float (frame, row, column) path equals the model's own index path at the original positions."""
    model = convert(video_model("VJEPA2Model"), 1.0)
    attn = next(m for m in model.modules() if isinstance(m, MergedPositionsAttention))
    assert type(attn).ltm_original_class.__name__ == ATTENTION
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    coords = tubelet_positions(attn, x.device).expand(2, -1, -1)
    with torch.no_grad():
        ref = type(attn).ltm_original_class.forward(attn, x)[0]
        got = attn(x, attn_mask=(torch.zeros(2, 1, 1, 32), coords))[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert coords[0, 17].tolist() == [1.0, 0.0, 1.0]  # 4x4 tubelets a frame: index 17 is frame 1, row 0, column 1


@pytest.mark.parametrize("kind", VJEPA2_HF)
def test_converts_with_parity_flops_full_sequence_and_batch_independence(kind):
    original = video_model(kind)
    x = clips_for(original)
    ref = _main(original, x)
    same = convert(copy.deepcopy(original), 1.0)
    assert same.ltm_plan.family == "vjepa2"
    torch.testing.assert_close(_main(same, x), ref, rtol=0, atol=1e-6)
    ratio = RATIOS[kind]
    model = convert(copy.deepcopy(original), ratio)
    info = describe(model)
    assert abs(info["flops_ratio"] - ratio) <= REACH_TOLERANCE * ratio and info["flops_converted"] == count_flops(model)
    assert info["blocks"][-1]["tokens_out"] < 32
    out = _main(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()  # the encoder's full sequence is handed back
    torch.testing.assert_close(_main(model, x[:1]), out[:1], rtol=1e-4, atol=1e-4)
    if kind == "VJEPA2Model":  # the predictor (a pretraining head) still runs on the full sequence
        with torch.no_grad():
            predicted = model(pixel_values_videos=x).predictor_output.last_hidden_state
        assert predicted.shape[1] == 32 and torch.isfinite(predicted).all()


def test_merged_tokens_rotate_at_their_members_mean_position():
    """After the first merge every block's attention receives (bias, positions): the positions are the
    mean of the members' (frame, row, column), and they matter (rotating the merged tokens as the
    first indices of the clip, the silent error the refusal guarded against, changes the output)."""
    from ltm_convert.merge.state import TokenState

    model = convert(video_model("VJEPA2Model"), 0.6)
    blocks = [b for _, b in ltm_blocks(model)]
    rule = blocks[1].__dict__["_ltm_positions"]
    attn = blocks[1].get_submodule(rule.attn_child)
    source = torch.tensor([[0] * 2 + list(range(1, 31))])  # tubelets 0 and 1 merged into token 0
    state = TokenState(torch.ones(1, 31), source=source)
    _, (bias, coords) = rule.block_inputs(blocks[1], {}, state, None)
    assert bias is None and coords.shape == (1, 31, 3)
    assert coords[0, 0].tolist() == [0.0, 0.0, 0.5] and coords[0, 1].tolist() == [0.0, 0.0, 2.0]
    x = clips_for(model)
    out = _main(model, x)
    original = rule.block_inputs
    try:
        for b in blocks:
            b.__dict__["_ltm_positions"].block_inputs = lambda block, values, state, bias: (values, bias)
        index_positions = _main(model, x)
    finally:
        for b in blocks:
            b.__dict__["_ltm_positions"].__dict__.pop("block_inputs", None)
    assert (index_positions - out).abs().max() > 1e-4
    assert rule.block_inputs == original


def test_save_load_round_trip(tmp_path):
    from ltm_convert.io import load, save

    model = convert(video_model("VJEPA2ForVideoClassification"), 0.85)
    save(model, tmp_path / "vjepa2.pt")
    loaded = load(tmp_path / "vjepa2.pt")
    x = clips_for(model)
    assert loaded.ltm_plan.family == "vjepa2"
    torch.testing.assert_close(_main(loaded, x), _main(model, x), rtol=1e-6, atol=1e-6)


def test_half_precision_and_another_clip_size():
    """bf16 runs (the merged positions follow the model's dtype); a clip size other than the config's
    is refused at conversion (merged tokens are placed on the config's clip), not at the first call."""
    from ltm_convert.errors import UnsupportedModelError

    model = convert(video_model("VJEPA2Model"), 0.6).to(torch.bfloat16)
    out = _main(model, clips_for(model).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(UnsupportedModelError, match=r"makes 128 tubelets.*config's clip \(2 x 4 x 4 = 32\).*--input-size"):
        convert(video_model("VJEPA2Model"), 0.6, input_size=64)
