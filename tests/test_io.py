"""save / load: bit-exact round trips through real files, and clear refusals of bad files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from model_zoo import hf_model, images_for

from ltm_convert.api import convert, describe
from ltm_convert.errors import LtmError
from ltm_convert.io import load, save
from ltm_convert.sources import load_model


@pytest.fixture(scope="module")
def converted():
    model = load_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, num_classes=7)
    return convert(model, 0.6)


@pytest.mark.parametrize("name", ["model.pt", "model_dir"])
def test_round_trip_is_bit_exact(converted, tmp_path, name):
    x = images_for(converted, batch=3)
    path = save(converted, tmp_path / name)
    loaded = load(path)
    assert type(loaded) is type(converted)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    assert loaded.ltm_config.keep == converted.ltm_config.keep
    assert describe(loaded)["blocks"] == describe(converted)["blocks"]
    state = torch.load(tmp_path / name, weights_only=True) if name.endswith(".pt") else None
    if state is not None:
        assert set(state) == {"ltm_recipe", "state_dict"}


def test_hf_model_round_trip(tmp_path):
    model = convert(hf_model("Dinov2WithRegistersModel"), 0.6)
    x = images_for(model, batch=2)
    loaded = load(save(model, tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)


def test_failed_save_keeps_the_previous_file(converted, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save(converted, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save(converted, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _one_line_error(path) -> str:
    with pytest.raises(LtmError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_missing_file(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(os.urandom(4096))
    assert "corrupt" in _one_line_error(path)


def test_corrupt_directory(tmp_path, converted):
    path = save(converted, tmp_path / "d")
    (path / "model.safetensors").write_bytes(b"garbage")
    assert "corrupt" in _one_line_error(path)
    (path / "ltm_config.json").write_text("{not json")
    assert "corrupt" in _one_line_error(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ltm_convert_pwned_io",))


def test_pickled_object_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/ltm_convert_pwned_io"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"ltm_recipe": "{}", "state_dict": {}, "x": _Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    assert "pickled" in _one_line_error(path)
    assert not os.path.exists(marker)


def test_plain_torch_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(2)}, path)
    assert "not an ltm_convert model" in _one_line_error(path)


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(LtmError):
        save(hf_model("ViTModel"), tmp_path / "x.pt")
