"""benchmarks/bench_scratch.py (the train-from-scratch claim in miniature) and benchmarks/fmnist.py
(the Fashion-MNIST idx reader, class-balanced subsets, the image-folder writer), on a tiny fake
idx.gz set written to tmp_path: nothing here needs the real dataset."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltm_convert.errors import LtmError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scratch.py"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


@pytest.fixture(scope="module")
def fm():
    return _module("fmnist")


@pytest.fixture
def fake(fm, tmp_path):
    return fm.write_fake(tmp_path / "fmnist", n_train=40, n_val=20, seed=3)


def test_reader_reads_what_was_written(fm, fake):
    images, labels = fm.load_split(fake, "train")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]
    images_v, labels_v = fm.load_split(fake, "val")
    assert images_v.shape == (20, 28, 28) and len(labels_v) == 20
    assert (images[:, 0] == 255).all(axis=1)[labels == 0].all()  # class 0's bar is the top rows


def test_balanced_subset_is_balanced_and_deterministic(fm):
    labels = np.repeat(np.arange(10), [50] * 9 + [3])  # class 9 is short
    pick = fm.balanced_subset(labels, 32, seed=1)  # 3 each, the first two classes one more
    assert np.bincount(labels[pick], minlength=10).tolist() == [4, 4] + [3] * 8
    assert (pick == fm.balanced_subset(labels, 32, seed=1)).all()
    assert not (pick == fm.balanced_subset(labels, 32, seed=2)).all()
    assert len(set(pick.tolist())) == 32 and (np.diff(pick) > 0).all()
    short = fm.balanced_subset(labels, 100, seed=1)  # 10 per class wanted, class 9 has 3: filled from the rest
    assert len(set(short.tolist())) == 100 and np.bincount(labels[short])[9] == 3
    assert len(fm.balanced_subset(labels, None, seed=1)) == len(labels)


def test_image_folder_is_written_whole_and_never_over_data(fm, fake, tmp_path):
    data = fm.subsets(fake, 20, 10, seed=0)
    out = fm.write_image_folder(tmp_path / "folder", data)
    for split, n in (("train", 20), ("val", 10)):
        files = sorted((out / split).rglob("*.png"))
        assert len(files) == n and {f.parent.name for f in files} == set(fm.CLASSES)
    first = sorted((out / "train" / fm.CLASSES[0]).glob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), data["train"][int(first.stem)][0])
    with pytest.raises(LtmError, match="already exists"):
        fm.write_image_folder(out, data)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".folder")] == []  # no temporary left


def test_missing_data_is_one_line_saying_how_to_get_it(fm, tmp_path):
    with pytest.raises(LtmError, match="dataset-fashion-mnist"):
        fm.check_data(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST not found") and "apt-get" in lines[0]


def test_statistics_pair_by_seed_and_call_ties():
    bench = _module("bench_scratch")
    runs = [{"model": "m", "arm": arm, "regime": "epochs", "seed": s, "top1": top, "flops": fl, "train_seconds": 1.0,
             "steps": 10} for arm, fl, tops in (("original", 100, [0.50, 0.60, 0.70]), ("ltm", 80, [0.52, 0.63, 0.71]),
                                                ("tome", 80, [0.49, 0.61, 0.72]))
            for s, top in zip((0, 1, 2), tops)]
    rows = {r["arm"]: r for r in bench.summarise(runs, "m", "epochs")}
    assert rows["ltm"]["diffs"] == pytest.approx([0.02, 0.03, 0.01])
    assert rows["ltm"]["verdict"] == "better"  # +0.02 mean, spread 0.01: outside the spread
    assert rows["tome"]["verdict"] == "tie"  # +0.0033 mean against a spread of 0.015
    assert bench.verdict([-0.03, -0.02, -0.04]) == "worse" and bench.verdict([0.01]) == "n/a (one seed)"
    assert "HOLDS" in bench.claim_line(list(rows.values()), "m", "epochs")
    assert "does NOT hold" in bench.claim_line([rows["original"], rows["tome"]], "m", "epochs")


def test_smoke_end_to_end(fake, tmp_path):
    """The real benchmark in a subprocess through the training API: both regimes, every arm, a table and a JSON."""
    out = tmp_path / "scratch.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(fake), "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "| model | arm | regime | FLOPs (M) |" in text and "load" in text and "at start" in text and "at the end" in text
    for regime in ("epochs", "time"):
        for arm in ("original", "ltm", "tome"):
            assert f"| vit | {arm} | {regime} |" in text
        assert f"vit, equal {regime}: 'merged beats unmerged'" in text
    assert "measured images/s" in text and "not assumed from FLOPs" in text
    res = json.loads(out.read_text())
    assert len(res["load_start"]) == 3 and len(res["load_end"]) == 3
    epochs = [r for r in res["runs"] if r["regime"] == "epochs"]
    assert sorted((r["arm"], r["seed"]) for r in epochs) == sorted((a, s) for a in ("original", "ltm", "tome") for s in (0, 1))
    assert {(r["arm"], r["seed"]) for r in res["runs"] if r["regime"] == "time"} == {(a, s) for a in ("ltm", "tome")
                                                                                      for s in (0, 1)}
    for r in res["runs"]:
        assert 0 <= r["top1"] <= 1 and r["steps"] >= 1 and r["img_s"] > 0 and r["flops"] > 0
    by_arm = {(r["arm"], r["regime"]): r for r in res["summary"]}
    base = by_arm[("original", "epochs")]["flops"]
    for arm in ("ltm", "tome"):
        row = by_arm[(arm, "epochs")]
        assert row["flops"] < base and len(row["diffs"]) == 2 and row["verdict"] in ("better", "worse", "tie")
        plan = res["equal_time_vit"][arm]
        assert plan["speed_ratio"] > 0 and plan["epochs"] >= 1
        steps = {r["steps"] for r in res["runs"] if r["arm"] == arm and r["regime"] == "time"}
        assert steps == {plan["max_steps"] or plan["epochs"] * epochs[0]["steps_per_epoch"]}
