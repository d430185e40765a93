"""benchmarks/distill_rope.py: the DINOv2 -> RoPE Eva weight mapping is complete, the smoke run
(``--tiny``: random 2-block teacher, generated photos) trains only on bench_quality's training
split, stops at its CPU budget, and its cache round-trips (second run loads, other settings
recompute, a foreign file is refused in one line). No real photos or weights needed."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltm_convert.errors import LtmError
from photo_folder import write_gradient_photos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distill_rope.py"
# The Eva's tensors that DINOv2 does not have: computed, non-persistent buffers (never learned).
EVA_ONLY = {"rope.periods", *(f"blocks.{i}.attn.k_bias" for i in range(2))}
TINY = ["--tiny", "--held-out", "4", "--batch", "2", "--log-every", "1", "--eval-batch", "4"]


def _script():
    spec = importlib.util.spec_from_file_location("distill_rope", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dr():
    return _script()


def _random_teacher(dr):
    """The tiny DINOv2-shaped teacher with every tensor random (layer scale, key bias, cls token
    included), so a weight left behind or misplaced shows up in the outputs."""
    teacher = dr.tiny_teacher(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return teacher


def test_every_dinov2_weight_lands_and_no_eva_weight_stays_random(dr):
    teacher = _random_teacher(dr)
    student, where = dr.init_from_teacher(teacher, dr.student_settings(teacher))
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(where) == set(t_sd)  # every DINOv2 tensor has a recorded destination
    dropped = {k: v for k, v in where.items() if v.startswith("dropped")}
    assert set(dropped) == {"pos_embed"}  # the rope replaces the table; nothing else is dropped
    # every persistent Eva tensor came from DINOv2, value for value
    filled = {k for k, v in where.items() if not v.startswith("dropped")}
    for key in filled:
        if key.endswith("qkv.bias"):
            q, _k, v = t_sd[key].chunk(3)
            pre = key[: -len("qkv.bias")]
            assert torch.equal(s_sd[pre + "q_bias"], q) and torch.equal(s_sd[pre + "v_bias"], v)
        else:
            assert torch.equal(s_sd[where[key]], t_sd[key]), key
    targets = {where[k] for k in filled if not k.endswith("qkv.bias")}
    targets |= {k[: -len("qkv.bias")] + n for k in filled if k.endswith("qkv.bias") for n in ("q_bias", "v_bias")}
    assert targets == set(s_sd)
    # the only tensors outside the state dict are the named, computed buffers
    assert {n for n, _ in student.named_buffers()} - set(s_sd) == EVA_ONLY
    assert all(torch.count_nonzero(student.get_buffer(f"blocks.{i}.attn.k_bias")) == 0 for i in range(2))


def test_no_rope_twin_reproduces_the_teacher(dr):
    """With the absolute table instead of the rope, the mapped Eva *is* DINOv2: the dropped key
    bias only shifts each query's logits by a constant, which the softmax ignores."""
    teacher = _random_teacher(dr)
    settings = dr.student_settings(teacher, abs_pos=True)
    settings["kwargs"]["use_rot_pos_emb"] = False
    twin, where = dr.init_from_teacher(teacher, settings)
    assert where["pos_embed"] == "pos_embed"
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want, got = teacher.forward_features(x), twin.forward_features(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    with torch.no_grad():  # and the rope model is a different function (it does use the rope)
        rope_model, _ = dr.init_from_teacher(teacher, dr.student_settings(teacher))
        assert not torch.allclose(rope_model.forward_features(x), want, atol=1e-2)


def test_refuses_a_teacher_it_cannot_map(dr):
    import timm

    reg = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=1, img_size=56)
    with pytest.raises(LtmError, match="no registers"):
        dr.student_settings(reg)


