"""Files written by ltm_convert 0.1.0 (tests/data/v010_*, made by that version) still load and compute
what they computed then."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ltm_convert.io import load
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


@pytest.mark.parametrize("name", sorted(F1_EXPECTED))
def test_files_of_format_1_as_written_before_plans_were_recorded_load_and_agree(name):
    """tests/data/f1_*: written by main on 2026-12-06 (tests/data/make_f1_fixtures.py), before the
    file recorded its family and plan; such files are re-planned from the model at load."""
    model = load(DATA / name)
    case = F1_EXPECTED[name]
    x = torch.randn(2, 3, *case["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = main_output(run_model(model, x))
    torch.testing.assert_close(out, torch.tensor(case["output"]), rtol=1e-4, atol=1e-5)
