"""What `export` writes and `bench` compares for models whose output is not one tensor, and how an
exporter failure reaches the user (review 26, items 3, 4, 5 and 9).

Tiny random-weight models; the CLI items run the real command line in a subprocess.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from model_zoo import NAFLEX_TIMM, dense_model, images_for
from test_cli import assert_one_line_error, parse_json, run_cli

from ltm_convert.api import convert
from ltm_convert.io import save
from ltm_convert.metrics import agreement
from ltm_convert.model_inputs import main_output
from ltm_convert.tools.export import export_onnx, verify_onnx


def _features_only(depth: int = 3, out_indices=(1, 2)) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, img_size=64, features_only=True,
                             out_indices=list(out_indices)).eval()


def _run_onnx(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": x.numpy()})))


def _declared(path) -> dict[str, list]:
    """The output shapes an ONNX file declares (read with onnx itself)."""
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in onnx.load(str(path)).graph.output}


def test_output_names_and_the_compared_tensor():
    """One tensor stays `output`; feature maps (a list, or an HF BackboneOutput) are one name each;
    the compared tensor of several maps is the last one, and a tuple of 2-D outputs (logits,
    distillation logits) is not mistaken for maps."""
    from transformers.modeling_outputs import BackboneOutput, DepthEstimatorOutput

    from ltm_convert.model_inputs import main_output_name, output_tensors

    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)
    assert list(output_tensors(a)) == ["output"]
    for out in ([a, b], BackboneOutput(feature_maps=(a, b))):
        got = output_tensors(out)
        assert list(got) == ["output_0", "output_1"] and got["output_1"] is b
        assert main_output(out) is b and "the last of 2 feature maps" in main_output_name(out)
    depth = torch.randn(2, 16, 16)
    assert output_tensors(DepthEstimatorOutput(predicted_depth=depth)) == {"output": depth}
    logits = (torch.randn(2, 5), torch.randn(2, 5))
    assert main_output(logits) is logits[0] and list(output_tensors(logits)) == ["output"]


def test_features_only_cli_export_has_one_output_per_map(tmp_path):
    """Item 3: the ONNX file of a features_only ViT held only its first map, and the check said
    "onnxruntime matches PyTorch". Now every map is an output, and every one matches."""
    model = convert(_features_only(), 0.7).eval()
    save(model, tmp_path / "fo.pt")
    info = parse_json(run_cli("export", "fo.pt", "-o", "fo.onnx", "--json", cwd=tmp_path))
    assert info["verify"]["ok"] and list(info["verify"]["outputs"]) == ["output_0", "output_1"]
    assert info["outputs"] == {"output_0": ["batch", 192, 4, 4], "output_1": ["batch", 192, 4, 4]}
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got = _run_onnx(tmp_path / "fo.onnx", x)
    with torch.no_grad():
        maps = model(x)
    assert list(got) == ["output_0", "output_1"]
    for name, ref in zip(got, maps):
        np.testing.assert_allclose(got[name], ref.numpy(), atol=1e-3, rtol=1e-3)
    assert not np.allclose(got["output_0"], got["output_1"], atol=1e-3)  # two different maps
    text = run_cli("export", "fo.pt", "-o", "fo2.onnx", "--no-verify", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "2 outputs: output_0, output_1" in " ".join(text.stdout.split())


def test_verify_checks_every_output(tmp_path):
    """verify_onnx compared the first output only: a file whose second map is wrong passed."""
    model = convert(_features_only(), 0.7).eval()
    path = export_onnx(model, tmp_path / "fo.onnx")
    assert verify_onnx(model, path)["ok"]
    with torch.no_grad():  # the last block feeds only the second map (out_indices 1, 2)
        for p in model.model.blocks[2].parameters():
            p.add_(0.5)
    check = verify_onnx(model, path)
    assert check["outputs"]["output_0"]["ok"] and not check["outputs"]["output_1"]["ok"] and not check["ok"]


def test_features_only_bench_compares_the_last_map_and_says_so(tmp_path):
    """bench scored a features_only model on its first map only, without saying so: it now scores
    the last map (the deepest here), and names it."""
    from ltm_convert.api import unmerged_copy
    from ltm_convert.images import sample_photos

    model = convert(_features_only(), 0.7).eval()
    save(model, tmp_path / "fo.pt")
    data = parse_json(run_cli("bench", "fo.pt", "--device", "cpu", "-b", "1", "--repeats", "1", "--warmup", "0",
                              "--json", cwd=tmp_path))
    (row,) = data["models"]
    assert row["compared"] == "output[1] (the last of 2 feature maps)"
    photos = sample_photos((64, 64))
    with torch.no_grad():
        got, ref = model(photos), unmerged_copy(model)(photos)
    assert row["cosine_mean"] == pytest.approx(float(agreement(got[1], ref[1]).mean()), abs=1e-5)
    assert row["cosine_mean"] != pytest.approx(float(agreement(got[0], ref[0]).mean()), abs=1e-5)
    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}  # piped, as into a log
    text = run_cli("bench", "fo.pt", "--device", "cpu", "-b", "1", "--repeats", "1", "--warmup", "0", cwd=tmp_path,
                   env=env)
    assert text.returncode == 0, text.stderr
    assert "of output[1] (the last of 2 feature maps)" in text.stdout
    assert "…" not in text.stdout  # rich assumed 80 columns and cut the table's cells


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """Item 4's reproduction: a saved HF Dinov2Backbone directory converted by the CLI."""
    folder = tmp_path_factory.mktemp("backbone")
    dense_model("Dinov2Backbone").save_pretrained(folder / "dino")
    assert run_cli("convert", f"hf:{folder / 'dino'}", "-r", "0.7", "-o", "d.pt", cwd=folder).returncode == 0
    return folder / "d.pt"


