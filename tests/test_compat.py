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
