"""MobileViT (timm and HF): blocks on unfolded 2-D patch grids merge onto a sub-grid and unmerge
before the fold. Parity, FLOPs, grid schedules, gradients, save/load and clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import (
    GRID_HF,
    GRID_TIMM,
    check_batch_independence,
    check_closest_reachable,
    check_grid_schedule,
    check_ltm_gradients,
    check_mask_finetune_step,
    check_save_load,
    grid_model,
)

from ltm_convert.api import convert, describe, find_blocks
from ltm_convert.rewriters.unfolded_grid import grid_groups_of
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.merge.grid import axis_targets, grid_options
from ltm_convert.sources import load_model

ALL = list(GRID_TIMM) + GRID_HF


def run(model, x):
    out = model(pixel_values=x) if "MobileViT" in type(model).__name__ else model(x)
    return getattr(out, "logits", None) if hasattr(out, "logits") else getattr(out, "last_hidden_state", out)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ALL)
def family(request):
    model = grid_model(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(model, 0.8)
    return request.param, model, converted


def test_geometry_targets_are_their_own_candidates():
    for n, k in [(16, 9), (8, 5), (4, 3), (8, 4), (4, 1), (7, 7)]:
        targets, near = axis_targets(n, k)
        assert len(targets) == k and len(near) == n
        assert all(0 <= lo <= hi < k and hi - lo <= 1 for lo, hi in near)
        for t, pos in enumerate(targets):
            assert t in near[pos]
    assert grid_options(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert grid_options(16, 8)[-1] == (16, 8)


def test_tracer_finds_the_grid_groups():
    plan = find_blocks(grid_model("mobilevit-xxs"))
    groups = grid_groups_of(plan)
    assert [(g.grid, g.patch_area, len(g.blocks)) for g in groups] == [((16, 16), 4, 2), ((8, 8), 4, 4), ((4, 4), 4, 3)]
    assert "grids: blocks=" in str(plan)


@pytest.mark.parametrize("kind", ALL)
def test_parity_at_ratio_one(kind):
    model = grid_model(kind)
    x = images()
    with torch.no_grad():
        diff = (run(convert(model, 1.0), x) - run(model, x)).abs().max().item()
    assert diff <= 1e-5


def test_flops_within_two_percent_and_outputs_follow_the_original(family):
    kind, model, converted = family
    # HF's random init leaves MobileViT's features at ~1e-41: nothing to compare
    grids = check_grid_schedule(run, model, converted, images(), 0.8, compare=kind in GRID_TIMM)
    assert len(grids) == 3


def test_batch_independence(family):
    check_batch_independence(run, family[2], images(3, seed=2))


def test_every_ltm_parameter_gets_a_gradient(family):
    check_ltm_gradients(run, family[2], images())


def test_unreachable_ratio_picks_the_closest_grid_schedule():
    model = grid_model("mobilevit-xxs")
    with pytest.warns(UserWarning, match="not reachable"):
        converted = convert(model, 0.5)
    info = describe(converted)
    # the transformers hold about 40% of MobileViT-XXS's FLOPs: merging every grid to one token is the closest
    assert 0.55 < info["flops_ratio"] < 0.8
    assert all(g["grid_out"] == [1, 1] for g in info["grids"])


def test_065_on_mobilevit_s_is_the_closest_reachable_schedule():
    check_closest_reachable(grid_model("mobilevit-s"), 0.65)


@pytest.mark.parametrize("suffix", [".pt", ""])
def test_save_load_bit_identical(tmp_path, suffix):
    converted = convert(load_model("mobilevit_xxs", pretrained=False), 0.8)
    check_save_load(converted, tmp_path / f"mv{suffix}", images(), "16x16 ->" if suffix == ".pt" else None)


def test_clear_errors():
    model = grid_model("mobilevit-xxs")
    with pytest.raises(LtmError, match="plain-sequence"):
        convert(model, 0.8, method="tome")
    converted = convert(model, 0.8)
    with pytest.raises(LtmError, match="--input-size"):
        converted(torch.randn(1, 3, 192, 192))
    from ltm_convert.tools.visualize import trace_model

    with pytest.raises(LtmError, match="2-D patch grids"):
        trace_model(converted, images(1))


def test_a_grid_model_whose_ffn_needs_the_grid_is_refused_with_a_reason():
    """PVTv2's MLP reshapes its tokens to the H x W map for a depth-wise convolution: merged tokens
    cannot feed it, so conversion stops with the reason instead of building a wrong model."""
    import timm

    pvt = timm.create_model("pvt_v2_b0", pretrained=False).eval()
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        convert(pvt, 0.8)


def test_a_finetune_step_trains_the_grid_masks(tmp_path):
    """--train mask: the loss drops, every ltm_ parameter moves, nothing else (BatchNorm included) changes."""
    check_mask_finetune_step(convert(grid_model("mobilevit-xxs"), 0.8), 256, tmp_path)


def test_the_schedule_s_quadratic_flops_curve_is_exact():
    """The cost model counts three options per group and fits the rest; check it against counting all."""
    from ltm_convert.flops import count_flops, meta_copy
    from ltm_convert.rewriters import family_named
    from ltm_convert.schedule import full_keep

    model = grid_model("mobilevit-xxs")
    converted = convert(model, 0.8)
    plan = converted.ltm_plan
    counted = meta_copy(converted)
    family = family_named(plan.family)
    cost = family.cost_model(counted, plan)
    sites = family.sites(counted, plan)
    full = full_keep(sites)
    site = sites[1]  # the 8 x 8 group: 8 options, 5 of them fitted

    def flops(k):
        family.apply(counted, plan, {**full, site.name: k})
        return count_flops(counted, (256, 256))

    assert max(abs(cost.flops({**full, site.name: k}) - flops(k)) for k in site.options) < 1.0
