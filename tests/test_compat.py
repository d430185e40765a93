"""Files written by ltm_convert 0.1.0 (tests/data/v010_*, made by that version) still load and compute
what they computed then."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ltm_convert.api import ltm_blocks
from ltm_convert.io import load, read_file
from ltm_convert.model_inputs import main_output, run_model

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "v010_expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_files_from_0_1_0_load_and_agree(name):
    model = load(DATA / name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = main_output(run_model(model, x))
    torch.testing.assert_close(out, torch.tensor(EXPECTED[name]), rtol=1e-4, atol=1e-5)


def test_a_0_1_0_file_has_no_schedule_buffers_so_its_schedule_is_checked_by_flops(tmp_path):
    """0.1.0 files carry no schedule buffers; an edited schedule there is caught by the FLOPs it uses."""
    import shutil

    from ltm_convert.errors import LtmError

    target = tmp_path / "tome"
    shutil.copytree(DATA / "v010_vit_tiny_tome", target)
    recipe = json.loads((target / "ltm_config.json").read_text())
    recipe["config"]["keep"] = {"blocks.0": 14, "blocks.1": 12, "blocks.2": 10}
    (target / "ltm_config.json").write_text(json.dumps(recipe))
    with pytest.raises(LtmError, match="claims FLOPs ratio 0.6.*tampered"):
        load(target)


F1_EXPECTED = json.loads((DATA / "f1_expected.json").read_text())
F2_EXPECTED = json.loads((DATA / "f2_expected.json").read_text())


def _load_and_agree(name: str, expected: dict) -> Any:
    model = load(DATA / name)
    case = expected[name]
    x = torch.randn(2, 3, *case["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = main_output(run_model(model, x))
    torch.testing.assert_close(out, torch.tensor(case["output"]), rtol=1e-4, atol=1e-5)
    return model


@pytest.mark.parametrize("name", sorted(F1_EXPECTED))
def test_files_of_format_1_as_written_before_plans_were_recorded_load_and_agree(name):
    """tests/data/f1_*: written by main on 2026-12-06 (tests/data/make_fixtures.py f1), before the
    file recorded its family and plan; such files are re-planned from the model at load."""
    _load_and_agree(name, F1_EXPECTED)


@pytest.mark.parametrize("name", sorted(F2_EXPECTED))
def test_files_whose_plans_use_the_old_token_count_names_replay_and_agree(name, monkeypatch):
    """tests/data/f2_*: written by main at 64364dd, whose recorded plans name the token counts
    ``num_tokens`` / ``tokens`` (now ``tokens_with_prefix`` / ``mergeable``). They replay their
    plan (no torch.export) and give the outputs they gave then."""
    assert '"num_tokens"' in json.dumps(read_file(DATA / name)[0])  # the fixture really has the old names

    def no_export(*args, **kwargs):
        raise AssertionError("load re-traced the model instead of replaying the recorded plan")

    monkeypatch.setattr(torch.export, "export", no_export)
    model = _load_and_agree(name, F2_EXPECTED)
    assert model.ltm_plan.tokens_with_prefix > 0
    for _, block in ltm_blocks(model):  # code written against the old attribute names still reads them
        assert (block.ltm_tokens_in, block.ltm_keep) == (block.ltm_in_with_prefix, block.ltm_keep_mergeable)
