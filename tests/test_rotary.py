"""The rotary family (rewriters/rotary.py, merge/positions.py): timm Eva-class RoPE models and HF
DINOv3 convert; merged tokens get the model's own rotation at their members' mean position.

Tiny random-weight models (3 blocks, width 64, 6x6 patches) keep every test to a few seconds.
"""
from __future__ import annotations

import pytest
import torch
from model_zoo import ROTARY_TIMM, rope_model

from ltm_convert import LtmConfig
from ltm_convert.api import convert, describe, find_blocks, ltm_blocks
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.flops import count_flops
from ltm_convert.merge.positions import gather_rows, grid_for, mean_rows, merged_coords
from ltm_convert.model_inputs import all_outputs, run_model

TIMM = ROTARY_TIMM
HF = ["hf-dinov3", "hf-dinov3-noreg"]
ALL = list(TIMM) + HF


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from ltm_convert.model_inputs import default_input_size

    h, w = default_input_size(model)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return all_outputs(run_model(model, x))


def block_tables(model: torch.nn.Module, x: torch.Tensor) -> list:
    """The rotary table every converted block receives, as the model passes it."""
    seen = []

    def grab(mod, args, kwargs):
        rule = mod.__dict__["_ltm_positions"]
        seen.append((mod, rule, kwargs.get(rule.param, args[1] if len(args) > 1 else None)))

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for _, b in ltm_blocks(model)]
    try:
        with torch.no_grad():
            run_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _leaves(table):
    return list(table) if isinstance(table, (tuple, list)) else [table]


@pytest.mark.parametrize("kind", ALL)
def test_parity_at_ratio_one_and_the_models_own_table(kind):
    """Ratio 1.0 reproduces the original (HF DINOv3 crashed here: its (cos, sin) tuple was frozen
    into the cut block as a constant). Each adapter places the patches where the model's rope module
    does and evaluates the same function: at the original coordinates its table equals the
    model's, bit for bit."""
    model = rope_model(kind)
    x = images(model)
    ref = outputs(model, x)
    same = convert(model, 1.0)
    assert same.ltm_plan.family == "rotary"
    out = outputs(same, x)
    assert set(out) == set(ref)
    for key in ref:
        assert (out[key] - ref[key]).abs().max().item() <= 1e-5, key
    for block, rule, table in block_tables(same, x):
        coords = rule.adapter.patch_coords(rule.grid, torch.device("cpu"))
        assert coords.shape == (rule.grid[0] * rule.grid[1], 2)
        ours = rule.adapter.table(coords.unsqueeze(0), table, rule.block_index)
        for mine, theirs in zip(_leaves(ours), _leaves(table)):
            assert mine.shape[0] == 1 and mine.shape[-2:] == theirs.shape[-2:]
            assert torch.equal(mine[0] if theirs.dim() == 3 else mine[0, 0], theirs), block.ltm_name


FLOPS_CASES = [(k, r) for k in ("dinov3", "rope-mixed", "hf-dinov3") for r in (0.8, 0.65)] + [(k, 0.5) for k in ALL]


@pytest.mark.parametrize(("kind", "ratio"), FLOPS_CASES)
def test_flops_on_target(kind, ratio):
    """The project's own count (FlopCounterMode on the converted model) is within 2% of the target;
    the rule's rope work is elementwise and not counted, as in the original model."""
    model = rope_model(kind)
    x = images(model)
    merged = convert(model, ratio)
    info = describe(merged)
    assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio, (ratio, info["flops_ratio"])
    assert info["flops_converted"] == count_flops(merged)
    assert info["blocks"][-1]["tokens_out"] < info["blocks"][0]["tokens_in"]
    ref, got = outputs(model, x), outputs(merged, x)
    for key in ref:
        assert torch.isfinite(got[key]).all() and got[key].shape == ref[key].shape, key


@pytest.mark.parametrize("kind", ["dinov3", "rope-mixed", "hf-dinov3"])
def test_every_member_at_one_position_is_the_unmerged_rotation(kind):
    """A merged token whose members all sit at one position gets exactly that position's rotation;
    one member per token (any order) gives the original rows; positions='coords' is a rotation
    (sin^2 + cos^2 = 1) where the mean of sin/cos rows ('rows') is not."""
    model = convert(rope_model(kind), 1.0)
    _, rule, table = block_tables(model, images(model))[1]
    P = rule.grid[0] * rule.grid[1]
    coords = rule.adapter.patch_coords(rule.grid, torch.device("cpu"))
    # 1) every token one patch, in a shuffled order: the table is the original, permuted
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(0))
    source = (torch.empty(P, dtype=torch.long).scatter_(0, perm, torch.arange(P)) + 3).unsqueeze(0)  # prefix 3
    ours = rule.adapter.table(merged_coords(coords, source, 3, P), table, rule.block_index)
    for mine, theirs in zip(_leaves(ours), _leaves(table)):
        full = theirs if theirs.dim() == 3 else theirs.unsqueeze(0)
        assert torch.equal(mine[0], full[..., perm, :])
    # 2) groups of 3 patches placed at one position (their first member's): that position's rotation
    groups = torch.arange(P) // 3
    same_place = coords[groups * 3]
    source = groups.unsqueeze(0)
    merged = rule.adapter.table(merged_coords(same_place, source, 0, int(groups.max()) + 1), table, rule.block_index)
    unmerged = rule.adapter.table(same_place[::3].unsqueeze(0), table, rule.block_index)
    for a, b in zip(_leaves(merged), _leaves(unmerged)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # 3) real groups of different positions: coords is a rotation, rows is not
    spread = rule.adapter.table(merged_coords(coords, source, 0, int(groups.max()) + 1), table, rule.block_index)
    rows = [mean_rows(t, source, 0, int(groups.max()) + 1) for t in _leaves(table)]
    if kind == "hf-dinov3":
        cos, sin = spread
        assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-5)
        assert (rows[0] ** 2 + rows[1] ** 2).min() < 0.99
    else:
        sin, cos = spread.chunk(2, -1)
        assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-5)
        rsin, rcos = rows[0].chunk(2, -1)
        assert (rsin ** 2 + rcos ** 2).min() < 0.99


