"""Issue 22, the model sources: no file reads other files, asks for a model of any size, or sends
ltm_convert online; the source and head size are inferred; every mistake is one plain line.

Real files on disk throughout; where an item is about the CLI it runs in a subprocess, with every
network call made to fail at once and recorded (a socket shim in front of the real CLI).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
from test_cli import _env, assert_one_line_error, ok, run_cli

from ltm_convert.api import convert
from ltm_convert.errors import LtmError
from ltm_convert.io import load, save
from ltm_convert.sources import ModelSource, build_model, load_model, source_of
from ltm_convert.sources.build import from_pretrained_checked
from ltm_convert.sources.guard import MAX_PARAMETERS

TINY_TIMM = dict(depth=1, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
HUB_TIMM = "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
HUB_HF = "google/vit-base-patch16-224"

# put in front of the real CLI: any connection attempt is written to $LTM_NET_LOG and fails at once
NO_NET = """
import os, socket, runpy, sys
def _refuse(*a, **k):
    with open(os.environ["LTM_NET_LOG"], "a") as f:
        f.write(repr(a[:2]) + "\\n")
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
sys.argv = ["ltm-convert", *sys.argv[1:]]
runpy.run_module("ltm_convert.cli", run_name="__main__")
"""


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


def run_offline_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """The real CLI with sockets refused; (process, the connection attempts, seconds)."""
    log = cwd / "net.log"
    env = _env(LTM_NET_LOG=str(log), HF_HOME=str(cwd / "hf_home"))
    env.pop("HF_HUB_OFFLINE", None)  # ltm_convert itself must stay offline
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", NO_NET, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    tries = log.read_text().splitlines() if log.exists() else []
    return proc, tries, time.perf_counter() - start


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every connection attempt in this process fails at once and is recorded."""
    tries: list = []

    def refuse(*args, **kwargs):
        tries.append(args[:2])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tries


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A local file a tampered recipe would like to read (its key name must never be printed)."""
    path = tmp_path / "secret.pt"
    torch.save({"secret_key_name": torch.zeros(2)}, path)
    return path


def _saved_pt(tmp_path: Path) -> Path:
    model = load_model("vit_tiny_patch16_224", pretrained=False, **TINY_TIMM)
    with warnings.catch_warnings():  # one block cannot reach every ratio; the schedule is not under test
        warnings.simplefilter("ignore", UserWarning)
        converted = convert(model, 0.5)
    return save(converted, tmp_path / "model.pt")


def _with_source(path: Path, source: dict, out: Path) -> Path:
    """``path`` (a saved .pt) with its recipe's source replaced, as an attacker would write it."""
    payload = torch.load(path, weights_only=True)
    recipe = json.loads(payload["ltm_recipe"])
    recipe["source"] = source
    torch.save({"ltm_recipe": json.dumps(recipe), "state_dict": payload["state_dict"]}, out)
    return out


def _timm_wrapper_config(**model_args) -> dict:
    import transformers

    return transformers.TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=model_args).to_dict()


def _timm_wrapper_dir(tmp_path: Path, **edits) -> Path:
    """A real save_pretrained directory of a tiny TimmWrapperModel, its config.json then edited."""
    import transformers

    d = tmp_path / "hf_timm"
    model = transformers.TimmWrapperModel(transformers.TimmWrapperConfig(
        architecture="vit_tiny_patch16_224", model_args=dict(TINY_TIMM)))
    model.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (d / "config.json").write_text(json.dumps(config))
    return d


# ------------------------------------------------------------------ item 5: no file reads other files


def test_item5_timm_wrapper_recipe_cannot_read_a_local_file(tmp_path: Path, secret: Path) -> None:
    source = {"kind": "hf-config", "name": "TimmWrapperModel",
              "kwargs": {"config": _timm_wrapper_config(checkpoint_path=str(secret), **TINY_TIMM)}}
    evil = _with_source(_saved_pt(tmp_path), source, tmp_path / "evil.pt")
    line = assert_one_line_error(run_cli("inspect", str(evil), cwd=tmp_path))
    assert "checkpoint_path" in line and "secret_key_name" not in line
    with pytest.raises(LtmError) as e:
        load(evil)
    assert "checkpoint_path" in one_line(e) and "secret_key_name" not in str(e.value)


