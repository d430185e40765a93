"""Video ViTs (issue 24, item 3): HF VideoMAE and ViViT take clips (B, T, C, H, W) whose shape is read
from the model's config; their tubelets (all frames) form one token sequence, which the sequence family
merges across space and time. Parity at ratio 1.0, FLOPs counted on a clip within 2% of the target, batch
independence, save / load and save_pretrained round trips, the CLI on a save_pretrained directory; an
input size the model cannot run at and TimeSformer's divided space-time attention are refused with one
clear line (V-JEPA 2 converts: tests/test_vjepa2.py). Tiny random-weight models: 4 frames at 32 px, 32 tubelets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import VIDEO_HF, clips_for, hf_model, video_model

import ltm_convert
from ltm_convert.api import convert, describe, merge_counts
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.flops import count_flops
from ltm_convert.model_inputs import all_outputs, example_input, input_frames, main_output, run_model

REPO = Path(__file__).resolve().parents[1]
TUBELETS = 2 * 4 * 4  # 4 frames / tubelets of 2, 32 px / patches of 8


def _outputs(model, x):
    with torch.no_grad():
        return all_outputs(run_model(model, x))


def _main(model, x):
    with torch.no_grad():
        return main_output(run_model(model, x))


def test_the_clip_shape_comes_from_the_config():
    for name in ("VideoMAEModel", "VivitModel", "TimesformerModel"):
        model = video_model(name)
        assert input_frames(model) == 4
        assert tuple(example_input(model, batch=2).shape) == (2, 4, 3, 32, 32), name
    jepa = video_model("VJEPA2Model", in_chans=1)  # V-JEPA 2 spells them frames_per_clip, crop_size, in_chans
    assert tuple(example_input(jepa).shape) == (1, 4, 1, 32, 32)
    from ltm_convert.model_inputs import call_kwargs

    assert list(call_kwargs(jepa, example_input(jepa))[1]) == ["pixel_values_videos", "skip_predictor"]  # the encoder
    image = hf_model("ViTModel")
    assert input_frames(image) is None and example_input(image).dim() == 4


@pytest.mark.parametrize("name", VIDEO_HF)
def test_video_models_convert_parity_flops_batch(name):
    model = video_model(name)
    x = clips_for(model, batch=3)
    ref = _outputs(model, x)
    same = convert(model, 1.0)
    out = _outputs(same, x)
    assert set(out) == set(ref)
    for key in ref:
        assert (out[key] - ref[key]).abs().max().item() == 0.0, key

    merged = convert(model, 0.7)
    flops = count_flops(merged) / count_flops(model)  # counted on a clip (the example input is one)
    assert abs(flops - 0.7) <= 0.02 * 0.7, flops
    info = describe(merged)
    assert info["frames"] == 4 and info["input_size"] == [32, 32]
    blocks = merge_counts(merged)
    assert blocks[0]["tokens_in"] == TUBELETS + merged.ltm_plan.prefix_tokens  # every frame's tubelets, one sequence
    assert blocks[-1]["tokens_out"] < blocks[0]["tokens_in"]
    full = _main(merged, x)
    singles = torch.cat([_main(merged, x[i:i + 1]) for i in range(3)])
    assert full.shape == main_output(run_model(model, x)).shape  # last_hidden_state keeps the original's shape
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-5)


def test_merges_join_tubelets_across_frames():
    """The tubelets of both time slots are one sequence: a merged token may hold tubelets of different frames."""
    from ltm_convert.merge.state import capturing, tracking_sources

    model = convert(video_model("VideoMAEModel"), 0.8)
    first = merge_counts(model)[0]
    assert first["tokens_in"] == TUBELETS and first["tokens_out"] < TUBELETS
    with torch.no_grad(), tracking_sources(), capturing() as states:
        model(pixel_values=clips_for(model, batch=1))
    source = states["encoder.layer.0"].source[0]  # (32,): the token holding each tubelet (time-major order)
    time_slot = torch.arange(TUBELETS) // (TUBELETS // 2)
    across = [t for t in source.unique() if time_slot[source == t].unique().numel() == 2]
    assert across, "no merged token holds tubelets of both time slots"


@pytest.mark.parametrize("name", VIDEO_HF)
def test_save_load_and_save_pretrained_replay_the_clip(tmp_path, name):
    model = convert(video_model(name), 0.7)
    x = clips_for(model)
    path = ltm_convert.save(model, tmp_path / "video.pt")
    loaded = ltm_convert.load(path)
    assert type(loaded) is type(model) and loaded.ltm_config.keep == model.ltm_config.keep
    assert torch.equal(_main(loaded, x), _main(model, x))
    model.save_pretrained(tmp_path / "hf")
    again = ltm_convert.load(tmp_path / "hf")
    assert torch.equal(_main(again, x), _main(model, x))


def test_calibrated_schedule_uses_still_clips():
    model = video_model("VivitForVideoClassification")
    merged = convert(model, 0.7, schedule="calibrated")
    assert abs(count_flops(merged) / count_flops(model) - 0.7) <= 0.02 * 0.7


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LTM_DEBUG", None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltm_convert.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_cli_converts_a_saved_video_classifier_directory(tmp_path):
    original = video_model("VideoMAEForVideoClassification")
    original.save_pretrained(tmp_path / "hf")
    proc = _cli("convert", str(tmp_path / "hf"), "--ratio", "0.7", "--json", "-o", str(tmp_path / "out.pt"),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["model"] == "VideoMAEForVideoClassification" and info["frames"] == 4
    assert abs(info["flops_ratio"] - 0.7) <= 0.02 * 0.7
    loaded = ltm_convert.load(tmp_path / "out.pt")
    x = clips_for(original)
    same = convert(original, config=loaded.ltm_config)
    assert torch.equal(_main(loaded, x), _main(same, x))

    bad = _cli("convert", str(tmp_path / "hf"), "--input-size", "48", "-o", str(tmp_path / "b.pt"), cwd=tmp_path)
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "takes clips of 4 frames of 32x32 pixels" in lines[0] and "cannot run at 48x48" in lines[0]
    assert not (tmp_path / "b.pt").exists()


def test_an_input_size_the_model_cannot_run_at_is_one_clear_line():
    with pytest.raises(LtmError) as err:
        convert(video_model("VivitModel"), 0.7, input_size=(48, 64))
    message = str(err.value)
    assert "\n" not in message and "VivitModel takes clips of 4 frames of 32x32 pixels" in message
    assert "cannot run at 48x64" in message and "image_size=[48, 64]" in message


@pytest.mark.parametrize("name", ["TimesformerModel", "TimesformerForVideoClassification"])
def test_timesformer_divided_attention_is_refused_with_the_reshape(name):
    with pytest.raises(UnsupportedModelError) as err:
        convert(video_model(name), 0.7)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"not supported yet: {name}: TimeSformer's divided space-time")
    assert "(batch x patches, frames, dim)" in message and "merging only inside each layer's MLP" in message


def test_videomae_mean_pooling_weights_merged_tokens_in_training():
    """The relaxed merge of training keeps every token with a size: VideoMAE's fc_norm gets their
    size-weighted mean (a converted model's classifier sees the same clip either way)."""
    from ltm_convert.merge.state import state_of
    from ltm_convert.rewriters.heads import size_weighted_mean

    model = convert(video_model("VideoMAEForVideoClassification"), 0.6).train()
    seen = {}
    model.videomae.register_forward_hook(lambda m, a, out: seen.update(seq=out.last_hidden_state))
    model.fc_norm.register_forward_pre_hook(lambda m, a: seen.update(pooled=a[0]))
    model(pixel_values=clips_for(model))
    state = state_of(seen["seq"])
    assert state is not None and state.soft
    torch.testing.assert_close(seen["pooled"], size_weighted_mean(seen["seq"], state.sizes))
    assert (seen["pooled"] - seen["seq"].mean(1)).abs().max() > 1e-3  # not the plain mean
