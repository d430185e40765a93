"""MobileViT (timm and HF): blocks on unfolded 2-D patch grids merge onto a sub-grid and unmerge
before the fold. Parity, FLOPs, grid schedules, gradients, save/load and clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ltm_convert.api import convert, describe, find_blocks, ltm_parameters
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.grid import grid_geometry, grid_options
from ltm_convert.io import load, save
from ltm_convert.sources import load_model
from model_zoo import GRID_HF, GRID_TIMM, grid_model

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
    for h, w, hk, wk in [(16, 16, 9, 9), (8, 8, 5, 5), (4, 4, 3, 3), (16, 8, 7, 4), (4, 4, 1, 1)]:
        targets, cand, valid = grid_geometry(h, w, hk, wk)
        assert targets.shape == (hk * wk,) and cand.shape == (h * w, 4)
        assert int(cand.max()) < hk * wk and bool(valid[:, 0].all())
        for t, pos in enumerate(targets.tolist()):
            assert t in cand[pos][valid[pos]].tolist()
    assert grid_options(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert grid_options(16, 8)[-1] == (16, 8)


def test_tracer_finds_the_grid_groups():
    plan = find_blocks(grid_model("mobilevit-xxs"))
    assert [(g.grid, g.patch_area, len(g.blocks)) for g in plan.grids] == [((16, 16), 4, 2), ((8, 8), 4, 4), ((4, 4), 4, 3)]
    assert "grid group 16x16" in str(plan)


@pytest.mark.parametrize("kind", ALL)
def test_parity_at_ratio_one(kind):
    model = grid_model(kind)
    x = images()
    with torch.no_grad():
        diff = (run(convert(model, 1.0), x) - run(model, x)).abs().max().item()
    assert diff <= 1e-5


def test_flops_within_two_percent_and_outputs_follow_the_original(family):
    kind, model, converted = family
    info = describe(converted)
    assert abs(info["flops_ratio"] - 0.8) <= 0.02 * 0.8, info["flops_ratio"]
    grids = info["grids"]
    assert len(grids) == 3 and all(g["tokens_out"] <= g["tokens_in"] for g in grids)
    assert any(g["tokens_out"] < g["tokens_in"] for g in grids)
    x = images()
    with torch.no_grad():
        out, ref = run(converted, x), run(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if kind in GRID_TIMM:  # HF's random init leaves MobileViT's features at ~1e-41: nothing to compare
        assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.5


def test_batch_independence(family):
    _, _, converted = family
    x = images(3, seed=2)
    with torch.no_grad():
        together = run(converted, x)
        alone = torch.cat([run(converted, x[i:i + 1]) for i in range(3)])
    assert (together - alone).abs().max().item() < 1e-4


def test_every_ltm_parameter_gets_a_gradient(family):
    _, _, converted = family
    converted.train()
    try:
        run(converted, images()).square().mean().backward()
        params = ltm_parameters(converted)
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params), \
            [n for n, p in params if p.grad is None or p.grad.abs().sum() == 0]
    finally:
        converted.zero_grad(set_to_none=True)
        converted.eval()


def test_unreachable_ratio_picks_the_closest_grid_schedule():
    model = grid_model("mobilevit-xxs")
    with pytest.warns(UserWarning, match="not reachable"):
        converted = convert(model, 0.5)
    info = describe(converted)
    # the transformers hold about 40% of MobileViT-XXS's FLOPs: merging every grid to one token is the closest
    assert 0.55 < info["flops_ratio"] < 0.8
    assert all(g["grid_out"] == [1, 1] for g in info["grids"])


def test_065_on_mobilevit_s_is_the_closest_reachable_schedule():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(grid_model("mobilevit-s"), 0.65)
    info = describe(converted)
    error = abs(info["flops_ratio"] - 0.65) / 0.65
    assert error < 0.05, info["flops_ratio"]
    # within 2% it is silent; beyond, the user is told what was reached
    assert (error > 0.02) == any("not reachable" in str(w.message) for w in caught)


@pytest.mark.parametrize("suffix", [".pt", ""])
def test_save_load_bit_identical(tmp_path, suffix):
    model = load_model("mobilevit_xxs", pretrained=False)
    converted = convert(model, 0.8)
    path = save(converted, tmp_path / f"mv{suffix}")
    loaded = load(path)
    x = images()
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))
    assert describe(loaded)["grids"] == describe(converted)["grids"]
    if suffix == ".pt":  # the real CLI reports the grid schedule
        done = subprocess.run([sys.executable, "-m", "ltm_convert.cli", "inspect", str(path)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        assert "patch grids" in done.stdout and "16x16 ->" in done.stdout, done.stdout


def test_clear_errors():
    model = grid_model("mobilevit-xxs")
    with pytest.raises(LtmError, match="plain-sequence"):
        convert(model, 0.8, method="tome")
    converted = convert(model, 0.8)
    with pytest.raises(LtmError, match="--input-size"):
        converted(torch.randn(1, 3, 192, 192))
    from ltm_convert.visualize import trace_model

    with pytest.raises(LtmError, match="2-D patch grids"):
        trace_model(converted, images(1))


def test_swin_is_refused_with_a_reason():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        convert(swin, 0.8)


def test_a_finetune_step_trains_the_grid_masks(tmp_path):
    from torch.utils.data import TensorDataset

    from ltm_convert.finetune import FinetuneConfig, Trainer
    from ltm_convert.finetune.data import DataBundle

    student = convert(grid_model("mobilevit-xxs"), 0.8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 256, 256, generator=g), torch.randint(0, 7, (8,), generator=g)
    data = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:4], y[:4]), classes=list("abcdefg"), skipped=0)
    cfg = FinetuneConfig(epochs=1, batch_size=4, progress=False, eval_before=False, save_every=1, log_every=1,
                         ib_warmup=0.0, ib_clusters=4, warmup=0.0, freeze=(), mask_lr=3e-3)
    tr = Trainer(student, data, cfg, tmp_path)
    before = {n: p.detach().clone() for n, p in ltm_parameters(student)}
    others = {n: p.detach().clone() for n, p in student.state_dict().items() if n not in before}
    tr.set_train_mode()
    loss0 = float(tr.losses(x[:4], y[:4], update_ib=False)["loss"].detach())
    for _ in range(3):
        tr.train_step(x[:4], y[:4])
    loss1 = float(tr.losses(x[:4], y[:4], update_ib=False)["loss"].detach())
    assert loss1 < loss0
    assert all(not torch.equal(before[n], p) for n, p in ltm_parameters(student)), "every ltm_ parameter moves"
    # --train mask: no other parameter and no BatchNorm statistic changed
    assert all(torch.equal(others[n], p) for n, p in student.state_dict().items() if n in others)


def test_the_schedule_s_quadratic_flops_curve_is_exact():
    """solve_grids measures three options per group and fits the rest; check it against counting all."""
    from ltm_convert import grid
    from ltm_convert.flops import count_flops, meta_copy

    model = grid_model("mobilevit-xxs")
    converted = convert(model, 0.8)
    plan = converted.ltm_plan
    counted = meta_copy(converted)
    blocks = [counted.get_submodule(n) for n in plan.block_names]
    base = count_flops(model, (256, 256))
    full = [g.grid for g in plan.grids]
    gi, group = 1, plan.grids[1]  # the 8 x 8 group: 8 options, 5 of them fitted

    def saving(option):
        grid.apply_grid_choice(blocks, plan, [option if j == gi else full[j] for j in range(len(full))])
        return base - count_flops(counted, (256, 256))

    options = grid.grid_options(*group.grid)
    fitted = grid._savings_curve(options, group.tokens, saving)
    assert max(abs(f - saving(o)) for f, o in zip(fitted, options)) < 1.0