@pytest.mark.parametrize("pretrained", [True, False])
def test_item5_hf_directory_config_json_goes_through_the_allow_list(tmp_path: Path, secret: Path,
                                                                    pretrained: bool) -> None:
    d = _timm_wrapper_dir(tmp_path, model_args={"checkpoint_path": str(secret)})
    with pytest.raises(LtmError) as e:
        load_model(f"hf:{d}", pretrained=pretrained)
    assert "checkpoint_path" in one_line(e) and "config.json" in str(e.value)
    assert "secret_key_name" not in str(e.value)
    with pytest.raises(LtmError) as e:  # the helper a save_pretrained directory of a converted model loads with
        from_pretrained_checked(__import__("transformers").TimmWrapperModel, d)
    assert "checkpoint_path" in one_line(e)


def test_item5_the_checked_directory_loader_still_loads_and_refuses_a_swapped_class(tmp_path: Path) -> None:
    import transformers

    d = _timm_wrapper_dir(tmp_path)
    model = from_pretrained_checked(transformers.TimmWrapperModel, d)
    assert type(model).__name__ == "TimmWrapperModel" and len(model.timm_model.blocks) == 1
    with pytest.raises(LtmError) as e:  # config.json says timm_wrapper, the recipe says ViTModel
        from_pretrained_checked(transformers.ViTModel, d)
    assert "TimmWrapperConfig" in one_line(e)


def test_item5_cli_refuses_the_tampered_directory(tmp_path: Path, secret: Path) -> None:
    d = _timm_wrapper_dir(tmp_path, model_args={"checkpoint_path": str(secret)})
    line = assert_one_line_error(run_cli("convert", f"hf:{d}", "--dry-run", cwd=tmp_path))
    assert "checkpoint_path" in line and "secret_key_name" not in line


# ------------------------------------------------------------------ item 6: the size of the whole model


HUGE_TIMM = {"depth": 96, "embed_dim": 8192, "num_heads": 128, "mlp_ratio": 16}


def test_item6_a_small_file_cannot_ask_for_a_huge_model(tmp_path: Path) -> None:
    evil = _with_source(_saved_pt(tmp_path), {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": HUGE_TIMM},
                        tmp_path / "huge.pt")
    start = time.perf_counter()
    line = assert_one_line_error(run_cli("inspect", str(evil), cwd=tmp_path))
    assert "billion parameters" in line and f"{MAX_PARAMETERS / 1e9:g} billion" in line
    assert time.perf_counter() - start < 120  # refused on the meta device, never allocated


@pytest.mark.parametrize("source", [
    {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": HUGE_TIMM},
    {"kind": "hf-config", "name": "TimmWrapperModel", "kwargs": {"config": "timm-wrapper"}},
    {"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": {
        "model_type": "vit", "hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 128,
        "intermediate_size": 65536}}},
], ids=["timm", "timm-wrapper-model-args", "hf-vit"])
def test_item6_parameter_count_is_bounded_before_building(source: dict) -> None:
    if source["kwargs"].get("config") == "timm-wrapper":
        source = {**source, "kwargs": {"config": _timm_wrapper_config(**HUGE_TIMM)}}
    start = time.perf_counter()
    with pytest.raises(LtmError) as e:
        build_model(ModelSource.from_dict(source))
    assert "billion parameters" in one_line(e)
    assert time.perf_counter() - start < 30


def test_item6_timm_wrapper_model_args_are_allow_listed() -> None:
    source = {"kind": "hf-config", "name": "TimmWrapperModel",
              "kwargs": {"config": _timm_wrapper_config(pretrained_cfg_overlay={"file": "/etc/passwd"})}}
    with pytest.raises(LtmError) as e:
        ModelSource.from_dict(source)
    assert "pretrained_cfg_overlay" in one_line(e)
    source["kwargs"]["config"]["architecture"] = HUB_TIMM
    source["kwargs"]["config"]["model_args"] = {}
    with pytest.raises(LtmError) as e:
        ModelSource.from_dict(source)
    assert "hf-hub" in one_line(e)


# ------------------------------------------------------------------ item 7: files never send us online


@pytest.mark.parametrize("spec", [HUB_TIMM, f"timm:{HUB_TIMM}", HUB_HF])
def test_item7_no_pretrained_hub_names_never_touch_the_network(spec: str, no_network: list) -> None:
    start = time.perf_counter()
    with pytest.raises(LtmError) as e:
        load_model(spec, pretrained=False)
    assert "never goes online" in one_line(e) and "local cache" in str(e.value)
    assert no_network == [], f"a connection was attempted: {no_network}"
    assert time.perf_counter() - start < 15


def test_item7_a_recipe_naming_a_hub_model_stays_offline(tmp_path: Path, no_network: list) -> None:
    evil = _with_source(_saved_pt(tmp_path), {"kind": "timm", "name": HUB_TIMM, "kwargs": {}}, tmp_path / "hub.pt")
    with pytest.raises(LtmError) as e:
        load(evil)
    assert "never goes online" in one_line(e)
    assert no_network == []


def test_item7_cli_no_pretrained_hub_name_is_quick_and_one_line(tmp_path: Path) -> None:
    proc, tries, seconds = run_offline_cli("convert", HUB_TIMM, "--no-pretrained", "--dry-run", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert "never goes online" in line
    assert tries == [], f"the CLI tried to connect: {tries}"
    assert seconds < 60  # main: 31 s of retries on top of the start-up


@pytest.mark.parametrize("where", ["recipe", "config.json"])
@pytest.mark.parametrize("value", ["kernels-community/flash-attn", "flash_attention_2"])
def test_item7_attention_implementation_is_local_only(tmp_path: Path, no_network: list, where: str,
                                                      value: str) -> None:
    if where == "recipe":
        import transformers

        config = {**transformers.ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8).to_dict(),
                  "_attn_implementation": value}
        with pytest.raises(LtmError) as e:
            build_model(ModelSource.from_dict({"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": config}}))
    else:
        d = _timm_wrapper_dir(tmp_path, attn_implementation=value)
        with pytest.raises(LtmError) as e:
            load_model(f"hf:{d}", pretrained=False)
    assert "implementation" in one_line(e) and "eager" in str(e.value)
    assert no_network == []


