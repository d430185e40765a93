"""The one-line-error contract, everywhere: each probe exits 2 with exactly one ``error: ...`` line
(``--json`` adds ``{"error": ...}`` on stdout, ``LTM_DEBUG=1`` adds the traceback and keeps exit 2),
and inputs that were silently accepted in 0.1.0 are refused or honoured."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from test_cli import TINY, _env, assert_one_line_error, run_cli

from ltm_convert.api import convert
from ltm_convert.errors import LtmError

CONVERT = ["convert", TINY, "--no-pretrained", "--dry-run", "-s", "64"]


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory) -> Path:
    from ltm_convert.io import save
    from ltm_convert.sources import load_model

    torch.manual_seed(0)
    model = load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2, num_classes=3)
    return save(convert(model, 0.6), tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.mark.parametrize("args, needle", [
    (["convert", TINY, "--no-pretrained", "--dry-run", "--input-size", "7"], "input-size"),
    (["convert", TINY, "--no-pretrained", "--dry-run", "--input-size", "100000"], "input-size"),
    (CONVERT + ["--exclude", "no.such.block"], "blocks.0"),
    (["export", TINY, "--no-pretrained", "-s", "64", "--opset", "99", "-o", "m.onnx"], "opset"),
    (["bench", TINY, "--no-pretrained", "-s", "64", "--device", "cuda"], "cuda"),
    (["bench", TINY, "--no-pretrained", "-s", "64", "--device", "foo"], "device"),
], ids=["input-size-7", "input-size-huge", "exclude-nothing", "opset-99", "bench-cuda", "bench-foo"])
def test_bad_inputs_are_one_line(tmp_path, args, needle):
    line = assert_one_line_error(run_cli(*args, cwd=tmp_path))
    assert needle in line


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "nan"], "epochs"),
    (["--epochs", "inf"], "epochs"),
    (["--mask-lr", "nan"], "mask-lr"),
    (["--lr", "inf"], "--lr"),
    (["--device", "cuda"], "cuda"),
    (["--device", "foo"], "device"),
    (["--workers", "-1"], "workers"),
    (["--max-steps", "0"], "max-steps"),
    (["--max-steps", "-2"], "max-steps"),
    (["--val-fraction", "-1"], "val-fraction"),
    (["--train-samples", "-3"], "train-samples"),
], ids=["epochs-nan", "epochs-inf", "mask-lr-nan", "lr-inf", "device-cuda", "device-foo", "workers", "max-steps-0",
        "max-steps-neg", "val-fraction", "train-samples"])
def test_finetune_flags_are_checked_up_front(tmp_path, tiny_saved, extra, needle):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli("finetune", str(tiny_saved), "--data", str(_image_folder(tmp_path)), "-o", "t.pt", *extra,
                   cwd=tmp_path)
    assert needle in assert_one_line_error(proc)
    assert not (tmp_path / "t.pt").exists()


def _image_folder(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (40, 30), (40 * i, 90, 30)).save(root / c / f"{i}.png")
    return root


def test_json_and_debug_modes_keep_the_contract(tmp_path):
    proc = run_cli(*CONVERT, "--input-size", "7", "--json", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert json.loads(proc.stdout) == {"error": line[len("error: "):]}
    debug = run_cli("inspect", str(tmp_path / "missing.pt"), cwd=tmp_path, env=_env(LTM_DEBUG="1"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.rstrip().splitlines()[-1].startswith("error:")


def _huge_png(path: Path, width: int, height: int) -> None:
    """A tiny file whose header says width x height (decoders allocate from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_visualize_refuses_a_400_megapixel_image(tmp_path, tiny_saved):
    _huge_png(tmp_path / "big.png", 20000, 20000)
    line = assert_one_line_error(run_cli("visualize", str(tiny_saved), "big.png", "-o", "v.png", cwd=tmp_path))
    assert "Mpx" in line


def test_hf_directory_with_a_pickled_bin_is_refused_without_bad_advice(tmp_path):
    import os

    from transformers import ViTConfig, ViTModel

    d = tmp_path / "hf"
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8))
    model.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    state = dict(model.state_dict())

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    state["evil"] = Payload()
    torch.save(state, d / "pytorch_model.bin")
    line = assert_one_line_error(run_cli("convert", f"hf:{d}", "--dry-run", cwd=tmp_path))
    assert "pickled" in line and "weights_only=False" not in line
    assert not (tmp_path / "pwned").exists()


def test_resume_with_another_train_mode_is_one_line(tmp_path, tiny_saved):
    data = str(_image_folder(tmp_path))
    common = ["finetune", str(tiny_saved), "--data", data, "-o", "t.pt", "-b", "4", "--no-progress", "--max-steps", "2"]
    run = run_cli(*common, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    line = assert_one_line_error(run_cli(*common, "--resume", "--train", "all", cwd=tmp_path))
    assert "--train" in line
    # the run's work directory (t.pt.run) is resumed from, never refused as "not ours"
    more = run_cli(*common[:-1], "3", "--resume", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    again = run_cli(*common, cwd=tmp_path)  # the same command again starts over in the same folder
    assert again.returncode == 0, again.stderr[-2000:]


def test_api_refusals_and_honoured_inputs():
    from ltm_convert.sources import load_model

    model = load_model(TINY, pretrained=False, depth=4, img_size=96, embed_dim=64, num_heads=2)
    with pytest.raises(LtmError, match="ratio"):
        convert(model, ratio=True)
    with pytest.raises(LtmError, match="topk"):
        convert(model, 0.7, topk=2.5)
    with pytest.raises(LtmError, match="matches no block"):
        convert(model, 0.7, exclude=["nope"])
    one = convert(model, 0.8, exclude="blocks.0")  # a plain string is one name
    assert [n for n, _ in one.ltm_plan.skipped] == ["blocks.0"]
    with torch.device("meta"):
        empty = load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2)
    with pytest.raises(LtmError, match="meta device"):
        convert(empty, 0.7)
    from ltm_convert.config import LtmConfig

    config = LtmConfig(ratio=0.7)
    with pytest.raises(LtmError, match="disagrees"):
        convert(model, 0.5, config=config)
    convert(model, config=config)
    assert config.keep == {} and config.input_size is None  # the caller's config is never changed


def test_fp16_and_bf16_models_convert_and_come_back_in_their_dtype():
    from ltm_convert.sources import load_model

    for dtype in (torch.float16, torch.bfloat16):
        model = load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2).to(dtype)
        converted = convert(model, 0.6)
        assert {p.dtype for p in converted.parameters() if p.is_floating_point()} == {dtype}
        with torch.no_grad():
            assert converted(torch.randn(2, 3, 64, 64, dtype=dtype)).dtype == dtype


