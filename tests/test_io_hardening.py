"""Issue 22 on saved files: nothing silently wrong, nothing of the user's destroyed or leaked.

Every test writes real files: a tampered schedule or ratio is refused (not loaded as another
model), half-precision models come back bit-exact in their dtype, ``-o`` never replaces a folder
or file ltm_convert did not write, recipes carry no local paths, killed saves leave nothing
behind for long, and every HF class the README names survives ``save_pretrained`` -> ``load``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import HF_FAMILIES, hf_model, images_for
from safetensors.torch import load_file, save_file
from test_cli import TINY, _env, assert_one_line_error, run_cli

from ltm_convert.api import convert, describe
from ltm_convert.errors import LtmError
from ltm_convert.io import load, save
from ltm_convert.model_inputs import main_output, run_model
from ltm_convert.sources import load_model


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(TINY, pretrained=False, depth=3, img_size=64, embed_dim=64, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def converted() -> torch.nn.Module:
    return convert(_tiny(), 0.6)


@pytest.fixture(scope="module")
def saved_dir(converted, tmp_path_factory) -> Path:
    return save(converted, tmp_path_factory.mktemp("saved") / "model")


def _copy(saved_dir: Path, tmp_path: Path, *, config=None, weights=None) -> Path:
    """A copy of the saved directory with its recipe's config and/or its tensors edited."""
    target = tmp_path / "model"
    shutil.copytree(saved_dir, target)
    if config is not None:
        recipe = json.loads((target / "ltm_config.json").read_text())
        config(recipe["config"])
        (target / "ltm_config.json").write_text(json.dumps(recipe))
    if weights is not None:
        state = load_file(str(target / "model.safetensors"))
        weights(state)
        save_file(state, str(target / "model.safetensors"))
    return target


