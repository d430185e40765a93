"""Merge visualisation: source maps over ``records`` (pure), the real model on a real photo, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ltm_convert.errors import LtmError
from ltm_convert.tools.visualize import merge_trace, render, source_maps, visualize


def _records() -> list[dict]:
    """Two hand-made merging blocks over a 2x2 grid plus one prefix token: 4 -> 3 -> 2 tokens."""
    a1 = torch.tensor([[1.0, 0.0, 0.0],  # token 0 is target 0
                       [0.0, 1.0, 0.0],  # token 1 is target 1
                       [0.25, 0.75, 0.0],  # token 2 merges, mostly into target 1
                       [0.0, 0.0, 1.0]])[None]  # token 3 is target 2
    a2 = torch.tensor([[0.0, 0.0],
                       [0.0, 0.0],
                       [0.0, 0.0]])[None]
    a2[0, 0, 0] = 0.5  # token 0 splits over both targets
    a2[0, 0, 1] = 0.5
    a2[0, 1, 0] = 1.0  # target 0 is token 1
    a2[0, 2, 1] = 1.0  # target 1 is token 2
    return [
        {"block": "blocks.0", "tokens_in": 5, "targets": torch.tensor([[0, 1, 3]]), "assign": a1, "prefix": 1,
         "sizes_in": torch.ones(1, 4)},
        {"block": "blocks.1", "tokens_in": 4, "targets": torch.tensor([[1, 2]]), "assign": a2, "prefix": 1,
         "sizes_in": torch.tensor([[1.25, 1.75, 1.0]])},
    ]


def test_source_maps_are_products_of_the_assignments():
    recs = _records()
    maps = source_maps(recs)
    assert [tuple(m.shape) for m in maps] == [(1, 4, 3), (1, 4, 2)]
    assert torch.allclose(maps[0][0], recs[0]["assign"][0])
    assert torch.allclose(maps[1][0], recs[0]["assign"][0] @ recs[1]["assign"][0])
    trace = merge_trace(recs)
    assert trace.grid == (2, 2) and trace.prefix == 1 and trace.blocks == ["blocks.0", "blocks.1"]
    # column sums are the token sizes: block 0's match block 1's recorded sizes_in
    assert torch.allclose(trace.sizes[0], recs[1]["sizes_in"])
    assert torch.allclose(trace.sizes[1], torch.tensor([[1.75 + 0.625, 1.0 + 0.625]]))
    # anchors: the original patch of each target (target 1 of block 1 is block-0 target 2 = patch 3)
    assert trace.anchors[1].tolist() == [[1, 3]]
    assert trace.heatmap(-1, 1).tolist() == [[0.5, 0.0], [0.125, 1.0]]
    assert trace.partition().tolist() == [[0, 0], [0, 1]]
    assert trace.index("blocks.0") == 0 and trace.index(None) == 1 and trace.index(-2) == 0


def test_records_without_assign_or_from_different_passes_fail_clearly():
    recs = _records()
    recs[1]["assign"] = None
    with pytest.raises(LtmError, match="blocks.1 recorded no 'assign'.*cannot be visualised"):
        source_maps(recs)
    with pytest.raises(LtmError, match="merges no tokens"):
        source_maps([])
    recs = _records()
    recs[1]["assign"] = torch.ones(1, 5, 2)
    with pytest.raises(LtmError, match="do not come from one forward pass"):
        source_maps(recs)
    with pytest.raises(LtmError, match="out of range"):
        merge_trace(_records()).index(5)
    with pytest.raises(LtmError, match="does not merge"):
        merge_trace(_records()).index("blocks.7")


def test_render_synthetic_trace():
    trace = merge_trace(_records())
    crop = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    fig = render(trace, [crop], targets=2, title="t")
    assert fig.width > 4 * 32 and fig.height > 32


@pytest.fixture(scope="module")
def bundled_half():
    pytest.importorskip("skimage")
    from ltm_convert.api import convert
    from ltm_convert.sources.bundled import bundled_timm

    return convert(bundled_timm(), 0.5)


def test_bundled_real_model_on_chelsea(bundled_half, tmp_path):
    from skimage.data import chelsea

    from ltm_convert.tools.visualize import save_png

    fig, trace = visualize(bundled_half, [chelsea()], targets=3)
    out = save_png(fig, tmp_path / "chelsea.png")
    from types import SimpleNamespace

    from ltm_convert.merge.state import recording, state_of
    from ltm_convert.images import model_input

    with torch.no_grad(), recording() as records:  # the same forward, its records and final sizes
        feats = bundled_half.forward_features(model_input(bundled_half, [chelsea()]))
    ctx = SimpleNamespace(sizes=state_of(feats).sizes)

    # the PNG: one row, image + 3 heat-maps + partition panels of 224 px, colour bar; varied content
    png = Image.open(out)
    assert png.format == "PNG" and png.size == fig.size
    assert 5 * 224 < png.width < 5 * 224 + 200 and 224 < png.height < 224 + 120
    pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
    assert out.stat().st_size < 1_000_000

    # the numbers behind it: DINOv2 ViT-S/14 at 224 = 16x16 patches + 1 class token
    assert trace.grid == (16, 16) and trace.prefix == 1
    assert len(trace.blocks) == len(records) == 12
    for i, s in enumerate(trace.maps):
        assert s.shape == (1, 256, records[i]["assign"].shape[2])
        assert s.min().item() >= 0.0 and s.max().item() <= 1.0 + 1e-5  # heat-map values in [0, 1]
        assert torch.allclose(s.sum(dim=2), torch.ones(1, 256), atol=1e-4)  # every patch lands somewhere
        nxt = records[i + 1]["sizes_in"] if i + 1 < len(records) else ctx.sizes[:, trace.prefix:]
        assert torch.allclose(s.sum(dim=1), nxt.float(), atol=1e-3)  # column sum = token size
    # the last block before the class-token head collapses the patches into one token; the figure
    # shows the last block that keeps more than one
    li = trace.last_shown()
    assert li == len(trace.blocks) - 2 and trace.sizes[-1].shape[1] == 1
    after = records[li + 1]["sizes_in"] if li + 1 < len(records) else ctx.sizes[:, trace.prefix:]
    shown = [int(t) for t in trace.sizes[li][0].topk(3).indices]
    for t in shown:
        heat = trace.heatmap(li, t)
        assert heat.shape == (16, 16)
        assert abs(heat.sum().item() - after[0, t].item()) < 1e-3
        assert heat.sum().item() > 1.5  # the shown targets absorbed other patches
    labels = trace.partition()
    assert labels.min().item() >= 0 and labels.max().item() < trace.sizes[li].shape[1]


@pytest.fixture(scope="module")
def cli_app():
    from ltm_convert import cli
    from ltm_convert.commands import visualize as command

    names = {getattr(c, "name", None) or getattr(c.callback, "__name__", "") for c in cli.app.registered_commands}
    if "visualize" not in names:
        command.register(cli.app)
    return cli


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    yy, xx = np.mgrid[0:80, 0:100]
    arr = np.stack([xx * 2, yy * 3, ((xx // 20 + yy // 20) % 2) * 255], -1).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """Small saved LTM files (what `convert -o` / fine-tuning write), one per method."""
    from ltm_convert import convert, load_model, save
    from ltm_convert.merge.methods import method_names

    folder = tmp_path_factory.mktemp("saved")
    base = load_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3)
    return {m: save(convert(base, 0.5, method=m), folder / f"{m}.pt") for m in ("ltm", "tome") if m in method_names()}


@pytest.mark.parametrize("method", ["ltm", "tome"])
def test_cli_on_saved_files(cli_app, photo, saved_files, tmp_path, method, capsys):
    if method not in saved_files:
        pytest.skip(f"method {method} not registered")
    saved = saved_files[method]
    out = tmp_path / "vis.png"
    rc = cli_app.main(["visualize", str(saved), str(photo), str(photo), "--block", "0", "-k", "2", "-o", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "blocks.0" in text.out and out.is_file()
    png = Image.open(out)
    assert png.height > 2 * 64  # one row per image
    assert np.asarray(png).std() > 10


def test_cli_errors_are_one_line(cli_app, photo, saved_files, tmp_path, capsys):
    saved = saved_files["ltm"]
    cases = [
        (["--block", "9"], "out of range"),
        (["--block", "head"], "does not merge"),
        (["-o", str(tmp_path / "x.jpg")], "must end in .png"),
    ]
    for extra, message in cases:
        args = ["visualize", str(saved), str(photo), *extra]
        if "-o" not in extra:
            args += ["-o", str(tmp_path / "x.png")]
        rc = cli_app.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
