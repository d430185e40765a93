"""Dense heads get full-grid maps (issue 24 item 1): the ``dense`` conversion option keeps patch tokens
to the last block of a class-token model, and the FLOPs target still holds; saved with the config."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from model_zoo import DENSE_HF, check_intermediates_hold_their_tokens, dense_model, images_for, timm_model
from torch import nn

from ltm_convert.api import convert, describe, ltm_blocks
from ltm_convert.config import REACH_TOLERANCE, LtmConfig


def _spatial_std(maps: torch.Tensor) -> float:
    """Mean over images and channels of the spread of a (B, C, H, W) map over space."""
    return float(maps.flatten(2).std(dim=-1).mean())


def test_dense_keeps_patch_tokens_to_the_last_block_and_meets_the_flops_target():
    """A DINOv2-like class-token ViT (the bundled model's layout): by default its last block merges every
    patch into one token (its classifier reads the class token only); dense keeps patches there, and the
    schedule still meets the FLOPs target with that block merging like the others."""
    original = timm_model("dinov2")
    plain = describe(convert(copy.deepcopy(original), 0.5))
    model = convert(copy.deepcopy(original), 0.5, dense=True)
    info = describe(model)
    prefix = info["prefix_tokens"]
    assert plain["blocks"][-1]["tokens_out"] == prefix + 1 and not plain["dense"]
    assert info["dense"] and info["blocks"][-1]["tokens_out"] > prefix + 1
    assert abs(info["flops_ratio"] - 0.5) <= REACH_TOLERANCE * 0.5
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (last,) = model.forward_intermediates(x, indices=[2], intermediates_only=True)
        (ref,) = original.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert last.shape == ref.shape and _spatial_std(last) > 0.2 * _spatial_std(ref)


def test_dense_is_saved_with_the_model_and_old_configs_load_without_it(tmp_path):
    from ltm_convert.io import load, save

    old = LtmConfig(ratio=0.5, keep={"blocks.0": 3}).to_dict()
    old.pop("dense")
    assert LtmConfig.from_dict(old).dense is False
    model = convert(timm_model("dinov2"), 0.5, dense=True)
    save(model, tmp_path / "dense.pt")
    back = load(tmp_path / "dense.pt")
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(1))
    assert back.ltm_config.dense and describe(back)["blocks"] == describe(model)["blocks"]
    with torch.no_grad():
        torch.testing.assert_close(back.forward_intermediates(x, indices=1, intermediates_only=True),
                                   model.forward_intermediates(x, indices=1, intermediates_only=True))


def test_cli_convert_dense_then_inspect(tmp_path):
    """`ltm-convert convert --dense` writes a dense model; `inspect` says so."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ltm_convert.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)

    kwargs = ["--model-kwargs", "img_size=64", "--model-kwargs", "depth=3"]
    done = cli("convert", "vit_tiny_patch16_224", "--no-pretrained", *kwargs, "--ratio", "0.6", "--dense", "-o", "d.pt")
    assert done.returncode == 0, done.stderr
    shown = cli("inspect", "d.pt", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["dense"] is True and info["blocks"][-1]["tokens_out"] > info["prefix_tokens"] + 1
    text = cli("inspect", "d.pt")
    assert text.returncode == 0 and "dense" in text.stdout


# -- a class-token model not converted dense: its collapsed last block refuses full-grid maps -------------

def test_a_collapsed_last_block_refuses_full_grid_maps_in_one_line():
    """Before, the last block's NCHW map of a class-token model was silently one vector repeated
    (spatial std 0); now every client path that asks for it hears why, and the fix."""
    from timm.models._features import FeatureGetterNet

    from ltm_convert.errors import LtmError

    model = convert(timm_model("dinov2"), 0.5)
    x = torch.randn(2, 3, 98, 98)
    asks = {"forward_intermediates": lambda: model.forward_intermediates(x, indices=[2], intermediates_only=True),
            "get_intermediate_layers": lambda: model.get_intermediate_layers(x, n=1, reshape=True),
            "FeatureGetterNet": lambda: FeatureGetterNet(model, out_indices=[2])(x),
            # the token forms too (they handed out the one merged token, where the original has 49)
            "forward_intermediates NLC": lambda: model.forward_intermediates(x, indices=[2], output_fmt="NLC"),
            "get_intermediate_layers tokens": lambda: model.get_intermediate_layers(x, n=1, return_prefix_tokens=True)}
    for name, ask in asks.items():
        with pytest.raises(LtmError) as caught:
            with torch.no_grad():
                ask()
        message = str(caught.value)
        assert "\n" not in message and "dense=True" in message and "--dense" in message, name
    with torch.no_grad():  # the blocks before it are still there, as maps and as tokens
        (earlier,) = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        (tokens,) = model.get_intermediate_layers(x, n=[1])
    assert _spatial_std(earlier) > 0 and tokens.shape == (2, 49, earlier.shape[1])


# -- timm client paths, dense --------------------------------------------------------------------------

def _timm_paths(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every timm client path that hands out the blocks' outputs on the patch grid, as NCHW maps or as
    NLC tokens, the last block included."""
    from timm.models._features import FeatureGetterNet

    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1, 2])
        pairs = model.forward_intermediates(x, indices=2, intermediates_only=True, return_prefix_tokens=True)
        as_dict = model.forward_intermediates(x, indices=[2], output_dict=True, return_prefix_tokens=True)
        layers = model.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True)
        getter = FeatureGetterNet(model, out_indices=[1, 2])(x)
        nlc = model.forward_intermediates(x, indices=[2, 0], output_fmt="NLC", norm=True, intermediates_only=True)
        tokens = model.get_intermediate_layers(x, n=3, return_prefix_tokens=True)  # reshape=False: NLC
        nlc_dict = model.forward_intermediates(x, indices=[1], output_fmt="NLC", output_dict=True)
    out = {"class token": final[:, 0], **{f"maps{i}": m for i, m in enumerate(maps)}}  # (final: merged tokens)
    out.update({f"pairs{i}": m for i, (m, _) in enumerate(pairs)})
    out.update({f"prefix{i}": p for i, (_, p) in enumerate(pairs)})
    out["dict"] = as_dict["image_intermediates"][0]
    out.update({f"layers{i}": m for i, (m, _) in enumerate(layers)})
    out.update({f"getter{i}": m for i, m in enumerate(getter)})
    out.update({f"nlc{i}": t for i, t in enumerate(nlc)})
    out.update({f"tokens{i}": t for i, (t, _) in enumerate(tokens)})
    out.update({f"token prefix{i}": p for i, (_, p) in enumerate(tokens)})
    out["nlc dict"] = nlc_dict["image_intermediates"][0]
    return out


def _over_patches(value: torch.Tensor) -> float:
    """Spread over space of a (B, C, H, W) map or of (B, P, C) patch tokens."""
    return _spatial_std(value) if value.dim() == 4 else float(value.std(dim=1).mean())


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_timm_client_paths_give_full_grid_maps(ratio):
    original = timm_model("dinov2")
    model = convert(copy.deepcopy(original), ratio, dense=True)
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(2))
    got, ref = _timm_paths(model, x), _timm_paths(original, x)
    assert got.keys() == ref.keys()
    for name, value in got.items():
        assert value.shape == ref[name].shape and torch.isfinite(value).all(), name
        if ratio == 1.0:
            torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-4, msg=name)
        elif value.dim() == 4 or name.startswith(("nlc", "tokens")):
            assert _over_patches(value) > 0.2 * _over_patches(ref[name]), name


def test_timm_dense_token_outputs_hold_every_patch_at_its_token():
    """forward_intermediates(output_fmt="NLC") and get_intermediate_layers(reshape=False) of a dense model
    handed out the merged tokens (10, 6, 4 of 16 patches); now every patch slot holds the value of the token
    it was merged into, in NLC layout, and the NCHW maps are the same values laid out on the grid."""
    original = timm_model("dinov2")
    model = convert(copy.deepcopy(original), 0.5, dense=True)
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(4))
    merged = check_intermediates_hold_their_tokens(
        model, lambda: model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True))
    assert merged == 2  # every block merged; the last one hands its tokens out spread itself (dense)
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, n=3)
        maps = model.get_intermediate_layers(x, n=3, reshape=True)
        ref = original.get_intermediate_layers(x, n=3)
    for t, m, r in zip(tokens, maps, ref):
        assert t.shape == r.shape == (2, 49, 384)
        assert torch.equal(m.flatten(2).transpose(1, 2), t)


def test_dense_forward_features_has_the_original_shape():
    """dense=True handed out full-grid maps but forward_features still returned the merged tokens
    ((2, 5, 192) against (2, 17, 192)): user code that reshapes its patch tokens to the grid broke.
    The last block now spreads its tokens too; the class token and the logits are unchanged in kind."""
    original = timm_model("dinov2")
    model = convert(copy.deepcopy(original), 0.5, dense=True).eval()
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, ref = model.forward_features(x), original.forward_features(x)
        final, _ = model.forward_intermediates(x, indices=1)
        assert got.shape == ref.shape == final.shape
        prefix = model.num_prefix_tokens
        last = [b for _, b in ltm_blocks(model)][-1]
        kept = describe(model)["blocks"][-1]["tokens_out"] - prefix
        assert all(len(torch.unique(got[b, prefix:], dim=0)) == kept for b in range(2))  # every patch holds its token
        assert last.ltm_full_grid_out
        torch.testing.assert_close(model.forward_head(got), model(x))


def test_timm_features_only_converts_dense():
    """timm.create_model(features_only=True) (a FeatureGetterNet around the ViT) was refused; it converts,
    dense, and its maps are full-grid."""
    import timm

    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, features_only=True,
                                 out_indices=(1, 2)).eval()

    original = build()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = original(x)
        same = convert(build(), 1.0)(x)
        model = convert(build(), 0.6)
        got = model(x)
    for a, b in zip(same, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    info = describe(model)
    assert info["dense"] and abs(info["flops_ratio"] - 0.6) <= REACH_TOLERANCE * 0.6
    assert info["blocks"][-1]["tokens_out"] < info["blocks"][0]["tokens_in"]
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.isfinite(a).all() and _spatial_std(a) > 0.2 * _spatial_std(b)



def test_timm_features_only_saves_loads_and_converts_from_the_cli(tmp_path):
    """A converted features_only ViT could not be saved ("cannot tell how to rebuild this
    FeatureGetterNet"): its recipe now records features_only and out_indices, also where timm pruned
    the blocks after the last output; the file loads to the same maps. The CLI builds one from
    --model-kwargs."""
    import timm

    from ltm_convert.io import load, save

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for indices in ((1, 2), (0,)):  # (0,): timm keeps one block of three
        torch.manual_seed(0)
        model = convert(timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=64,
                                          features_only=True, out_indices=indices), 0.7).eval()
        save(model, tmp_path / "f.pt")
        loaded = load(tmp_path / "f.pt").eval()
        assert type(loaded).__name__ == "FeatureGetterNet" and len(loaded.model.blocks) == len(model.model.blocks)
        assert loaded.ltm_source.kwargs["out_indices"] == list(indices)
        with torch.no_grad():
            for a, b in zip(loaded(x), model(x)):
                assert torch.equal(a, b)
    done = subprocess.run([sys.executable, "-m", "ltm_convert.cli", "convert", "vit_tiny_patch16_224", "--no-pretrained",
                           "--model-kwargs", "img_size=64", "--model-kwargs", "depth=3", "--model-kwargs", "features_only=true",
                           "--model-kwargs", "out_indices=[1,2]", "--ratio", "0.7", "-o", "c.pt"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    cli_model = load(tmp_path / "c.pt").eval()
    assert describe(cli_model)["dense"]
    with torch.no_grad():
        maps = cli_model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 4)] * 2

# -- HF models that lay hidden states out on the grid --------------------------------------------------

def _maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The dense outputs: feature maps, depth map, segmentation logits or pose heatmaps."""
    with torch.no_grad():
        out = model(pixel_values=x)
    maps = getattr(out, "feature_maps", None)
    if maps is not None:
        return list(maps)
    return [next(getattr(out, k) for k in ("predicted_depth", "logits", "heatmaps") if getattr(out, k, None) is not None)]


def _over_space(m: torch.Tensor) -> float:
    return _spatial_std(m) if m.dim() == 4 else float(m.flatten(1).std(dim=-1).mean())  # a depth map is (B, H, W)


@pytest.mark.parametrize("kind", sorted(DENSE_HF))
def test_hf_models_that_reshape_hidden_states_convert_dense(kind):
    """Refused before ("lays block outputs out on the 2-D patch grid"); now the blocks whose outputs the
    model reads on the grid hand them out spread over it: equal at 1.0, full-grid and varied below."""
    ratio = DENSE_HF[kind]
    original = dense_model(kind)
    x = images_for(original, batch=2)
    ref = _maps(original, x)
    same = _maps(convert(copy.deepcopy(original), 1.0), x)
    model = convert(copy.deepcopy(original), ratio)
    got = _maps(model, x)
    for a, b in zip(same, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    info = describe(model)
    assert info["dense"] and model.ltm_plan.data["grid_reads"]
    assert abs(info["flops_ratio"] - ratio) <= REACH_TOLERANCE * ratio
    assert info["blocks"][-1]["tokens_out"] < info["blocks"][0]["tokens_in"]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.isfinite(a).all() and _over_space(a) > 0.05 * _over_space(b)
    if hasattr(original.config, "out_features"):  # a backbone's map: every patch holds the value of its token
        kept = info["blocks"][-1]["tokens_out"] - info["prefix_tokens"]
        last = got[-1][0].flatten(1).T
        assert len(torch.unique(last, dim=0)) == kept


@pytest.mark.parametrize("kind", ["DPTForDepthEstimation", "DepthAnythingForDepthEstimation"])
def test_dense_hf_models_save_and_load(kind, tmp_path):
    from ltm_convert.io import load, save

    model = convert(dense_model(kind), DENSE_HF[kind])
    x = images_for(model, batch=2)
    save(model, tmp_path / "m.pt")
    model.save_pretrained(tmp_path / "hf")
    for saved in (tmp_path / "m.pt", tmp_path / "hf"):
        back = load(saved)
        assert back.ltm_plan.data["grid_reads"] == model.ltm_plan.data["grid_reads"]
        torch.testing.assert_close(_maps(back, x)[0], _maps(model, x)[0], rtol=0, atol=0)


def test_cli_converts_a_saved_hf_dpt_directory(tmp_path):
    from ltm_convert.io import load

    original = dense_model("DPTForDepthEstimation")
    original.save_pretrained(tmp_path / "dpt")
    done = subprocess.run([sys.executable, "-m", "ltm_convert.cli", "convert", f"hf:{tmp_path / 'dpt'}", "--ratio",
                           "0.6", "-o", "dpt_ltm.pt", "--json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model"] == "DPTForDepthEstimation" and info["dense"] and "grid" in info["head"]
    assert abs(info["flops_ratio"] - 0.6) <= REACH_TOLERANCE * 0.6
    model = load(tmp_path / "dpt_ltm.pt")
    x = images_for(model, batch=2)
    (depth,), (ref,) = _maps(model, x), _maps(original, x)
    assert depth.shape == ref.shape and torch.isfinite(depth).all() and _over_space(depth) > 0.05 * _over_space(ref)


def test_bench_unmerge_runs_and_reports_the_share(tmp_path):
    """benchmarks/bench_unmerge.py (the numbers in benchmarks/README.md), on a tiny ViT."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_unmerge.py"
    out = tmp_path / "unmerge.json"
    done = subprocess.run([sys.executable, str(script), "--model", "vit_tiny_patch16_224", "--batch", "1", "--repeats",
                           "2", "--json", str(out)], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["maps"] for r in rows] == ["all blocks", "last 4 blocks"]
    for row in rows:
        assert row["gathers_s"] > 0 and len(row["unmerge_share"]) == 3 and abs(row["flops_ratio"] - 0.5) < 0.01


def test_timm_features_only_converts_at_another_input_size():
    """convert(features_only model, input_size=64) failed as "torch.export could not trace" (the ViT
    inside the wrapper kept its 224 px table); it is resized as a plain timm ViT is, and saves."""
    import tempfile

    import timm

    from ltm_convert.io import load, save

    torch.manual_seed(0)
    model = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, features_only=True,
                                      out_indices=(1, 2)), 0.7, input_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = model(x)
        assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 4)] * 2
        with tempfile.TemporaryDirectory() as tmp:
            save(model, f"{tmp}/f.pt")
            for a, b in zip(load(f"{tmp}/f.pt").eval()(x), maps):
                assert torch.equal(a, b)
