"""benchmarks/bench_mask_learning.py on a tiny generated photo folder (random small ViT): it trains
exactly the parameters it names, scores the held-out photos against the start, and its --soft,
--deep and --on-held options reach what they say."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from photo_folder import write_gradient_photos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_mask_learning.py"
SMALL = ["--model-spec", "vit_small_patch16_224", "--no-pretrained", "--model-kwargs", '{"depth": 3, "img_size": 64}',
         "--held-out", "6", "--allow-small", "--batch", "4", "--threads", "1"]


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_mask_learning", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_gradient_photos(tmp_path_factory.mktemp("photos"), 10, seed=1)


def _run(photos: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "run.json"
    assert _bench().main(["--images", str(photos), *SMALL, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_mask_only_trains_the_masks_and_reports_against_the_start(photos, tmp_path):
    run = _run(photos, tmp_path, "--params", "mask", "--lr", "1e-3", "--steps", "2", "--eval-every", "1")
    assert run["held_out"] == 6 and run["train"] == 4
    assert all("ltm_" in n for n in run["trained_tensors"])
    changed = run["changed_tensors"]
    assert any(n.endswith("ltm_mask.phi.weight") for n in changed)
    # the hard merge's keep choice is discrete: the keep term gets no gradient there
    assert not any("kappa" in n for n in changed)
    assert [e["step"] for e in run["evals"]] == [0, 1, 2]
    last = run["evals"][-1]
    assert last["minus_start"]["diff_mean_ci"][0] <= last["minus_start"]["diff_mean"] <= last["minus_start"]["diff_mean_ci"][1]
    assert abs(last["mean"] - run["evals"][0]["mean"] - last["minus_start"]["diff_mean"]) < 1e-9
    assert len(run["losses"]) == 2 and all(np.isfinite(run["losses"]))


def test_soft_merge_trains_the_keep_term(photos, tmp_path):
    run = _run(photos, tmp_path, "--params", "mask", "--soft", "--lr", "1e-3", "--steps", "2", "--eval-every", "2",
               "--deep", "1.0")
    assert any("kappa" in n for n in run["changed_tensors"])


def test_backbone_run_leaves_the_masks_alone(photos, tmp_path):
    run = _run(photos, tmp_path, "--params", "all", "--lr", "1e-4", "--steps", "1", "--on-held")
    assert run["changed_tensors"] and not any("ltm_" in n for n in run["changed_tensors"])
    assert not any("ltm_" in n for n in run["trained_tensors"])


def test_refuses_a_small_held_out_set_by_default(photos):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--images", str(photos), "--held-out", "20"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--held-out must be >= 300" in proc.stderr


def test_keep_fit_alone_is_scored_against_the_start(photos, tmp_path):
    run = _run(photos, tmp_path, "--fit-keep", "8", "--steps", "0")
    fit = run["evals"][-1]
    assert fit["after"] == "fit_keep" and fit["fit_keep"]["images"] == 8
    assert abs(fit["mean"] - run["evals"][0]["mean"] - fit["minus_start"]["diff_mean"]) < 1e-9
    # exactly the keep terms of the merging blocks change
    assert sorted(run["changed_tensors"]) == sorted(f"{b}.kappa.weight" for b in fit["fit_keep"]["blocks"])
    with pytest.raises(SystemExit):
        _bench().parse_args(["--images", str(photos), "--steps", "0"])