def test_distill_stops_at_the_cpu_budget(dr, monkeypatch):
    teacher = dr.tiny_teacher(0)
    student, _ = dr.init_from_teacher(teacher, dr.student_settings(teacher))
    from PIL import Image

    images = [Image.new("RGB", (70, 60), (i * 40, 90, 200 - i * 30)) for i in range(4)]
    cfg = {"budget_cpu_s": 0.5, "max_steps": None, "batch": 2, "lr": 1e-4, "weight_decay": 0.0, "seed": 0,
           "img_size": 56, "log_every": 1}
    hist = dr.distill(student, teacher, images, cfg, on_log=lambda m: None)  # the real clock
    assert hist["steps"] >= 1 and 0.5 <= hist["train_cpu_s"] < 0.5 + 10  # stopped after the step that crossed it
    assert not student.training

    # a fake CPU clock: each step costs 1 s (charged when it is logged), each checkpoint 10 s
    clock = [0.0]
    monkeypatch.setattr(dr, "cpu_seconds", lambda: clock[0])
    modes = []

    def tick(_msg: str) -> None:
        clock[0] += 1.0

    def checkpoint(progress: dict) -> dict:
        modes.append(student.training)
        clock[0] += 10.0
        return {"seen_step": progress["step"]}

    hist = dr.distill(student, teacher, images, {**cfg, "budget_cpu_s": 3.5, "checkpoints_s": [1.5, 0.5]},
                      on_log=tick, checkpoint=checkpoint)
    # checkpoints (20 s) are not charged to the 3.5 s budget: 4 steps ran, each checkpoint once
    assert hist["steps"] == 4 and hist["train_cpu_s"] == 4.0 and hist["checkpoint_cpu_s"] == 20.0
    assert [c["seen_step"] for c in hist["checkpoints"]] == [1, 2] and [c["cpu_s"] for c in hist["checkpoints"]] == [1.0, 2.0]
    assert modes == [False, False] and not student.training  # measured in eval mode, returned in eval mode


def test_tiny_run_trains_on_the_training_split_only(dr, tmp_path, monkeypatch):
    photos = write_gradient_photos(tmp_path / "photos", 10)
    held, train = dr.bq.split_names(dr.bq.list_images(photos), 4, 0)
    decoded = []
    real_decode = dr.decode
    monkeypatch.setattr(dr, "decode", lambda folder, names, side: decoded.extend(names) or real_decode(folder, names, side))
    saved = []
    real_save = dr.save_weights
    monkeypatch.setattr(dr, "save_weights", lambda f, m, b: saved.append((f.name, b.get("progress"))) or real_save(f, m, b))
    args = [*TINY, "--images", str(photos), "--out", str(tmp_path / "out"), "--max-steps", "2", "--checkpoints-min", "1e-9", "1e-4"]
    assert dr.main(args) == 0
    assert sorted(decoded) == sorted(train) and not set(decoded) & set(held)
    rec = json.loads((tmp_path / "out" / dr.RECORD_FILE).read_text())
    assert rec["steps"] == 2 and rec["before"]["photos"] == rec["after"]["photos"] == 4
    # checkpoints measured the held-out photos and saved partial weights, gone once the run finished
    assert [c["photos"] for c in rec["checkpoints"]] == [4, 4]
    assert [n for n, _ in saved] == [dr.PARTIAL_FILE, dr.PARTIAL_FILE, dr.WEIGHTS_FILE] and saved[1][1]["step"] == 1
    assert not (tmp_path / "out" / dr.PARTIAL_FILE).exists()
    assert rec["settings"]["split"]["held_out_sha256"] == dr.bq.list_hash(held)


def test_cache_round_trips_through_the_cli(dr, tmp_path, capsys):
    photos = write_gradient_photos(tmp_path / "photos", 10)
    out = tmp_path / "cache"
    args = [*TINY, "--images", str(photos), "--out", str(out), "--max-steps", "2"]
    assert dr.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cached"] is False and set(res["after"]) >= {"cls_cos_mean", "patch_cos_mean", "nn_top1_agreement"}
    weights = (out / dr.WEIGHTS_FILE).read_bytes()
    second = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["cached"] is True and again["after"] == res["after"]
    assert (out / dr.WEIGHTS_FILE).read_bytes() == weights  # loaded, not retrained
    # the loader rebuilds the model from the file alone (folder or file path)
    model = dr.load_rope_substitute(out)
    assert type(model).__name__ == "Eva" and not model.training and model.rope is not None and model.pos_embed is None
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), dr.load_rope_substitute(out / dr.WEIGHTS_FILE).forward_features(x))
    # bench_quality measures merged copies of it against it (issue 23's position variants)
    bench = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_quality.py"), "--images", str(photos),
                            "--allow-small", "--held-out", "4", "--rope-substitute", str(out), "--methods", "ltm",
                            "ltm:rows", "--reference", "ltm", "--ratios", "0.8", "--no-fmnist"],
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "ltm:rows@0.8 vs ltm: mean" in bench.stderr and "| ltm:rows | 0.8 |" in bench.stdout
    # other settings are another result: recomputed, not served from the cache
    assert dr.main([*args, "--lr", "3e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is False
    assert (out / dr.WEIGHTS_FILE).read_bytes() != weights


def test_loader_refuses_foreign_files(dr, tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(LtmError, match="not a distill_rope.py result"):
        dr.load_rope_substitute(foreign)
    with pytest.raises(LtmError, match="does not exist; run benchmarks/distill_rope.py"):
        dr.load_rope_substitute(tmp_path / "nothing")
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--images", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
