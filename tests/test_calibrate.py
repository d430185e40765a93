"""The calibrated schedule: a measured profile, scaled to land on the FLOPs target like any other."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ltm_convert.calibrate import calibrate
from ltm_convert.errors import LtmError
from ltm_convert.schedule import shaped, solve
from test_schedule import VitCost, chain


def test_greedy_merges_where_the_loss_is_cheap():
    """With a loss that makes merging in one block ten times dearer than elsewhere, the search
    spends the budget elsewhere, and the solver then lands on the target with that profile."""
    sites = chain(6, 196)
    cost = VitCost(sites, 1)
    dear = "blocks.2"

    def loss(keep: dict[str, int]) -> float:
        total, m = 0.0, 196
        for s in sites:
            merged = (m - keep[s.name]) / m
            total += merged ** 2 * (10.0 if s.name == dear else 1.0)  # convex: spreading pays
            m = keep[s.name]
        return total

    weights = calibrate(sites, cost, 0.6, loss)
    assert set(weights) == {s.name for s in sites}
    assert weights[dear] == 0.0 and weights["blocks.1"] > 0 and weights["blocks.3"] > 0  # its neighbours merge
    result = solve(sites, cost, 0.6, "calibrated", weights=weights)
    assert abs(result.flops_ratio - 0.6) <= 0.001
    assert result.keep[dear] == result.keep["blocks.1"]  # it keeps all it receives


def test_calibrated_shape_scales_the_profile():
    sites = chain(3, 100)
    w = {"blocks.0": 0.0, "blocks.1": 0.5, "blocks.2": 0.25}
    assert shaped(sites, "calibrated", 0.0, w) == {s.name: 100 for s in sites}
    assert shaped(sites, "calibrated", 1.0, w) == {"blocks.0": 100, "blocks.1": 50, "blocks.2": 38}
    assert shaped(sites, "calibrated", 2.0, w)["blocks.1"] == 1  # a site merged to nothing keeps one token


def test_free_sites_are_not_calibrated():
    sites = chain(3, 50)
    sites[-1].free = True
    cost = VitCost(sites, 1)
    weights = calibrate(sites, cost, 0.7, lambda keep: float(sum(50 - k for k in keep.values())))
    assert "blocks.2" not in weights
    assert solve(sites, cost, 0.7, "calibrated", weights=weights).keep["blocks.2"] == 1


def _photos(folder, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"p{i}.png")


def test_convert_calibrated_lands_on_target_and_replays_from_file(tmp_path):
    """A real conversion: the search runs the model, the schedule meets the FLOPs target, and a
    saved model replays its calibrated counts without calibrating again."""
    from ltm_convert.api import convert, describe
    from ltm_convert.io import load, save
    from ltm_convert.sources import load_model

    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=128, depth=4).eval()
    _photos(tmp_path / "photos")
    converted = convert(model, 0.6, schedule="calibrated", calibration_images=tmp_path / "photos")
    info = describe(converted)
    assert abs(info["flops_ratio"] - 0.6) <= 0.002
    assert converted.ltm_config.schedule == "calibrated"
    assert converted.ltm_schedule.weights and max(converted.ltm_schedule.weights.values()) > 0
    x = torch.randn(2, 3, 128, 128)
    path = save(converted, str(tmp_path / "cal.pt"))
    loaded = load(path)
    assert loaded.ltm_config.keep == converted.ltm_config.keep
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))
    # a tensor batch in [0, 1] is accepted too, and the same images give the same schedule
    again = convert(model, 0.6, schedule="calibrated",
                    calibration_images=[tmp_path / "photos" / f"p{i}.png" for i in range(3)])
    assert again.ltm_config.keep == converted.ltm_config.keep


def test_calibration_folder_without_images_is_one_clear_error(tmp_path):
    import timm

    from ltm_convert.api import convert

    (tmp_path / "empty").mkdir()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    with pytest.raises(LtmError, match="holds no .*images"):
        convert(model, 0.7, schedule="calibrated", calibration_images=tmp_path / "empty")


def test_cli_calibrated_schedule(tmp_path):
    from test_cli import assert_one_line_error, parse_json, run_cli

    _photos(tmp_path / "photos")
    common = ("convert", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "img_size=128", "--model-kwargs", "depth=4", "--ratio", "0.7")
    info = parse_json(run_cli(*common, "--schedule", "calibrated", "--calibration-images", "photos", "-o", "c.pt",
                              "--json", cwd=tmp_path))
    assert info["schedule"] == "calibrated" and abs(info["flops_ratio"] - 0.7) <= 0.002
    assert (tmp_path / "c.pt").is_file()
    message = assert_one_line_error(run_cli(*common, "--calibration-images", "photos", "-o", "d.pt", cwd=tmp_path))
    assert "--schedule calibrated" in message
    assert not (tmp_path / "d.pt").exists()