def _schedule_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(".ltm_schedule")]


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(LtmError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


# ------------------------------------------------------------------------------ item 2: the schedule


@pytest.fixture(scope="module")
def other(converted) -> torch.nn.Module:
    """The same model at another schedule (what an attacker would swap in)."""
    model = convert(_tiny(), 0.8)
    assert model.ltm_config.keep != converted.ltm_config.keep
    return model


@pytest.fixture(scope="module")
def other_keep(other) -> dict[str, int]:
    return dict(other.ltm_config.keep)


def test_deleted_schedule_buffers_and_a_changed_keep_are_refused(saved_dir, tmp_path, other_keep):
    def drop(state):
        for key in _schedule_keys(state):
            del state[key]

    target = _copy(saved_dir, tmp_path, config=lambda c: c.update(keep=other_keep), weights=drop)
    _refused(target, "schedule buffer", "tampered")
    line = assert_one_line_error(run_cli("inspect", str(target), cwd=tmp_path))
    assert "tampered" in line


def test_one_deleted_schedule_buffer_is_refused(saved_dir, tmp_path):
    target = _copy(saved_dir, tmp_path, weights=lambda state: state.pop(_schedule_keys(state)[0]))
    _refused(target, "schedule buffer", "tampered")


def test_a_changed_keep_with_matching_buffers_is_refused_by_its_flops(saved_dir, tmp_path, other, other_keep):
    """The attacker rewrites the buffers too: the schedule no longer reaches the recipe's ratio."""
    def match(state):
        theirs = other.state_dict()
        for key in _schedule_keys(state):
            state[key] = theirs[key].clone()

    target = _copy(saved_dir, tmp_path, config=lambda c: c.update(keep=other_keep), weights=match)
    _refused(target, "claims FLOPs ratio 0.6", "tampered")


def test_a_float_schedule_buffer_is_refused_not_truncated(saved_dir, tmp_path):
    def to_float(state):
        for key in _schedule_keys(state):
            state[key] = state[key].float() + 0.7  # truncates back to the same counts

    _refused(_copy(saved_dir, tmp_path, weights=to_float), "ltm_schedule", "torch.float32", "tampered")


def test_a_schedule_buffer_that_disagrees_with_the_recipe_is_refused(saved_dir, tmp_path):
    def bump(state):
        key = _schedule_keys(state)[0]
        state[key] = state[key] + torch.tensor([0, 1])

    _refused(_copy(saved_dir, tmp_path, weights=bump), "disagrees", "tampered")


@pytest.mark.parametrize("ratio", [0.3, 0.85])
def test_a_tampered_ratio_is_refused_not_shown_as_the_target(saved_dir, tmp_path, ratio):
    target = _copy(saved_dir, tmp_path, config=lambda c: c.update(ratio=ratio))
    _refused(target, f"claims FLOPs ratio {ratio:g}", "tampered")
    assert "tampered" in assert_one_line_error(run_cli("inspect", str(target), "--json", cwd=tmp_path))


def test_an_untampered_file_keeps_its_ratio_and_flops(saved_dir, converted):
    loaded, ours = describe(load(saved_dir)), describe(converted)
    assert (loaded["ratio"], loaded["flops_original"], loaded["flops_converted"]) == \
        (ours["ratio"], ours["flops_original"], ours["flops_converted"])


# ------------------------------------------------------------------------------ item 3: dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["m.pt", "d"])
def test_half_precision_models_load_bit_exact_in_their_dtype(tmp_path, dtype, name):
    model = convert(_tiny(), 0.6).to(dtype)
    x = images_for(model).to(dtype)
    loaded = load(save(model, tmp_path / name))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_half_precision_hf_save_pretrained_loads_bit_exact(tmp_path):
    model = convert(hf_model("ViTForImageClassification"), 0.6).half()
    model.save_pretrained(tmp_path / "hf")
    loaded = load(tmp_path / "hf")
    x = images_for(model).half()
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


# ------------------------------------------------------------------------------ item 4: -o never destroys


def _hf_folder(path: Path) -> dict[str, bytes]:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(path)
    (path / "README.md").write_text("# my model\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_convert_onto_an_hf_model_folder_is_refused_and_keeps_it(tmp_path):
    before = _hf_folder(tmp_path / "mine")
    proc = run_cli("convert", TINY, "--no-pretrained", "-s", "64", "-o", "mine", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert "never replaced" in line and "converting" not in proc.stdout, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before


@pytest.mark.parametrize("files", [
    {"config.json": "{}"},
    {"model.safetensors": "x"},
    {"README.md": "notes"},
    {"ltm_config.json": '{"not": "ours"}', "model.safetensors": "x"},
    {"ltm_config.json": "not json"},
], ids=["config.json", "weights", "readme", "foreign-ltm-config", "broken-ltm-config"])
def test_save_never_replaces_a_folder_it_did_not_write(converted, tmp_path, files):
    target = tmp_path / "out"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    with pytest.raises(LtmError, match="never replaced"):
        save(converted, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == files


def test_save_pretrained_output_of_a_converted_model_is_not_replaced(tmp_path):
    model = convert(hf_model("ViTModel"), 0.6)
    model.save_pretrained(tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    with pytest.raises(LtmError, match="never replaced"):
        save(model, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_a_foreign_pt_file_is_never_replaced_but_our_own_is(converted, tmp_path):
    theirs = tmp_path / "checkpoint.pt"
    torch.save({"weight": torch.ones(3)}, theirs)
    before = theirs.read_bytes()
    with pytest.raises(LtmError, match="never replaced"):
        save(converted, theirs)
    assert theirs.read_bytes() == before
    ours = save(converted, tmp_path / "m.pt")
    save(converted, ours)  # our own output: replaced
    save(converted, save(converted, tmp_path / "d"))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["ltm_config.json", "model.safetensors"]


# ------------------------------------------------------------------------------ item 8: no leaks, no litter


def test_checkpoint_path_is_not_recorded_and_not_needed(tmp_path):
    import timm

    torch.manual_seed(0)
    base = timm.create_model(TINY, pretrained=False, depth=2, num_classes=5)
    ckpt = tmp_path / "private" / "mine.pth"
    ckpt.parent.mkdir()
    torch.save(base.state_dict(), ckpt)
    proc = run_cli("convert", TINY, "--checkpoint", str(ckpt), "--num-classes", "5", "--model-kwargs", "depth=2",
                   "-s", "64", "-o", "out.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    raw = torch.load(tmp_path / "out.pt", weights_only=True)["ltm_recipe"]
    assert str(tmp_path) not in raw and "private" not in raw
    assert json.loads(raw)["source"]["checkpoint"] == "mine.pth"
    shutil.rmtree(ckpt.parent)
    loaded = load(tmp_path / "out.pt")
    assert loaded.ltm_source.checkpoint == "mine.pth"


KILLED_SAVE = """
import os, signal, sys
import torch
import safetensors.torch as st
from ltm_convert.io import load, save
model = load(sys.argv[1])
def die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # killed with the temporary output written
real = torch.save if sys.argv[2].endswith(".pt") else st.save_file
if sys.argv[2].endswith(".pt"):
    torch.save = die
else:
    st.save_file = die
save(model, sys.argv[2])
"""


@pytest.mark.parametrize("name", ["out.pt", "out"])
def test_temp_files_of_killed_saves_are_cleaned_by_the_next_save(saved_dir, tmp_path, name):
    script = tmp_path / "kill.py"
    script.write_text(KILLED_SAVE)
    work = tmp_path / "work"
    work.mkdir()
    seen = set()
    for _ in range(2):  # each killed save leaves its temporary output; the next one removes the last one's
        proc = subprocess.run([sys.executable, str(script), str(saved_dir), str(work / name)], env=_env(),
                              capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        left = [p.name for p in work.iterdir()]
        assert len(left) == 1 and left[0].startswith(f".{name}.ltm-") and left[0] not in seen, left
        seen.add(left[0])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a save in progress (its pid runs) and files that only look alike are left alone
        from ltm_convert.safe_write import _host

        busy = work / f".{name}.ltm-{_host()}-{sleeper.pid}-abcd1234.tmp"
        busy.write_text("in progress")
        unrelated = [work / f".{name}.notes", work / f"{name}.ltm-{_host()}-1-x.tmp", work / ".other.pt.abcd1234.tmp",
                     work / f".{name}.abcd1234.tmp"]  # the last: an older writer's temp, but fresh
        for path in unrelated:
            path.write_text("mine")
        legacy = work / f".{name}.wxyz9876.tmp"  # an older writer's temp, two hours old: stale
        legacy.write_text("old")
        os.utime(legacy, (legacy.stat().st_atime - 7200, legacy.stat().st_mtime - 7200))
        save(load(saved_dir), work / name)
        assert sorted(p.name for p in work.iterdir()) == sorted([name, busy.name, *(p.name for p in unrelated)])
    finally:
        sleeper.kill()
        sleeper.wait()
    load(work / name)


# ------------------------------------------------------------------------------ item 9: save_pretrained


@pytest.mark.parametrize("cls_name", HF_FAMILIES)
def test_every_readme_hf_class_loads_from_save_pretrained(tmp_path, cls_name):
    model = convert(hf_model(cls_name), 0.6)
    model.save_pretrained(tmp_path / "hf")
    loaded = load(tmp_path / "hf")
    assert type(loaded) is type(model) and loaded.ltm_config.keep == model.ltm_config.keep
    x = images_for(model)
    with torch.no_grad():
        assert torch.equal(main_output(run_model(loaded, x)), main_output(run_model(model, x)))


def test_hf_load_prints_no_progress_bars(tmp_path):
    convert(hf_model("ViTModel"), 0.6).save_pretrained(tmp_path / "hf")
    proc = run_cli("inspect", str(tmp_path / "hf"), cwd=tmp_path)
    assert proc.returncode == 0 and "Loading weights" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ item 12: messages


def test_a_newer_format_names_its_number_and_ours(saved_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(saved_dir, target)
    recipe = json.loads((target / "ltm_config.json").read_text())
    recipe["ltm_format"] = 99
    (target / "ltm_config.json").write_text(json.dumps(recipe))
    line = assert_one_line_error(run_cli("inspect", str(target), cwd=tmp_path))
    assert "format 99" in line and "formats up to 1" in line and "upgrade" in line, line
    assert "newer ltm_convert" not in line


@pytest.mark.parametrize("layout", ["dir", "pt"])
def test_deeply_nested_json_is_one_line(saved_dir, tmp_path, layout):
    nested = "[" * 100_000 + "]" * 100_000
    if layout == "dir":
        target = tmp_path / "model"
        shutil.copytree(saved_dir, target)
        (target / "ltm_config.json").write_text(nested)
    else:
        target = tmp_path / "m.pt"
        torch.save({"ltm_recipe": nested, "state_dict": {}}, target)
    line = assert_one_line_error(run_cli("inspect", str(target), cwd=tmp_path))
    assert "corrupt" in line, line


@pytest.mark.parametrize("tamper", [{"_attn_implementation": "kernels-community/flash-attn"},
                                    {"hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 128,
                                     "intermediate_size": 65536}], ids=["hub-kernel", "huge"])
def test_save_pretrained_directory_config_json_is_checked_on_load(tmp_path, tamper):
    """``ltm_convert.load(dir)`` of a save_pretrained directory builds what its config.json says: that
    file goes through the same allow-list, size bound and offline rule as a saved recipe."""
    import json as _json

    from model_zoo import hf_model

    from ltm_convert.api import convert
    from ltm_convert.io import load

    model = convert(hf_model("Dinov2Model"), 0.6)
    model.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = _json.loads(cfg_path.read_text())
    cfg.update(tamper)
    cfg_path.write_text(_json.dumps(cfg))
    with pytest.raises(LtmError) as e:
        load(tmp_path / "m")
    line = str(e.value)
    assert "\n" not in line and (("_attn_implementation" in line) if "hidden_size" not in tamper
                                 else ("billion parameters" in line))


@pytest.mark.parametrize("how", ["sparse", "float64-head"])
def test_weights_that_cannot_run_are_refused_at_load(tmp_path, how):
    """A sparse tensor (torch.isfinite raised a 14 KB NotImplementedError) or a float64 head behind
    float32 blocks (every command but inspect crashed with a dtype RuntimeError): one line at load."""
    import timm

    from ltm_convert.api import convert
    from ltm_convert.io import load, save

    model = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                                      num_classes=5).eval(), 0.7)
    save(model, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt")
    weights = blob["state_dict"]
    if how == "sparse":
        weights["head.weight"] = weights["head.weight"].to_sparse()
    else:
        weights["head.weight"] = weights["head.weight"].double()
        weights["head.bias"] = weights["head.bias"].double()
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(LtmError) as e:
        load(tmp_path / "bad.pt")
    line = str(e.value)
    assert "\n" not in line and ("head.weight" in line if how == "sparse" else "dtype" in line)
