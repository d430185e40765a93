"""A saved file records the family and the plan that converted the model, and ``load`` replays them:
no torch.export trace at load, no re-guessing of the family, and a plan that does not fit the model
it is replayed on is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

import ltm_convert
from ltm_convert.errors import LtmError
from ltm_convert.io import load, save
from ltm_convert.sources import load_model

VIT = dict(depth=3, embed_dim=64, num_heads=2, img_size=64, num_classes=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = ltm_convert.convert(load_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval(), 0.6)
    path = tmp_path_factory.mktemp("replay") / "vit"
    save(model, path)
    return model, path


def _edit(path, tmp_path, change):
    import shutil

    target = tmp_path / "edited"
    shutil.copytree(path, target)
    recipe = json.loads((target / "ltm_config.json").read_text())
    change(recipe)
    (target / "ltm_config.json").write_text(json.dumps(recipe))
    return target


def test_load_replays_the_recorded_plan_without_tracing(saved, monkeypatch):
    model, path = saved
    recipe = json.loads((path / "ltm_config.json").read_text())
    assert recipe["plan"]["family"] == "sequence"
    assert [b["name"] for b in recipe["plan"]["blocks"]] == ["blocks.0", "blocks.1", "blocks.2"]

    def no_export(*args, **kwargs):
        raise AssertionError("load traced the model with torch.export")

    monkeypatch.setattr(torch.export, "export", no_export)
    loaded = load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.ltm_plan == model.ltm_plan


def test_the_recorded_family_is_used_not_re_guessed(saved, tmp_path):
    _, path = saved
    edited = _edit(path, tmp_path, lambda r: r["plan"].update(family="no-such-family"))
    with pytest.raises(LtmError, match="no model family named 'no-such-family'"):
        load(edited)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["plan"]["blocks"][1].update(name="blocks.9"), "no block blocks.9"),
    (lambda r: r["plan"]["blocks"][0].update(tokens_with_prefix=50), "receives tokens of shape"),
    (lambda r: r["plan"].update(model_class="Eva"), "the plan is for a Eva"),
    (lambda r: r["plan"]["blocks"][0].update(tokens_with_prefix="16"), "recorded conversion plan is malformed"),
    (lambda r: r["plan"].update(extra=1), "recorded conversion plan is malformed"),
])
def test_a_plan_that_does_not_fit_the_model_is_refused(saved, tmp_path, change, message):
    _, path = saved
    with pytest.raises(LtmError, match=message) as err:
        load(_edit(path, tmp_path, change))
    assert "\n" not in str(err.value)


def test_a_file_without_a_plan_is_re_planned(saved, tmp_path):
    model, path = saved
    loaded = load(_edit(path, tmp_path, lambda r: r.pop("plan")))
    assert loaded.ltm_plan == model.ltm_plan
