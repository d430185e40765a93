"""The README's supported-families table cannot drift from what the tests cover."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from model_zoo import (
    CLASS_ATTENTION_TIMM,
    DENSE_HF,
    FFN_GRID_HF,
    FFN_GRID_TIMM,
    GRID_HF,
    GRID_TIMM,
    HF_FAMILIES,
    NAFLEX_HF,
    NAFLEX_TIMM,
    RELB_HF,
    RELB_TIMM,
    ROTARY_HF,
    ROTARY_TIMM,
    TIMM_FAMILIES,
    VIDEO_HF,
    VJEPA2_HF,
    TINY_VIT_TIMM,
)

from ltm_convert.rewriters import families

README = Path(__file__).resolve().parents[1] / "README.md"
RELB_HF_CLASSES = {kind.partition("-")[0] for kind in RELB_HF}


def _table_rows() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Supported families", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # drop the header


def test_every_hf_class_in_the_table_is_tested_and_vice_versa():
    listed = {name for row in _table_rows() for name in re.findall(r"`([A-Z]\w+)`", row[2])}
    tested = set(HF_FAMILIES) | set(GRID_HF) | set(FFN_GRID_HF) | set(ROTARY_HF) | RELB_HF_CLASSES | set(VIDEO_HF) | set(DENSE_HF) | set(NAFLEX_HF) | set(VJEPA2_HF)
    assert listed == tested, (sorted(listed), sorted(tested))


def test_every_timm_pattern_in_the_table_matches_a_tested_model_and_vice_versa():
    patterns = [p for row in _table_rows() for p in re.findall(r"`(\w*\*[\w*]*)`", row[1])]
    tested = {name for name, _ in [*TIMM_FAMILIES.values(), *GRID_TIMM.values(), *FFN_GRID_TIMM.values(),
                                        *ROTARY_TIMM.values(), *RELB_TIMM.values(),
                                        *CLASS_ATTENTION_TIMM.values(), *NAFLEX_TIMM.values(),
                                        *TINY_VIT_TIMM.values()]}
    for pattern in patterns:
        assert any(fnmatch.fnmatch(name, pattern) for name in tested), f"README lists untested timm models {pattern}"
    for name in tested:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"tested timm model {name} is missing from the README"


def test_every_registered_family_has_rows_and_every_row_names_one():
    named = {cell.strip("`") for row in _table_rows() for cell in [row[-1]]}
    assert named == {family.name for family in families()}, named