def test_hf_backbone_cli_export_writes_every_feature_map(backbone_file, tmp_path):
    """Item 4: `export` of an HF *Backbone failed ("cannot find a tensor in the model output of type
    BackboneOutput"); its feature maps are now the outputs, each checked."""
    from ltm_convert.io import load

    info = parse_json(run_cli("export", str(backbone_file), "-o", "d.onnx", "--json", cwd=tmp_path))
    assert info["verify"]["ok"] and info["outputs"] == {"output_0": ["batch", 64, 8, 8], "output_1": ["batch", 64, 8, 8]}
    model = load(backbone_file).eval()
    x = images_for(model, batch=1, seed=7)  # the export ran at batch 2: the batch axis is dynamic
    got = _run_onnx(tmp_path / "d.onnx", x)
    with torch.no_grad():
        maps = model(pixel_values=x).feature_maps
    for name, ref in zip(["output_0", "output_1"], maps):
        np.testing.assert_allclose(got[name], ref.numpy(), atol=1e-3, rtol=1e-3)


def test_hf_backbone_cli_bench_scores_the_feature_maps(backbone_file, tmp_path):
    """Item 4: `bench` of an HF *Backbone failed the same way; it scores the last feature map."""
    data = parse_json(run_cli("bench", str(backbone_file), "--device", "cpu", "-b", "1", "--repeats", "1",
                              "--warmup", "0", "--json", cwd=tmp_path))
    (row,) = data["models"]
    assert row["compared"] == "feature_maps[1] (the last of 2 feature maps)"
    assert 0.0 < row["cosine_min"] <= row["cosine_mean"] < 1.0


