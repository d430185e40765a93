"""A converted model works wherever the original worked: the client code of timm, transformers and
torch that users already run, driven for real (issue: no state between calls, every client path)."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import timm
import torch
from model_zoo import hf_model, images_for, timm_model
from torch import nn

from ltm_convert.api import convert
from ltm_convert.errors import LtmError


def _vit(global_pool: str = "token", **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, num_classes=5,
                             global_pool=global_pool, class_token=global_pool != "avg", **kw).eval()


def test_one_model_called_from_four_threads():
    model = convert(_vit("avg"), 0.5)
    xs = [torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(60)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    barrier = threading.Barrier(4)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        barrier.wait()
        try:
            with torch.no_grad():
                for i in range(k, 60, 4):
                    results[i] = model(xs[i])
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) == 60
    for i in range(60):
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_timm_gradient_checkpointing_gives_the_same_gradients(reentrant, monkeypatch):
    import timm.layers.config as timm_cfg

    monkeypatch.setattr(timm_cfg, "_USE_REENTRANT_CKPT", reentrant)
    model = convert(_vit("avg"), 0.5).train()
    x = torch.randn(2, 3, 96, 96)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any(".ltm_" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_hf_gradient_checkpointing_enable():
    model = convert(hf_model("Dinov2Model"), 0.5).train()
    x = images_for(model, batch=2)

    def grads(on: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        if on:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
        model(pixel_values=x).last_hidden_state.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_forward_head_on_cached_features_equals_the_full_forward():
    model = convert(_vit("avg"), 0.5)
    x1, x2 = torch.randn(2, 3, 96, 96), torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        full = model(x1)
        feats = model.forward_features(x1)
        model(x2)  # another forward in between
        torch.testing.assert_close(model.forward_head(feats), full, rtol=0, atol=1e-6)


def _user_ops(f: torch.Tensor) -> dict[str, tuple[torch.Tensor, slice]]:
    """What users do to features between forward_features and forward_head (each drops any
    attribute riding on the tensor object)."""
    return {"clone": (f.clone(), slice(None)), "slice": (f[:2], slice(0, 2)),
            "cat": (torch.cat([f, f]), slice(None)), "+0": (f + 0, slice(None)),
            "double-float": (f.double().float(), slice(None)),
            "numpy": (torch.from_numpy(f.numpy().copy()), slice(None)),
            "plain": (f, slice(None)), "detach": (f.detach(), slice(None)), "contiguous": (f.contiguous(), slice(None))}


@pytest.mark.parametrize("pool,class_token", [("avg", False), ("avg", True), ("map", True), ("avgmax", False)])
def test_pooled_features_survive_what_users_do_to_tensors(pool, class_token):
    """A pooling head gets the patch tokens back on the full grid (each patch takes the value of the token
    holding it): the features have the original's shape and the original head pools them, so no side
    state can be lost. Before, every operation below silently gave the unweighted mean (cosine 0.67)."""
    torch.manual_seed(0)
    original = timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, img_size=96, num_classes=5,
                                 global_pool=pool, class_token=class_token).eval()
    model = convert(copy.deepcopy(original), 0.5)
    assert any(b.merges() for b in model.blocks)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        full = model(x)
        feats = model.forward_features(x)
        assert feats.shape == original.forward_features(x).shape
        for name, (g, rows) in _user_ops(feats).items():
            got = model.forward_head(g)
            want = full[rows] if name != "cat" else torch.cat([full, full])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
        # a hook on the final norm that returns a new tensor, inside the model's own forward
        handle = model.norm.register_forward_hook(lambda mod, args, out: out * 1.0)
        try:
            torch.testing.assert_close(model(x), full, rtol=0, atol=1e-6)
        finally:
            handle.remove()


def test_merged_features_save_and_load_weights_only(tmp_path):
    """torch.save(features) of a class-token model (merged tokens with their sizes) loads back with
    torch.load's default weights_only=True, sizes included."""
    from ltm_convert.merge.state import state_of

    model = convert(_vit(), 0.5)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert state_of(feats) is not None
    torch.save(feats, tmp_path / "f.pt")
    back = torch.load(tmp_path / "f.pt")
    torch.testing.assert_close(back, feats, rtol=0, atol=0)
    assert torch.equal(state_of(back).sizes, state_of(feats).sizes)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(back), model.forward_head(feats), rtol=0, atol=0)


