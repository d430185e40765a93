"""Trust nothing in a file: a tampered saved model is refused before any model code runs.

Each attack here worked against 0.1.0 (a recipe's source options went unfiltered to
``AutoConfig.from_pretrained`` / ``timm.create_model``); each must now end in one ``error:`` line
with exit status 2 from the real CLI, leaving no trace (no marker file, no imported module).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import _env, assert_one_line_error, run_cli

from ltm_convert.api import convert
from ltm_convert.errors import LtmError
from ltm_convert.io import load, save
from ltm_convert.sources import load_model

EVIL_CONFIG = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import ViTConfig


class EvilConfig(ViTConfig):
    model_type = "evil"
'''


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2)
    return save(convert(model, 0.6), tmp_path_factory.mktemp("saved") / "model")


def _tampered(saved_dir: Path, tmp_path: Path, edit) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved_dir, target)
    recipe = json.loads((target / "ltm_config.json").read_text())
    edit(recipe, target)
    (target / "ltm_config.json").write_text(json.dumps(recipe))
    return target


def _remote_code_dir(target: Path, marker: Path) -> None:
    """An HF-looking folder whose config maps AutoConfig to Python shipped beside it."""
    (target / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (target / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 64, "patch_size": 16}))


@pytest.mark.parametrize("fmt", ["dir", "pt"])
def test_trust_remote_code_in_a_recipe_never_runs_code(saved_dir, tmp_path, fmt):
    marker = tmp_path / "pwned"
    modules = tmp_path / "hf_modules"

    def edit(recipe, target):
        _remote_code_dir(target, marker)
        recipe["source"] = {"kind": "hf", "name": str(target), "kwargs": {"trust_remote_code": True}}

    target = _tampered(saved_dir, tmp_path, edit)
    if fmt == "pt":  # the .pt format can point at any local folder the same way
        state = load(saved_dir).state_dict()
        recipe = json.loads((target / "ltm_config.json").read_text())
        target = tmp_path / "evil.pt"
        torch.save({"ltm_recipe": json.dumps(recipe), "state_dict": state}, target)
    proc = run_cli("inspect", str(target), cwd=tmp_path, env=_env(HF_MODULES_CACHE=str(modules), HF_HUB_OFFLINE="1"))
    line = assert_one_line_error(proc)
    assert "trust_remote_code" in line
    assert not marker.exists(), "the recipe ran code"
    assert not modules.exists() or not any(modules.rglob("*.py")), "transformers copied the remote code"


def test_auto_map_without_trust_is_never_imported(saved_dir, tmp_path):
    """An old-style "hf" recipe pointing at a folder with an auto_map: loaded with trust_remote_code
    False, so transformers refuses or ignores the code; nothing runs."""
    marker = tmp_path / "pwned"

    def edit(recipe, target):
        _remote_code_dir(target, marker)
        recipe["source"] = {"kind": "hf", "name": str(target), "kwargs": {}}

    target = _tampered(saved_dir, tmp_path, edit)
    proc = run_cli("inspect", str(target), cwd=tmp_path, env=_env(HF_MODULES_CACHE=str(tmp_path / "m")))
    assert_one_line_error(proc)
    assert not marker.exists()


@pytest.mark.parametrize("options, needle", [
    ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
    ({"depth": 1e6}, "depth"),
    ({"depth": 1000000}, "depth"),
    ({"img_size": [100000, 100000]}, "img_size"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "pretrained_cfg_overlay"),
    ({"bogus_option": 1}, "bogus_option"),
], ids=["checkpoint_path", "depth-float", "depth-huge", "img-size-huge", "cfg-overlay", "unknown"])
def test_timm_options_are_an_allow_list(saved_dir, tmp_path, options, needle):
    def edit(recipe, _):
        recipe["source"]["kwargs"] = {**recipe["source"]["kwargs"], **options}

    start = time.perf_counter()
    line = assert_one_line_error(run_cli("inspect", str(_tampered(saved_dir, tmp_path, edit)), cwd=tmp_path))
    assert needle in line
    assert time.perf_counter() - start < 60  # refused up front, not after building a huge model


@pytest.mark.parametrize("edit_config, needle", [
    (lambda c: c.update(keep="abc"), "keep"),
    (lambda c: c.update(keep={}), "schedule"),
    (lambda c: c.update(keep={"blocks.9": 3}), "blocks.9"),
    (lambda c: c.update(topk=2.5), "topk"),
    (lambda c: c.update(format="x"), "format"),
    (lambda c: c.update(ratio="0.5"), "ratio"),
    (lambda c: c.update(ratio=True), "ratio"),
    (lambda c: c.update(input_size=[100000, 100000]), "input_size"),
    (lambda c: c.update(method="../../evil"), "method"),
], ids=["keep-abc", "keep-empty", "keep-unknown-block", "topk-float", "format-str", "ratio-str", "ratio-bool",
        "input-size-huge", "method-path"])
def test_tampered_configs_are_one_line(saved_dir, tmp_path, edit_config, needle):
    def edit(recipe, _):
        edit_config(recipe["config"])

    line = assert_one_line_error(run_cli("inspect", str(_tampered(saved_dir, tmp_path, edit)), cwd=tmp_path))
    assert needle in line


@pytest.mark.parametrize("source", [
    [],
    {"kind": "timm", "name": "../../../etc/passwd"},
    {"kind": "bundled", "name": "/tmp/x"},
    {"kind": "hf-config", "name": "os.system", "kwargs": {"config": {"model_type": "vit"}}},
    {"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": {"model_type": "vit", "num_hidden_layers": 10000}}},
    {"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": {"model_type": "vit", "auto_map": {"a": "b.C"}}}},
], ids=["list", "timm-path", "bundled-path", "hf-class-path", "hf-layers-huge", "hf-auto-map"])
def test_tampered_sources_are_one_line(saved_dir, tmp_path, source):
    def edit(recipe, _):
        recipe["source"] = source

    assert_one_line_error(run_cli("inspect", str(_tampered(saved_dir, tmp_path, edit)), cwd=tmp_path))


def test_config_that_is_not_an_object(saved_dir, tmp_path):
    def edit(recipe, _):
        recipe["config"] = []

    assert "config" in assert_one_line_error(run_cli("inspect", str(_tampered(saved_dir, tmp_path, edit)),
                                                      cwd=tmp_path))


@pytest.mark.parametrize("damage", ["int64", "nan"])
def test_weights_of_the_wrong_kind_are_refused(saved_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "model"
    shutil.copytree(saved_dir, target)
    state = load_file(str(target / "model.safetensors"))
    key = next(k for k in state if k.endswith("qkv.weight"))
    state[key] = state[key].long() if damage == "int64" else torch.full_like(state[key], float("nan"))
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(LtmError, match="int64|NaN"):
        load(target)


def test_hf_local_dir_model_loads_after_the_folder_moves(tmp_path):
    """An hf:<dir> model is saved with its HF config inside, not the folder's absolute path."""
    from transformers import ViTConfig, ViTModel

    hf_dir = tmp_path / "hf"
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=64, patch_size=8)).save_pretrained(hf_dir)
    model = load_model(f"hf:{hf_dir}", pretrained=True)
    converted = convert(model, 0.7)
    path = save(converted, tmp_path / "out.pt")
    recipe = json.loads(torch.load(path, weights_only=True)["ltm_recipe"])
    assert recipe["source"]["kind"] == "hf-config" and str(tmp_path) not in json.dumps(recipe)
    shutil.rmtree(hf_dir)
    moved = tmp_path / "elsewhere" / "out.pt"
    moved.parent.mkdir()
    path.rename(moved)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load(moved)(pixel_values=x).last_hidden_state, converted(pixel_values=x).last_hidden_state)