def test_two_threads_converting_at_once():
    import threading

    from ltm_convert.sources import load_model

    model = load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        try:
            convert(model, 0.6)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_describe_of_half_precision_models():
    """describe() counts FLOPs on a float32 meta copy: model.half() / .to(bfloat16) of a converted
    model describes exactly as the float32 model does (it raised a dtype error)."""
    import copy

    from ltm_convert.api import describe
    from ltm_convert.sources import load_model

    model = convert(load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2), 0.6)
    reference = describe(model)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        half = cast(copy.deepcopy(model))
        half.ltm_base_flops = None  # counted again, on the half model
        info = describe(half)
        for key in ("flops_original", "flops_converted", "flops_ratio", "blocks", "params_added"):
            assert info[key] == reference[key], key
        assert next(half.parameters()).dtype in (torch.float16, torch.bfloat16)  # the model itself is untouched


def test_torch_jit_script_is_refused_in_one_line_and_trace_works(tmp_path):
    """TorchScript cannot compile the merge modules: torch.jit.script of a converted model (or of one
    of its merging blocks, or of a loaded one) raises one LtmError naming what works instead."""
    import warnings

    from ltm_convert.io import load, save
    from ltm_convert.sources import load_model

    model = convert(load_model(TINY, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2), 0.6).eval()
    loaded = load(save(model, tmp_path / "m.pt")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "torch.jit.script is deprecated"
        for target in (model, model.blocks[0], model.blocks, loaded):
            with pytest.raises(LtmError) as e:
                torch.jit.script(target)
            text = str(e.value)
            assert "\n" not in text and "torch.jit.trace" in text and "torch.export" in text
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
            torch.testing.assert_close(traced(x), model(x))


def test_calibration_images_in_class_folders_are_used(tmp_path):
    """An ImageFolder-style --calibration-images (class subfolders, as for finetune --data) is read
    class by class instead of being reported as holding no images."""
    folder = _image_folder(tmp_path)
    proc = run_cli("convert", TINY, "--no-pretrained", "--model-kwargs", "depth=2", "-s", "64", "--dry-run", "--json",
                   "--schedule", "calibrated", "--calibration-images", str(folder), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["schedule"] == "calibrated"
    from ltm_convert.calibrate import calibration_batch
    from ltm_convert.images import folder_photos

    files = folder_photos(folder)
    assert [f.parent.name for f in files[:4]] == ["a", "b", "a", "b"] and len(files) == 8
    # the Python API reads the same folder (convert(..., calibration_images=folder))
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1)
    assert calibration_batch(model, folder, (64, 64)).shape[0] == 8


def test_convert_of_a_converted_models_save_pretrained_directory_is_refused(tmp_path):
    """`convert hf:DIR` on the save_pretrained folder of a converted model silently dropped its trained
    ltm_* weights and converted again; it is a saved model like any other (inspect reads it)."""
    from model_zoo import hf_model

    model = convert(hf_model("Dinov2Model"), 0.6)
    model.save_pretrained(tmp_path / "m")
    line = assert_one_line_error(run_cli("convert", f"hf:{tmp_path / 'm'}", "--dry-run", cwd=tmp_path))
    assert "already a converted model" in line
    shown = run_cli("inspect", f"hf:{tmp_path / 'm'}", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]


def test_an_hf_image_size_the_model_cannot_run_at_is_one_clear_line():
    """ViTPose sizes its position table for its config's 64x48: --input-size 64 failed as "torch.export
    could not trace ..." (video models already said what to do); now every HF model says it."""
    from model_zoo import dense_model

    with pytest.raises(LtmError) as err:
        convert(dense_model("VitPoseForPoseEstimation"), 0.7, input_size=64)
    message = str(err.value)
    assert "\n" not in message and "takes images of 64x48 pixels" in message and "cannot run at 64x64" in message
    assert "leave out --input-size" in message


def test_convert_onto_an_existing_file_of_another_kind_is_refused_before_converting(tmp_path):
    """`-o notes.py` (an existing file, not .pt, so it would be saved as a directory) was refused only
    after the whole conversion; now before the model is loaded, and the file is untouched."""
    target = tmp_path / "notes.py"
    target.write_text("keep me\n")
    proc = run_cli("convert", TINY, "--no-pretrained", "-s", "64", "-o", str(target), cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert "exists and is not a directory" in line and "converting" not in proc.stdout + proc.stderr
    assert target.read_text() == "keep me\n"