@pytest.mark.parametrize("kind,shape", [("DPTForDepthEstimation", [128, 128]), ("VitPoseForPoseEstimation", [2, 32, 24])])
def test_dense_heads_declare_their_true_output_shape(kind, shape, tmp_path):
    """Item 9: the exported DPT declared its output [batch, batch, W] (a spatial axis named after the
    batch axis); only the batch axis is dynamic now, and the file runs at other batches. DPT's depth
    map and ViTPose's heatmaps stay the single output `output`."""
    model = convert(dense_model(kind), 0.7).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        ref = main_output(model(pixel_values=images_for(model, batch=1)))
    assert list(ref.shape[1:]) == shape
    assert _declared(path) == {"output": ["batch", *shape]}
    for batch in (1, 3):
        check = verify_onnx(model, path, images_for(model, batch=batch, seed=batch))
        assert check["ok"] and check["outputs"]["output"]["shape"] == [batch, *shape], check
    static = export_onnx(model, tmp_path / "s.onnx", dynamic_batch=False)
    assert _declared(static) == {"output": [2, *shape]}


@pytest.fixture(scope="module")
def naflex_file(tmp_path_factory):
    from ltm_convert.sources import load_model

    folder = tmp_path_factory.mktemp("naflex")
    name, kwargs = NAFLEX_TIMM["gap"]
    torch.manual_seed(0)
    model = load_model(name, pretrained=False, **kwargs).eval()
    save(convert(model, 0.6, input_size=(64, 64)), folder / "nf.pt")
    return folder / "nf.pt"


@pytest.mark.parametrize("json_mode", [False, True])
def test_exporter_failure_is_one_error_line(naflex_file, tmp_path, json_mode):
    """Item 5: torch cannot export NaFlex's antialiased bicubic resize (aten::_upsample_bicubic2d_aa,
    unconverted too); `export` printed the 700-line Torch IR graph on stdout and exited 1. Now: one
    `error:` line naming the operator and saying the model cannot be exported (exit 2), stdout holds
    only the status lines (with --json only the error document), and no file is left behind."""
    proc = run_cli("export", str(naflex_file), "-o", "nf.onnx", *(["--json"] if json_mode else []), cwd=tmp_path)
    line = assert_one_line_error(proc, code=2)
    assert "aten::_upsample_bicubic2d_aa" in line and "cannot be exported to ONNX" in line, line
    assert "fails the same way with merging switched off" in line, line
    assert "graph(" not in proc.stdout and "Torch IR" not in proc.stdout
    if json_mode:
        assert json.loads(proc.stdout) == {"error": line[len("error: "):]}
    else:
        assert [s.split()[0] for s in proc.stdout.splitlines()] == ["loading", "exporting"], proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_exporter_failure_in_python_leaves_torch_quiet(naflex_file, tmp_path, capfd):
    """The library call raises the same LtmError, holds back what the exporter prints (kept in the
    error's notes for a traceback), and turns torch's ONNX log back off (its exporter leaves it on,
    so each later export would print its own dumps)."""
    from ltm_convert.errors import LtmError
    from ltm_convert.io import load

    with pytest.raises(LtmError, match="_upsample_bicubic2d_aa") as caught:
        export_onnx(load(naflex_file), tmp_path / "nf.onnx")
    assert "Torch IR graph" in "".join(getattr(caught.value.__cause__, "__notes__", []))
    out, _ = capfd.readouterr()
    assert out == "" and not torch._C._jit_is_onnx_log_enabled()
    assert not list(tmp_path.iterdir())


def test_cli_static_batch_of_one(tmp_path):
    """`--static-batch` fixed the file's batch at 2 with no way to choose it; `--batch 1` gives a
    batch-1 file (what a latency deployment wants), verified at that batch."""
    model = convert(_features_only(), 0.7).eval()
    save(model, tmp_path / "fo.pt")
    info = parse_json(run_cli("export", "fo.pt", "-o", "one.onnx", "--static-batch", "--batch", "1", "--json", cwd=tmp_path))
    assert info["verify"]["ok"] and info["verify"]["batch"] == 1 and info["dynamic_batch"] is False
    assert info["outputs"]["output_0"][0] == 1
    assert [d.dim_value for d in onnx.load(str(tmp_path / "one.onnx")).graph.input[0].type.tensor_type.shape.dim][0] == 1