# --------------------------------------------------------------------------------------------- writes


def test_files_keep_the_users_umask(saved_dir, tmp_path):
    model = load(saved_dir)
    old = os.umask(0o022)
    try:
        pt = save(model, tmp_path / "m.pt")
        d = save(model, tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(pt.stat().st_mode) == 0o644
    assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_a_directory_with_other_files_is_never_replaced(saved_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LtmError, match="other files"):
        save(load(saved_dir), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


KILL_SCRIPT = """
import os, sys, signal
import safetensors.torch as st
from ltm_convert.io import load, save
model = load(sys.argv[1])
real = st.save_file
def save_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # killed between the weights and the config
st.save_file = save_then_die
model.ltm_config.ratio = 0.61
save(model, sys.argv[2])
"""


def test_a_kill_between_the_writes_leaves_the_old_output(saved_dir, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(saved_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(saved_dir), str(target)], env=_env(), capture_output=True)
    assert proc.returncode != 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old output, whole
    load(target)


WRITER = """
import sys
from ltm_convert.io import load, save
model = load(sys.argv[1])
model.ltm_config.ratio = float(sys.argv[3])
for _ in range(6):
    save(model, sys.argv[2])
"""


def test_two_concurrent_writers_never_leave_a_mix(saved_dir, tmp_path):
    target = tmp_path / "out"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(saved_dir), str(target), r], env=_env(),
                              stderr=subprocess.PIPE) for r in ("0.61", "0.62")]
    seen = set()
    while any(p.poll() is None for p in procs):
        try:
            recipe = json.loads((target / "ltm_config.json").read_text())
            seen.add(recipe["config"]["ratio"])
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    for p in procs:
        assert p.returncode == 0, p.stderr.read().decode()[-2000:]
    assert sorted(f.name for f in target.iterdir()) == ["ltm_config.json", "model.safetensors"]
    load(target)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".out.")], "temporary output left behind"


def test_output_problems_are_found_before_converting(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    (tmp_path / "x.pt").mkdir()
    (tmp_path / "file").write_text("")
    outs = [tmp_path / "x.pt", tmp_path / "file" / "m.pt"]
    if os.geteuid() != 0:  # root writes anywhere, read-only or not
        outs.append(readonly / "m.pt")
    try:
        for out in outs:
            proc = run_cli("convert", "vit_tiny_patch16_224", "--no-pretrained", "-s", "64", "-o", str(out),
                           cwd=tmp_path)
            assert_one_line_error(proc)
            assert "converting" not in proc.stdout, "the output was checked only after the conversion"
    finally:
        readonly.chmod(0o755)
