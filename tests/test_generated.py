"""Generated subclasses (ltm_convert/generated.py), the one machinery behind converted blocks
(ltm_block.py), attention given a mask (rewriters/attention_bias.py), class-attention blocks and
relative-bias attention: each class is made once and found by its name, so converted models unpickle
in a fresh process; generated code is left out of pickles and shared by deep copies."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import cait_model, images_for, relb_model
from torch import nn

from ltm_convert import ltm_block
from ltm_convert.api import convert
from ltm_convert.generated import DropsGenerated

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = {"LtmBlock__", "LtmBiasedAttention__", "LtmClassAttention__", "LtmRelBiasAttn__", "LtmRelBiasBlock__"}


def test_a_generated_class_is_made_once_and_found_by_its_name():
    cls = ltm_block.ltm_class(nn.Linear)
    assert ltm_block.ltm_class(nn.Linear) is cls and ltm_block.ltm_class(cls) is cls
    assert cls.ltm_original_class is nn.Linear and cls.ltm_generated_by == "LtmBlock__"
    assert cls.__module__ == "ltm_convert.ltm_block" and getattr(ltm_block, cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        ltm_block.nothing_here  # noqa: B018 - the module's __getattr__ answers only for its prefixes


@pytest.fixture(scope="module")
def converted() -> dict[str, nn.Module]:
    return {"cait": convert(cait_model(), 0.5), "data2vec": convert(relb_model("Data2VecVisionModel"), 0.5)}


def _generated(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(type(m), "ltm_generated_by")}


def test_deep_copies_share_the_generated_code_and_pickles_leave_it_out(converted):
    seen = set()
    for model in converted.values():
        model(images_for(model, batch=1))  # every generated code built
        twin = dict(copy.deepcopy(model).named_modules())
        for name, m in _generated(model).items():
            seen |= {c.__dict__["ltm_generated_by"] for c in type(m).__mro__ if "ltm_generated_by" in c.__dict__}
            keys = [k for k in getattr(m, "ltm_generated_keys", ()) if k in m.__dict__]
            assert isinstance(m, DropsGenerated) == bool(keys), name
            for key in keys:
                assert twin[name].__dict__[key] is m.__dict__[key], (name, key)
                assert key not in m.__getstate__(), (name, key)
    assert seen == PREFIXES


def test_converted_models_unpickle_in_a_fresh_process(converted, tmp_path):
    expected = {}
    for kind, model in converted.items():
        x = images_for(model, batch=2)
        with torch.no_grad():
            out = model(x)
        expected[kind] = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        (tmp_path / f"{kind}.pkl").write_bytes(pickle.dumps((model, x)))
    script = (
        "import pickle, sys, torch\n"
        "for kind in ('cait', 'data2vec'):\n"
        "    model, x = pickle.loads(open(f'{sys.argv[1]}/{kind}.pkl', 'rb').read())\n"
        "    with torch.no_grad():\n"
        "        out = model(x)\n"
        "    torch.save(out if isinstance(out, torch.Tensor) else out.last_hidden_state, f'{sys.argv[1]}/{kind}.out')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for kind, want in expected.items():
        # another process may pick other CPU kernels / thread splits: equal up to float rounding
        torch.testing.assert_close(torch.load(tmp_path / f"{kind}.out", weights_only=True), want,
                                   rtol=1e-5, atol=1e-5, msg=kind)