def test_dinov2_classifier_gets_exactly_what_it_is_given():
    model = convert(hf_model("Dinov2ForImageClassification"), 0.5)
    x = images_for(model, batch=2)
    own = torch.randn(2, model.classifier.in_features)
    with torch.no_grad():
        model(pixel_values=x)
        model.dinov2(pixel_values=x)
        torch.testing.assert_close(model.classifier(own), nn.functional.linear(own, model.classifier.weight,
                                                                               model.classifier.bias))


def _replicate(model: nn.Module) -> nn.Module:
    """What torch.nn.parallel.replicate builds, on the CPU: every module's ``_replicate_for_data_parallel``
    (a shallow copy of its __dict__), linked to the replicated children, parameters shared."""
    clones = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for module, clone in clones.items():
        for name, child in module._modules.items():
            clone._modules[name] = clones[child] if child is not None else None
        for name, param in module._parameters.items():
            clone._parameters[name] = param
    return clones[model]


def test_data_parallel_style_replicas():
    model = convert(_vit("avg"), 0.5)
    replicas = [_replicate(model) for _ in range(3)]
    xs = [torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    out: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                out[i] = replicas[i](xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        torch.testing.assert_close(out[i], expected[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ViTModel", "DeiTForImageClassificationWithTeacher", "Dinov2Model",
                                  "CLIPVisionModel", "Dinov2WithRegistersModel", "SiglipVisionModel"])
def test_hf_output_hidden_states_has_one_state_per_layer(kind):
    original = hf_model(kind)
    model = convert(original, 0.5)
    x = images_for(model, batch=2)
    with torch.no_grad():
        ref = original(pixel_values=x, output_hidden_states=True).hidden_states
        got = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(got) == len(ref) > 1
    counts = [h.shape[1] for h in got]
    inner = counts[:-1]
    assert counts[0] == ref[0].shape[1] and inner == sorted(inner, reverse=True) and inner[-1] < counts[0]
    # the last state is the model's last_hidden_state where it returns one: back on the full grid, the
    # original's shape (each patch the value of the token holding it); otherwise the merged tokens
    has_sequence = hasattr(model(pixel_values=x), "last_hidden_state")
    assert counts[-1] == (ref[-1].shape[1] if has_sequence else counts[-1]) and (has_sequence or counts[-1] <= inner[-1])


def test_dinov2_concat_last_four_layers_recipe():
    model = convert(hf_model("Dinov2Model"), 0.5)
    x = images_for(model, batch=2)
    with torch.no_grad():
        states = model(pixel_values=x, output_hidden_states=True).hidden_states
    last4 = [model.layernorm(h) for h in states[-4:]]
    feats = torch.cat([h[:, 0] for h in last4] + [last4[-1][:, 1:].mean(1)], dim=-1)
    assert feats.shape == (2, 5 * model.config.hidden_size) and torch.isfinite(feats).all()


def test_hf_backbone_with_sequence_outputs_works_and_grid_outputs_are_full_grid_maps():
    from transformers import Dinov2Backbone

    config = hf_model("Dinov2Model").config
    backbone = Dinov2Backbone(config.__class__(**{**config.to_dict(), "out_features": ["stage2", "stage3"],
                                                  "out_indices": None, "reshape_hidden_states": False})).eval()
    converted = convert(backbone, 0.5)
    x = images_for(converted, batch=2)
    with torch.no_grad():
        maps = converted(pixel_values=x).feature_maps
    full = backbone(pixel_values=x).feature_maps[0].shape[1]
    # an intermediate stage keeps its merged tokens; the last block's output is spread back over the grid
    assert maps is not None and len(maps) == 2 and maps[0].shape[1] < full == maps[1].shape[1]
    converted.config.reshape_hidden_states = True  # switched on after conversion: one line, not a shape error
    with pytest.raises(LtmError, match="convert it with reshape_hidden_states=True"):
        converted(pixel_values=x)
    converted.config.reshape_hidden_states = False
    reshaping = Dinov2Backbone(config.__class__(**{**config.to_dict(), "out_features": ["stage2"],
                                                   "out_indices": None})).eval()
    dense = convert(reshaping, 0.5)  # its stage2 map is laid out on the grid: converted dense (tests/test_dense.py)
    with torch.no_grad():
        (grid,) = dense(pixel_values=x).feature_maps
    assert dense.ltm_plan.data["grid_reads"] == ["encoder.layer.1"] and grid.shape[-2:] == (8, 8)


@pytest.mark.parametrize("norm", [False, True])
def test_timm_nchw_intermediates_are_full_grid_maps(norm):
    model = convert(timm_model("dinov2"), 0.5, dense=True)  # the last block keeps patches (tests/test_dense.py)
    x = images_for(model, batch=2)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[0, 2], norm=norm, intermediates_only=True)
        final, inter = model.forward_intermediates(x, indices=2, norm=norm)
        tokens = model.forward_intermediates(x, indices=[2], norm=norm, output_fmt="NLC", intermediates_only=True)
    grid = model.patch_embed.grid_size
    assert [tuple(m.shape) for m in maps] == [(2, model.embed_dim, *grid)] * 2
    assert len(inter) == 2 and tuple(inter[-1].shape) == (2, model.embed_dim, *grid)
    # every original patch takes the value of the token it was merged into
    values = {tuple(v.tolist()) for v in maps[1][0].flatten(1).T.round(decimals=4)}
    merged = {tuple(v.tolist()) for v in tokens[0][0].round(decimals=4)}
    assert values <= merged and len(values) < grid[0] * grid[1]


def test_timm_feature_getter_net():
    from timm.models._features import FeatureGetterNet

    model = convert(timm_model("dinov2"), 0.5, dense=True)
    getter = FeatureGetterNet(model, out_indices=[1, 2])
    with torch.no_grad():
        feats = getter(images_for(model, batch=2))
    assert [tuple(f.shape[-2:]) for f in feats] == [tuple(model.patch_embed.grid_size)] * 2


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_pickle_round_trip(how):
    model = convert(_vit("avg"), 0.5)
    x = torch.randn(2, 3, 96, 96)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)  # the user's own file: their choice to unpickle it
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def _spawned(rank: int, model: nn.Module, x: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        torch.save(model(x), path)


def test_mp_spawn_receives_the_model(tmp_path):
    import torch.multiprocessing as mp

    model = convert(_vit("avg"), 0.5)
    x = torch.randn(2, 3, 96, 96)
    mp.spawn(_spawned, args=(model, x, str(tmp_path / "out.pt")), nprocs=1, join=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), model(x), rtol=0, atol=0)


