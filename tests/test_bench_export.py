"""bench (measurement functions and command), torch.compile(fullgraph=True) and ONNX export.

Small random-weight models; torch.compile uses the "eager" backend, which still makes dynamo trace
the whole model in one graph (fullgraph=True fails on any graph break) without a C++ build.
"""
from __future__ import annotations

import json

import pytest
import torch
import typer
from model_zoo import images_for, timm_model
from typer.testing import CliRunner

from ltm_convert.api import convert
from ltm_convert.sources import load_model
from ltm_convert.tools.bench import benchmark, markdown_table, time_against_original
from ltm_convert.tools.export import export_onnx, verify_onnx

EXPORT_METHODS = ["ltm", "tome"]


@pytest.fixture(scope="module")
def base():
    return timm_model("dinov2-registers")


@pytest.fixture(scope="module")
def converted(base):
    return {m: convert(base, 0.6, method=m) for m in EXPORT_METHODS}


def test_benchmark_rows_and_table(base, converted):
    images = images_for(base, batch=2)
    result = benchmark(base, {f"{m}@0.6": c for m, c in converted.items()}, batches=[1, 2], repeats=2, warmup=1,
                       images=images)
    json.dumps(result)  # JSON-able
    assert result["batches"] == [1, 2] and result["dtype"] == "fp32"
    for row in result["models"]:
        assert abs(row["flops_ratio"] - 0.6) <= 0.02 * 0.6
        assert row["ideal_speedup"] == pytest.approx(1 / row["flops_ratio"])
        assert -1.0 <= row["cosine_min"] <= row["cosine_mean"] <= 1.0 + 1e-6
        for b in ("1", "2"):
            t = row["timing"][b]
            assert t["latency_ms"] > 0 and t["speedup"] > 0
    table = markdown_table(result)
    assert table.count("\n| ltm |") == 1 and table.count("\n| tome |") == 1


def test_timing_alternates_and_pairs():
    calls = []

    def runner(name, seconds):
        def run(x):
            calls.append(name)
            import time
            time.sleep(seconds)
        return run

    x = torch.zeros(1)
    t = time_against_original(runner("o", 0.02), {"a": runner("a", 0.01), "b": runner("b", 0.005)}, x,
                              repeats=3, warmup=0, group=1)
    assert calls[:4] == ["o", "a", "b", "o"]  # back-to-back pairs, order alternating
    assert t.speedup["a"] == pytest.approx(2.0, rel=0.5) and t.speedup["b"] > t.speedup["a"]
    assert len(t.samples["original"]) == 6


@pytest.mark.parametrize("method", EXPORT_METHODS)
def test_compile_fullgraph(converted, method):
    model = converted[method]
    x = images_for(model, batch=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.parametrize("method", EXPORT_METHODS)
def test_onnx_export_matches_pytorch(converted, method, tmp_path):
    model = converted[method]
    path = export_onnx(model, tmp_path / f"{method}.onnx", batch=2)
    check = verify_onnx(model, path, images_for(model, batch=3, seed=5))  # batch 3: the batch axis is dynamic
    assert check["ok"], check
    assert check["max_abs_diff"] < 1e-3


def _app():
    from ltm_convert.commands import bench as bench_cmd
    from ltm_convert.commands import export as export_cmd

    app = typer.Typer()
    bench_cmd.register(app)
    export_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from ltm_convert.io import save

    model = load_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, num_classes=7)
    path = tmp_path_factory.mktemp("saved") / "tome.pt"
    save(convert(model, 0.7, method="tome"), path)
    return path


def test_bench_command_json_on_saved_file(saved):
    result = CliRunner().invoke(_app(), ["bench", str(saved), "-b", "2", "--repeats", "1", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["name"] for row in data["models"]] == ["tome@0.7"]
    assert data["models"][0]["flops_ratio"] == pytest.approx(0.7, rel=0.02)
    assert data["original"]["flops"] > data["models"][0]["flops"]


def test_export_command(saved, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(_app(), ["export", str(saved), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert out.is_file() and info["verify"]["ok"] and info["method"] == "tome"
    bad = CliRunner().invoke(_app(), ["export", str(saved), "-o", str(tmp_path / "m.txt")])
    assert bad.exit_code != 0


@pytest.mark.parametrize("method", EXPORT_METHODS)
def test_onnx_batch_axis_stays_dynamic_on_a_tiny_grid(method, tmp_path):
    """A 4x4-patch ViT at 0.5: ToMe's exported row gathers once baked a batch-dependent shape in
    (exported at batch 2, onnxruntime failed at batch 3 in a Reshape)."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2).eval()
    model = convert(base, 0.5, method=method)
    path = export_onnx(model, tmp_path / "m.onnx", batch=2)
    for batch in (1, 3):
        check = verify_onnx(model, path, torch.randn(batch, 3, 32, 32))
        assert check["ok"] and check["max_abs_diff"] < 1e-3, check
