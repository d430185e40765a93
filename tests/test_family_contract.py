"""The contract every registered model family keeps, run on each family's own ``examples``: parity
with the original at ratio 1.0, FLOPs on target at 0.8 / 0.65 / 0.5 (counted independently of the
family's cost model), a photo's output independent of the rest of its batch, a save / load round
trip, and ``torch.compile(fullgraph=True)``. A new family is tested here by being registered."""
from __future__ import annotations

import warnings

import pytest
import torch

import ltm_convert
from ltm_convert.api import describe
from ltm_convert.flops import count_flops
from ltm_convert.model_inputs import input_shape, main_output, run_model
from ltm_convert.rewriters import families
from ltm_convert.api import schedule_of
from ltm_convert.sources import ModelSource, build_model

CASES = [pytest.param(family, example, id=f"{family.name}:{example[1]}:{i}")
         for family in families() for i, example in enumerate(family.examples)]


def test_every_registered_family_brings_examples():
    assert all(family.examples for family in families()), [f.name for f in families() if not f.examples]


def _build(example):
    kind, name, options = example
    torch.manual_seed(0)
    source = ModelSource(kind, name, False, None, dict(options))
    model = build_model(source).eval()
    model.ltm_source = source  # how save() names it
    return model


def _out(model, x):
    with torch.no_grad():
        return main_output(run_model(model, x))


def _convert(model, ratio):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an unreachable ratio warns; checked below
        return ltm_convert.convert(model, ratio)


@pytest.mark.parametrize("family, example", CASES)
def test_family_contract(family, example, tmp_path):
    model = _build(example)
    size = tuple(_convert(model, 1.0).ltm_config.input_size)
    x = torch.randn(3, *input_shape(model, size), generator=torch.Generator().manual_seed(1))  # images or clips
    ref = _out(model, x)

    same = _convert(model, 1.0)
    assert same.ltm_plan.family == family.name
    torch.testing.assert_close(_out(same, x), ref, rtol=1e-5, atol=1e-5)

    for ratio in (0.8, 0.65, 0.5):
        merged = _convert(model, ratio)
        info = describe(merged)
        assert info["flops_converted"] == count_flops(merged)  # the cost model against a full count
        assert info["flops_original"] == count_flops(model)
        solved = schedule_of(merged)
        if solved.reachable:
            assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio, (ratio, info["flops_ratio"])
        else:  # the family says so, and merges as far as its grids allow
            assert info["flops_ratio"] < 1.0 and "not reachable" in (solved.note(info["model"]) or "")

    out = _out(merged, x)  # ratio 0.5
    assert torch.isfinite(out).all()
    torch.testing.assert_close(_out(merged, x[:1]), out[:1], rtol=1e-4, atol=1e-4)  # batch independence

    path = tmp_path / "model"
    ltm_convert.save(merged, path)
    loaded = ltm_convert.load(path)
    assert loaded.ltm_plan.family == family.name
    torch.testing.assert_close(_out(loaded, x), out, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    merged.compile(fullgraph=True, backend="eager")  # in place: still the model's own class
    torch.testing.assert_close(_out(merged, x), out, rtol=1e-4, atol=1e-4)