def test_the_rule_feeds_the_block_its_members_positions():
    """Inside a converted model: after a merge, each block's table is the rope at the mean position
    of the patches each token holds ('coords'), their mean rows ('rows'), or the row of the patch
    the token was kept for, which it holds ('target')."""
    base = rope_model("rope-reg-abs")
    x = images(base)
    tables = {}
    for variant in ("coords", "rows", "target"):
        model = convert(base, config=LtmConfig(ratio=0.5, positions=variant))
        captured = {}

        def grab(mod, args, kwargs, captured=captured):
            from ltm_convert.merge.state import state_of

            state = state_of(args[0])
            rule = mod.__dict__["_ltm_positions"]
            captured[mod.ltm_name] = (state, rule, rule.block_inputs(mod, dict(kwargs, x=args[0]), state, None)[0])

        handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for _, b in ltm_blocks(model)]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        state, rule, values = captured["blocks.2"]
        prefix = model.num_prefix_tokens
        tokens = state.sizes.shape[1] - prefix
        assert values["rope"].shape == (2, 1, tokens, 2 * 32)
        original = rule.adapter.table(rule.adapter.patch_coords(rule.grid, x.device).unsqueeze(0), values["rope"], 2)
        if variant == "coords":
            coords = rule.adapter.patch_coords(rule.grid, x.device)
            for b in range(2):
                for t in range(tokens):
                    members = (state.source[b] - prefix == t).nonzero()[:, 0]
                    want = rule.adapter.table(coords[members].mean(0)[None, None], values["rope"], 2)
                    assert torch.allclose(values["rope"][b, 0, t], want[0, 0, 0], atol=1e-5)
        elif variant == "rows":
            for b in range(2):
                for t in range(tokens):
                    members = (state.source[b] - prefix == t).nonzero()[:, 0]
                    assert torch.allclose(values["rope"][b, 0, t], original[0, 0, members].mean(0), atol=1e-6)
        else:
            origin = state.grid
            assert origin.shape == (2, tokens)
            held = state.source.gather(1, origin) - prefix  # the token holding each kept patch: itself
            assert torch.equal(held, torch.arange(tokens).expand(2, tokens))
            assert torch.equal(values["rope"], gather_rows(original[0, 0], origin))
        tables[variant] = values["rope"]
    assert not torch.allclose(tables["coords"], tables["rows"]) and not torch.allclose(tables["coords"], tables["target"])


@pytest.mark.parametrize("kind", ["dinov3", "hf-dinov3"])
def test_batch_independence_and_pickling(kind):
    import pickle

    model = convert(rope_model(kind), 0.5)
    x = images(model, batch=4, seed=3)
    full = outputs(model, x)
    singles = [outputs(model, x[i:i + 1]) for i in range(4)]
    for key in full:
        assert torch.allclose(full[key], torch.cat([s[key] for s in singles]), atol=1e-5), key
    again = outputs(pickle.loads(pickle.dumps(model)), x)  # the rules travel with the model
    for key in full:
        assert torch.equal(again[key], full[key]), key


def test_save_load_round_trip_replays_the_position_variant(tmp_path):
    from ltm_convert.io import load, save
    from ltm_convert.sources import load_model

    base = load_model("vit_small_patch16_dinov3", pretrained=False, depth=3, img_size=96, embed_dim=64, num_heads=2,
                      num_classes=5)
    model = convert(base, config=LtmConfig(ratio=0.6, positions="coords"))  # not the default
    x = images(model, batch=2)
    loaded = load(save(model, tmp_path / "rope.pt"))
    assert loaded.ltm_config.positions == "coords" and loaded.ltm_plan.family == "rotary"
    assert all(b.__dict__["_ltm_positions"].variant == "coords" for _, b in ltm_blocks(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    hf = convert(rope_model("hf-dinov3"), 0.6)
    again = load(save(hf, tmp_path / "hf"))
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).last_hidden_state, hf(pixel_values=x).last_hidden_state)


def test_torch_compile_fullgraph():
    model = convert(rope_model("dinov3"), 0.5)
    x = images(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_mlcd_is_refused_with_its_reason_and_others_stay_sequence():
    import timm
    import transformers as T

    config = T.MLCDVisionConfig(image_size=56, patch_size=14, hidden_size=64, num_attention_heads=2,
                                intermediate_size=128, num_hidden_layers=2)
    with pytest.raises(UnsupportedModelError, match="MLCD.*class token"):
        convert(T.MLCDVisionModel(config).eval(), 1.0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=3)
    assert find_blocks(vit).family == "sequence"


def test_grid_for_keeps_the_planned_aspect():
    assert grid_for(36, (96, 96)) == (6, 6)
    assert grid_for(24, (64, 96)) == (4, 6)
    assert grid_for(7, (96, 96)) is None


def test_unknown_position_variant_is_refused():
    from ltm_convert.errors import LtmError

    with pytest.raises(LtmError, match="unknown positions 'nearest'"):
        LtmConfig(positions="nearest")
