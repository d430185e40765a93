"""torchrun --nproc_per_node 2 (gloo, CPU) reaches the same weights as one process with the same
global batch (DistributedSampler shards, DDP averages gradients, IB statistics are all-reduced)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_finetune import synthetic, quiet
    from ltm_convert.io import load
    from ltm_convert.finetune import Trainer
    work = sys.argv[1]
    model = load({model!r})
    tr = Trainer(model, synthetic(32), quiet(epochs=1, eval_before=True, save_every=0, device="cpu"), work)
    assert tr.dist.world == int(os.environ.get("WORLD_SIZE", "1"))
    hist = tr.fit()
    if tr.dist.main:
        torch.save(model.state_dict(), os.path.join(work, "final.pt"))
        torch.save(torch.tensor([h["agreement"] for h in hist if h["type"] == "eval"]), os.path.join(work, "evals.pt"))
    tr.close()
""")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from ltm_convert.api import convert
    from ltm_convert.io import save
    from ltm_convert.sources import load_model

    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=64, global_pool="avg", num_classes=10)
    return save(convert(model, 0.5), tmp_path_factory.mktemp("model") / "tiny.pt")


def test_torchrun_two_processes_match_one(tiny_file, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), model=str(tiny_file)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    start = torch.load(tiny_file, weights_only=True)["state_dict"]
    moved = [k for k in a if ".ltm_" in k and not torch.equal(a[k], start[k])]
    assert moved, "training changed no ltm_ parameter"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(torch.load(tmp_path / "two" / "evals.pt"), torch.load(tmp_path / "one" / "evals.pt"),
                               rtol=0, atol=1e-6)