def test_item7_local_attention_implementations_still_build() -> None:
    import transformers

    config = {**transformers.ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8).to_dict(),
              "_attn_implementation": "eager"}
    model = build_model(ModelSource.from_dict({"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": config}}))
    assert type(model).__name__ == "ViTModel"


# ------------------------------------------------------------------ item 13: the source is inferred


@pytest.mark.parametrize("kw", [
    dict(img_size=112, depth=6, global_pool="avg", class_token=False),  # the example
    dict(depth=2, img_size=32, patch_size=8, embed_dim=48, num_heads=4, mlp_ratio=2.6, qkv_bias=False,
         qk_norm=True, init_values=0.1, reg_tokens=2, no_embed_class=True, fc_norm=True, num_classes=5),
], ids=["issue-example", "many-options"])
def test_item13_save_infers_the_constructor_options(tmp_path: Path, kw: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    converted = convert(model, 0.8)
    path = save(converted, tmp_path / "m.pt")  # main: "pass source=..."
    recipe = json.loads(torch.load(path, weights_only=True)["ltm_recipe"])
    assert recipe["source"]["kwargs"]["depth"] == kw["depth"]
    side = kw["img_size"]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.equal(load(path)(x), converted(x))


def test_item13_heads_are_inferred_although_no_shape_shows_them() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                              num_heads=4)
    src = source_of(model)
    assert src.kwargs["num_heads"] == 4
    assert build_model(src).blocks[0].attn.num_heads == 4


# ------------------------------------------------------------------ item 14: the head size is read


