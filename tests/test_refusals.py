"""Refusals are fast and right: one line that gives every family's reason, no advice that does not
apply to the model (issue 23, item 7)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from ltm_convert.api import convert
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.rewriters import families

REPO = Path(__file__).resolve().parents[1]


def _refusal(model: torch.nn.Module) -> str:
    with pytest.raises(UnsupportedModelError) as err:
        convert(model, 0.7)
    message = str(err.value)
    assert "\n" not in message and message.startswith("not supported yet: "), message
    return message


def test_every_family_gives_its_reason_in_one_line():
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, depth=2, img_size=64, num_classes=4).eval()
    message = _refusal(model)
    assert message.startswith("not supported yet: no model family converts ConVit (")
    for family in families():
        assert f"{family.name}: " in message, family.name
    assert "2-D grids and" not in message  # ConViT's blocks run on token sequences


def test_cait_pooled_by_average_is_told_its_own_reason():
    """CaiT was told it "runs its blocks on 2-D grids" and, with one class-attention block, to set
    HF's reshape_hidden_states: neither applies to a timm token model."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=2, num_classes=4, img_size=64,
                              patch_size=8, global_pool="avg").eval()
    message = _refusal(model)
    assert "class-attention: " in message and "global_pool='token'" in message
    assert "2-D grids" not in message and "reshape_hidden_states" not in message


def test_pooling_hint_speaks_the_models_own_options():
    """timm models are told global_pool='token', HF models their config's use_mean_pooling (asked of
    the hint itself: the relative-bias family now converts the mean-pooled HF BEiT this was found on)."""
    import timm
    import transformers

    from ltm_convert.rewriters.heads import _class_token_hint

    hf = transformers.BeitModel(transformers.BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, image_size=32, patch_size=16))
    hint = _class_token_hint(hf)
    assert "use_mean_pooling=False" in hint and "global_pool" not in hint
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, global_pool="avg")
    hint = _class_token_hint(vit)
    assert "global_pool='token'" in hint and "use_mean_pooling" not in hint


def test_vit_b_sized_refusal_is_fast_and_runs_no_forward(monkeypatch):
    """A ViT-B-sized model no family converts is refused after one trace: no eager forward, no
    build, and well under 5 s of CPU time on 2 threads (CPU time, so that other processes on a
    shared machine do not count)."""
    import ltm_convert.tracer as tracer

    def no_forward(*args, **kwargs):
        raise AssertionError("a refusal ran an eager forward")

    torch.manual_seed(0)
    model = timm.create_model("convit_base", pretrained=False).eval()  # 86M parameters, 224 px
    monkeypatch.setattr(tracer, "module_calls", no_forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        start = time.process_time()
        message = _refusal(model)
        spent = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert "sequence: " in message and "ffn-grid: " in message
    assert spent < 5.0, f"refusal took {spent:.1f} s of CPU"


def test_cli_refusal_is_one_line_with_every_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ltm_convert.cli", "convert", "convit_tiny", "--no-pretrained", "--dry-run",
         "--model-kwargs", "depth=2", "--model-kwargs", "img_size=64"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not supported yet: no model family converts ConVit")
    assert "sequence: " in lines[0] and "ffn-grid: " in lines[0] and "Traceback" not in proc.stdout