def test_hf_save_pretrained_round_trip(tmp_path):
    from transformers import Dinov2ForImageClassification

    from ltm_convert.io import load

    model = convert(hf_model("Dinov2ForImageClassification"), 0.5)
    model.save_pretrained(tmp_path / "hf")
    restored = load(tmp_path / "hf")
    x = images_for(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(restored(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    plain = Dinov2ForImageClassification.from_pretrained(tmp_path / "hf")  # documented: the unconverted model
    assert not any(".ltm_" in n for n, _ in plain.named_parameters())


def test_quantize_dynamic_runs_and_agrees():
    model = convert(_vit("avg"), 0.5).eval()  # dynamic quantisation is for inference
    x = torch.randn(4, 3, 96, 96)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    # int8 projections can flip near-tied merge decisions of a random-weight model on single images
    # (ToFu flips the same image: 0.857), so the check is on the batch mean
    assert torch.nn.functional.cosine_similarity(out, ref).mean() > 0.93


def test_state_dict_of_another_schedule_is_refused():
    a, b = convert(_vit(), 0.8), convert(_vit(), 0.6)
    with pytest.raises(LtmError, match="another schedule"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(convert(_vit(), 0.6).state_dict())  # the same schedule loads


def test_bundled_model_data_config_matches_its_input():
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from ltm_convert.sources import load_model

    model = load_model("bundled")
    for m in (model, convert(model, 0.8, input_size=112)):
        cfg = resolve_model_data_config(m)
        x = create_transform(**cfg)(Image.new("RGB", (300, 200), (120, 30, 200)))[None]
        with torch.no_grad():
            assert m(x).shape == (1, 384)
        assert cfg["input_size"][1:] == tuple(m.ltm_config.input_size if hasattr(m, "ltm_config") else (224, 224))


def test_save_of_a_model_made_with_timm_create_model(tmp_path):
    from ltm_convert.io import load, save

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    converted = convert(model, 0.8)
    loaded = load(save(converted, tmp_path / "m.pt"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


def test_bf16_autocast_merge_decisions_are_made_in_float32():
    """Under bf16 autocast the metric and keep score are computed in float32 (bf16 rounding of near-equal
    cosines would decide merges at random). What remains is the attention's own bf16 rounding, which can
    flip a near-tie between two merges; LTM must be no more sensitive to it than ToMe."""
    from ltm_convert.sources import load_model
    from ltm_convert.images import sample_photos

    original = load_model("bundled")
    x = sample_photos(224)
    mask = convert(original, 0.5).blocks[3].ltm_mask
    z = torch.randn(2, 257, 384)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phi, learned = mask._project(z, 1)
    assert phi.dtype == torch.float32 and learned.dtype == torch.float32
    torch.testing.assert_close(phi, mask._project(z, 1)[0])

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            ref = m(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = m(x).float()
        return float(nn.functional.cosine_similarity(low, ref).mean())

    for ratio in (0.8, 0.5):
        assert agreement(convert(original, ratio)) >= agreement(convert(original, ratio, method="tome")) - 0.002


def test_cli_takes_a_checkpoint_with_its_own_head(tmp_path):
    import json

    from test_cli import assert_one_line_error, ok, run_cli

    torch.manual_seed(0)
    mine = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64)
    torch.save(mine.state_dict(), tmp_path / "my_2class.pth")
    # the head size is read from the checkpoint (README "Works with"), and recorded in the file
    ok(run_cli("convert", "vit_tiny_patch16_224", "--checkpoint", "my_2class.pth",
               "--model-kwargs", "img_size=64", "-o", "m.pt", cwd=tmp_path))
    recipe = json.loads(torch.load(tmp_path / "m.pt", weights_only=True)["ltm_recipe"])
    assert recipe["source"]["kwargs"] == {"num_classes": 2, "img_size": 64}
    from ltm_convert.io import load

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert load(tmp_path / "m.pt")(x).shape == (1, 2)
    # an explicit --num-classes the checkpoint contradicts is one line that names the right one
    line = assert_one_line_error(run_cli("convert", "vit_tiny_patch16_224", "--checkpoint", "my_2class.pth",
                                         "--num-classes", "3", "--model-kwargs", "img_size=64", "-o", "m3.pt",
                                         cwd=tmp_path))
    assert "--num-classes 2" in line


def test_single_channel_timm_model_converts_saves_and_loads(tmp_path):
    """timm keeps 3 channels in pretrained_cfg for ``in_chans=1``: the input is read from the first
    convolution, so tracing, FLOPs and a save/load round trip use 1-channel images."""
    from ltm_convert.io import load, save

    torch.manual_seed(0)
    model = convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, depth=2,
                                      img_size=64).eval(), 0.7)
    x = torch.randn(2, 1, 64, 64)
    save(model, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.pt")(x), model(x))


def test_timm_nchw_intermediates_with_prefix_tokens():
    """forward_intermediates(return_prefix_tokens=True) gives (map, prefix tokens) pairs: the maps are
    full-grid like without prefix tokens, the prefix tokens as the blocks left them."""
    original = _vit()
    model = convert(copy.deepcopy(original), 0.5, dense=True)  # the last block keeps patches (tests/test_dense.py)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=2, intermediates_only=True, return_prefix_tokens=True)
        ref = original.forward_intermediates(x, indices=2, intermediates_only=True, return_prefix_tokens=True)
        plain = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(got) == len(ref) == 2
    for (m, p), (rm, rp), pm in zip(got, ref, plain):
        assert m.shape == rm.shape and p.shape == rp.shape and torch.equal(m, pm)