def test_item14_head_size_is_read_from_the_checkpoint(tmp_path: Path) -> None:
    for classes in (7, 0):
        mine = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes, **TINY_TIMM)
        torch.save(mine.state_dict(), tmp_path / f"mine{classes}.pth")
        model = load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / f"mine{classes}.pth"), **TINY_TIMM)
        assert model.num_classes == classes and model.ltm_source.kwargs["num_classes"] == classes
        assert all(torch.equal(v, mine.state_dict()[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ item 12: plain, true one-liners


def test_item12_random_bytes_are_not_called_pickled_objects(tmp_path: Path) -> None:
    import os
    import pickle

    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    for name, needle in (("random.pt", "not a torch / safetensors file"), ("plain.pkl", "plain Python pickle")):
        line = assert_one_line_error(run_cli("convert", "vit_tiny_patch16_224", "--no-pretrained", "--checkpoint",
                                             name, "--dry-run", cwd=tmp_path))
        assert needle in line and "contains pickled Python objects" not in line, line
        assert "Detected pickle protocol" not in line


@pytest.mark.parametrize("kwargs, needle", [
    ("checkpoint_path=/etc/passwd", "--checkpoint FILE"),
    ("trust_remote_code=true", "trust_remote_code"),
])
def test_item12_model_kwargs_mistakes_blame_the_option_not_a_file(tmp_path: Path, kwargs: str, needle: str) -> None:
    line = assert_one_line_error(run_cli("convert", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                                         kwargs, "--dry-run", cwd=tmp_path))
    assert needle in line and kwargs.split("=")[0] in line
    assert "tampered" not in line and "the file" not in line and "corrupt" not in line


def test_item12_constructor_errors_are_one_line(tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("convert", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                                         "embed_dim=100", "--dry-run", cwd=tmp_path))  # timm: AssertionError
    assert "cannot be built" in line and "divisible" in line
    import transformers

    config = {**transformers.ViTConfig(num_hidden_layers=1).to_dict(), "hidden_act": 5}
    with pytest.raises(LtmError) as e:  # huggingface_hub's StrictDataclassFieldValidationError
        build_model(ModelSource.from_dict({"kind": "hf-config", "name": "ViTModel", "kwargs": {"config": config}}))
    assert "hidden_act" in one_line(e)
    d = _timm_wrapper_dir(tmp_path, initializer_range="high")
    with pytest.raises(LtmError) as e:  # the same error from a directory's config.json
        load_model(f"hf:{d}")
    assert "initializer_range" in one_line(e)


def test_item12_pickled_bin_in_from_pretrained_is_one_line(tmp_path: Path) -> None:
    import transformers

    d = _timm_wrapper_dir(tmp_path)
    state = transformers.TimmWrapperModel.from_pretrained(d).state_dict()
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save({**state, "x": _Evil(str(tmp_path / "pwned"))}, d / "pytorch_model.bin")
    for call in (lambda: load_model(f"hf:{d}"), lambda: from_pretrained_checked(transformers.TimmWrapperModel, d)):
        with pytest.raises(LtmError) as e:
            call()
        assert "pickled" in one_line(e) and "weights_only=False" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_item12_hf_loads_print_no_progress_bars(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    d = _timm_wrapper_dir(tmp_path)
    capfd.readouterr()
    load_model(f"hf:{d}")
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading weights" not in err, err


def test_cli_checkpoint_head_is_recorded(tmp_path: Path) -> None:
    """Item 14 through the CLI: no --num-classes needed, the head size lands in the saved recipe."""
    mine = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **TINY_TIMM)
    torch.save(mine.state_dict(), tmp_path / "mine.pth")
    kwargs = [arg for k, v in TINY_TIMM.items() for arg in ("--model-kwargs", f"{k}={v}")]
    ok(run_cli("convert", "vit_tiny_patch16_224", "--checkpoint", "mine.pth", *kwargs, "-o", "m.pt", cwd=tmp_path))
    recipe = json.loads(torch.load(tmp_path / "m.pt", weights_only=True)["ltm_recipe"])
    assert recipe["source"]["kwargs"]["num_classes"] == 7


def test_item6_hf_directory_size_is_bounded_before_any_weight_is_read(tmp_path: Path) -> None:
    d = tmp_path / "huge_vit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "vit", "architectures": ["ViTModel"], "hidden_size": 16384, "num_hidden_layers": 128,
        "num_attention_heads": 128, "intermediate_size": 65536}))
    for pretrained in (False, True):
        with pytest.raises(LtmError) as e:
            load_model(f"hf:{d}", pretrained=pretrained)
        assert "billion parameters" in one_line(e)


@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
def test_save_refuses_a_setting_no_recorded_option_rebuilds(tmp_path: Path, act: str) -> None:
    """An activation (or norm) of the user's own changes outputs without changing any tensor shape:
    a recipe that rebuilt GELU instead would load silently different (0.46 on a tiny ViT). Refused,
    naming the module; dropout rates (training only) do not stop a save."""
    import timm

    from ltm_convert.api import convert
    from ltm_convert.io import save

    model = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                                      act_layer=act).eval(), 0.8)
    with pytest.raises(LtmError) as e:
        save(model, tmp_path / "m.pt")
    assert "blocks.0.mlp.act" in one_line(e) and "source=" in str(e.value)
    assert not (tmp_path / "m.pt").exists()
    fine = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                                     drop_path_rate=0.1).eval(), 0.8)
    save(fine, tmp_path / "ok.pt")


def test_a_sparse_checkpoint_is_one_line(tmp_path: Path) -> None:
    """A --checkpoint holding a sparse tensor crashed inside timm's weight loading (exit 1)."""
    import timm
    import torch

    from ltm_convert.sources.checkpoints import read_checkpoint

    sd = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=5).state_dict()
    sd["head.weight"] = sd["head.weight"].to_sparse()
    torch.save(sd, tmp_path / "sparse.pth")
    with pytest.raises(LtmError) as e:
        read_checkpoint(tmp_path / "sparse.pth")
    assert "head.weight" in one_line(e) and "sparse" in str(e.value)
