"""benchmarks/bench_quality.py end to end on a tiny generated image folder (random small model, no
real photo folder), its statistics and probes on synthetic features, and the ToMe parity option behind
method ``tome_odd`` (default parity unchanged, odd parity merges differently)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltm_convert.api import convert, describe, ltm_blocks
from ltm_convert.merge.baselines import ToMeMask
from ltm_convert.merge.baselines.common import bipartite_match, merge_round, rounds
from ltm_convert.merge.methods import method_names
from ltm_convert.model_inputs import run_model
from ltm_convert.sources import load_model
from photo_folder import write_gradient_photos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_quality.py"
SMALL = {"depth": 3, "img_size": 64}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def image_dir(tmp_path):
    """12 small photos-to-be (smooth colour gradients + noise, varied sizes) and a stray text file."""
    folder = write_gradient_photos(tmp_path / "photos", 12)
    (folder / "README.md").write_text("not an image")
    return folder


def test_split_is_deterministic_and_written(image_dir, tmp_path):
    bench = _bench()
    names = bench.list_images(image_dir)
    assert len(names) == 12 and "README.md" not in names
    held, train = bench.split_names(names, 8, seed=0)
    assert (held, train) == bench.split_names(list(reversed(names)), 8, seed=0)
    assert sorted(held + train) == names and len(held) == 8
    assert bench.split_names(names, 8, seed=1)[0] != held
    out = tmp_path / "train_split"
    bench.write_train_split(out, image_dir, bench.split_record(image_dir, held, train, 0))
    assert sorted(p.name for p in (out / "images").iterdir()) == train
    assert (out / "images" / train[0]).read_bytes() == (image_dir / train[0]).read_bytes()
    assert json.loads((out / "split.json").read_text())["held_out"] == held


def test_end_to_end(image_dir, tmp_path):
    from ltm_convert.io import save

    bench = _bench()
    names = bench.list_images(image_dir)
    held, train = bench.split_names(names, 8, seed=0)
    (tmp_path / "expected.json").write_text(json.dumps(bench.split_record(image_dir, held, train, 0)))
    torch.manual_seed(0)
    extra = convert(load_model("vit_tiny_patch16_224", pretrained=False, **SMALL), 0.7, method="tome_odd")
    save(extra, tmp_path / "extra.pt")
    out_json, split_dir = tmp_path / "result.json", tmp_path / "split"
    cmd = [sys.executable, str(SCRIPT), "--images", str(image_dir), "--allow-small", "--held-out", "8",
           "--model-spec", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", json.dumps(SMALL),
           "--methods", "ltm", "tome", "tome_odd", "--ratios", "0.8", "--no-fmnist", "--threads", "2",
           "--extra", f"odd70={tmp_path / 'extra.pt'}", "--write-train-split", str(split_dir),
           "--verify-split", str(tmp_path / "expected.json"), "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | ratio |" in proc.stdout and "| tome_odd | 0.8 |" in proc.stdout
    res = json.loads(out_json.read_text())
    assert {"args", "versions", "split", "rows", "timings", "table"} <= set(res)
    assert res["split"]["held_out"] == held and res["n_train_split"] == 4
    assert json.loads((split_dir / "split.json").read_text())["held_out"] == held
    assert sorted(p.name for p in (split_dir / "images").iterdir()) == train
    rows = {(r["method"], r["ratio"]): r for r in res["rows"]}
    assert set(rows) == {("ltm", 0.8), ("tome", 0.8), ("tome_odd", 0.8), ("odd70", 0.7)}
    assert rows[("odd70", 0.7)]["trained_method"] == "tome_odd"
    for r in rows.values():
        assert len(r["cosines"]) == 8
        assert all(-1 <= c <= 1 for c in r["cosines"])
        for key in ("mean", "p5", "min"):
            assert -1 <= r[key] <= 1
        assert r["min"] <= r["p5"] <= r["mean"] + 1e-12
        assert abs(r["flops_ratio"] - r["ratio"]) <= 0.03
        cmp_ = r["vs_tome"]
        for key in ("diff_mean", "diff_p5"):
            lo, hi = cmp_[key + "_ci"]
            assert -2 <= lo <= cmp_[key] + 1e-12 and cmp_[key] <= hi + 1e-12 and hi <= 2
    assert rows[("tome", 0.8)]["vs_tome"]["diff_mean"] == 0 and rows[("tome", 0.8)]["vs_tome"]["diff_p5_ci"] == [0, 0]


def test_bad_args(image_dir):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--images", str(image_dir), "--held-out", "8"])  # < 300 without --allow-small


# -- statistics and probes on synthetic features ------------------------------------------------

def test_paired_bootstrap():
    bench = _bench()
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.5, 1.0, 300)
    same = bench.paired_bootstrap(ref, ref, seed=0)
    assert same["diff_mean"] == 0 and same["diff_mean_ci"] == [0, 0] and same["diff_p5_ci"] == [0, 0]
    shifted = bench.paired_bootstrap(ref + 0.01, ref, seed=0)
    assert shifted["diff_mean"] == pytest.approx(0.01) and shifted["diff_mean_ci"] == pytest.approx([0.01, 0.01])
    noisy = bench.paired_bootstrap(ref + rng.normal(0.002, 0.01, 300), ref, seed=0)
    lo, hi = noisy["diff_mean_ci"]
    assert lo < noisy["diff_mean"] < hi and hi - lo < 0.01
    assert bench.paired_bootstrap(ref * 0.9, ref, seed=3) == bench.paired_bootstrap(ref * 0.9, ref, seed=3)


def _blobs(n, d=16, classes=4, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_probes_separable_and_chance():
    bench = _bench()
    xtr, ytr = _blobs(200)
    xte, yte = _blobs(100, seed=1)
    assert bench.knn_accuracy(xtr, ytr, xte, yte) == 1.0
    assert bench.linear_probe_accuracy(xtr, ytr, xte, yte) == 1.0
    # labels unrelated to the features: both probes fall to about chance (1/4)
    g = torch.Generator().manual_seed(5)
    noise_tr, noise_te = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    ytr_r, yte_r = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    assert bench.knn_accuracy(noise_tr, ytr_r, noise_te, yte_r) < 0.45
    assert bench.linear_probe_accuracy(noise_tr, ytr_r, noise_te, yte_r) < 0.45


# -- ToMe parity (method tome_odd) --------------------------------------------------------------

def _old_bipartite_match(metric, r):
    """The matching as written before the parity option (A = even, B = odd), copied verbatim."""
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return src, node_idx.gather(1, src), order[:, r:], node_max, order


def _reference_round(x, s, metric, r, parity):
    """One ToMe round from the paper with explicit index lists and a Python loop (independent of
    the vectorised code): output = cat(kept A tokens by descending score, size-weighted B)."""
    m = x.shape[1]
    ia, ib = list(range(parity, m, 2)), list(range(1 - parity, m, 2))
    outs, sizes = [], []
    for bi in range(x.shape[0]):
        scores = metric[bi, ia] @ metric[bi, ib].T
        best, partner = scores.max(-1)
        order = best.argsort(descending=True)
        sums = x[bi, ib] * s[bi, ib, None]
        size = s[bi, ib].clone()
        for j in order[:r].tolist():
            sums[partner[j]] += x[bi, ia[j]] * s[bi, ia[j]]
            size[partner[j]] += s[bi, ia[j]]
        kept = [ia[j] for j in order[r:].tolist()]
        outs.append(torch.cat([x[bi, kept], sums / size[:, None]]))
        sizes.append(torch.cat([s[bi, kept], size]))
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("m", [20, 21])
def test_default_parity_unchanged_and_odd_parity_matches_reference(m):
    g = torch.Generator().manual_seed(m)
    metric = torch.nn.functional.normalize(torch.randn(3, m, 8, generator=g), dim=-1)
    x, s = torch.randn(3, m, 8, generator=g), torch.rand(3, m, generator=g) + 0.5
    new = bipartite_match(metric, 7)
    for got, want in zip((new.src, new.dst, new.unm, new.score, new.order), _old_bipartite_match(metric, 7)):
        assert torch.equal(got, want)
    assert torch.equal(bipartite_match(metric, 7, parity=0).src, new.src)
    for parity in (0, 1):
        match = bipartite_match(metric, 7, parity=parity)
        out, sizes, _ = merge_round(x, s, metric, match)
        ref_out, ref_sizes = _reference_round(x, s, metric, 7, parity)
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(sizes, ref_sizes)
    assert not torch.equal(bipartite_match(metric, 7, parity=1).src, new.src)


def test_rounds_odd_parity_respect_a_size():
    assert rounds(21, 5) == rounds(21, 5, 0)
    for m in range(2, 40):
        for keep in range(1, m + 1):
            left = m
            for step in rounds(m, keep, parity=1):
                assert 1 <= step <= left // 2  # |A| = floor(M / 2) odd tokens
                left -= step
            assert left == keep


def test_tome_odd_merges_differently(tmp_path):
    from ltm_convert.io import load, save

    assert {"tome", "tome_odd"} <= set(method_names())
    torch.manual_seed(0)
    base = load_model("vit_tiny_patch16_224", pretrained=False, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    models = {m: convert(base, 0.5, method=m) for m in ("tome", "tome_odd")}
    assert all(b.ltm_mask.parity == 0 for _, b in ltm_blocks(models["tome"]))
    assert all(b.ltm_mask.parity == 1 for _, b in ltm_blocks(models["tome_odd"]))
    assert describe(models["tome"])["blocks"] == describe(models["tome_odd"])["blocks"]  # same schedule
    targets = {}
    for name, model in models.items():
        from ltm_convert.merge.state import recording

        with torch.no_grad(), recording() as records:
            run_model(model, x)
        targets[name] = [rec["targets"] for rec in records]
        first = records[0]
        m, keep = first["assign"].shape[1:]
        if keep >= (m + 1) // 2:  # one round: every B token survives as a target
            b_tokens = set(range(1 if name == "tome" else 0, m, 2))
            assert all(b_tokens <= set(row.tolist()) for row in first["targets"])
    assert any(not torch.equal(a, b) for a, b in zip(targets["tome"], targets["tome_odd"]))
    with torch.no_grad():
        assert not torch.allclose(models["tome"](x), models["tome_odd"](x))
        # ratio 1.0 merges nothing, whatever the parity
        assert torch.allclose(convert(base, 1.0, method="tome_odd")(x), base(x), atol=1e-5)
    save(models["tome_odd"], tmp_path / "odd.pt")
    loaded = load(tmp_path / "odd.pt")
    assert loaded.ltm_config.method == "tome_odd" and isinstance(dict(ltm_blocks(loaded)).popitem()[1].ltm_mask, ToMeMask)
    with torch.no_grad():
        assert torch.equal(loaded(x), models["tome_odd"](x))


def test_calibration_photos_must_not_be_held_out(image_dir, tmp_path):
    """A calibrated schedule measured on held-out photos would be tuned on the test set: refused
    before any model is loaded."""
    bench = _bench()
    with pytest.raises(SystemExit, match="held-out photos"):
        bench.main(["--images", str(image_dir), "--allow-small", "--held-out", "8", "--no-fmnist",
                    "--schedule", "calibrated", "--calibration-images", str(image_dir)])
    with pytest.raises(SystemExit, match="only applies with --schedule calibrated"):
        bench.main(["--images", str(image_dir), "--allow-small", "--held-out", "8", "--no-fmnist",
                    "--calibration-images", str(image_dir)])


def test_position_variants_of_a_rotary_model_are_compared_per_photo(image_dir, tmp_path):
    """``METHOD:POSITIONS`` rows and ``--reference``: the comparison of issue 23's position variants."""
    out_json = tmp_path / "result.json"
    tiny = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)
    cmd = [sys.executable, str(SCRIPT), "--images", str(image_dir), "--allow-small", "--held-out", "8",
           "--model-spec", "vit_small_patch16_dinov3", "--no-pretrained", "--model-kwargs", json.dumps(tiny),
           "--methods", "ltm", "ltm:coords", "ltm:target", "tome:coords", "--reference", "ltm", "--ratios", "0.8",
           "--no-fmnist", "--threads", "2", "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"ltm", "ltm:coords", "ltm:target", "tome:coords"}
    assert all(r["vs_reference"]["reference"] == "ltm" for r in rows.values())
    assert rows["ltm"]["vs_reference"]["diff_mean"] == 0
    assert rows["ltm:coords"]["cosines"] != rows["ltm"]["cosines"]  # the variant really changed the model
    assert "ltm:coords@0.8 vs ltm: mean" in proc.stderr
