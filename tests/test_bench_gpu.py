"""benchmarks/bench_gpu.py cannot rot: its --smoke mode runs the same code on CPU (tiny ViT, batch 4;
compile rows through dynamo's fullgraph capture with the eager backend) and prints every table row."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_prints_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--json", str(out),
                           "--md", str(tmp_path / "gpu.md")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    modes = {(r.split("|")[2].strip().split(" ")[0], r.split("|")[3].strip()) for r in rows}
    assert {("eager", "original"), ("eager", "ltm"), ("eager", "tome"), ("compile", "original"), ("compile", "ltm"),
            ("compile", "tome")} <= modes
    assert any("ltm@0.5" in r for r in rows) and any("original (converted at 1.0)" in r for r in rows)
    assert "skipped" not in proc.stdout
    result = json.loads(out.read_text())
    speed = [r for r in result["rows"] if r.get("method") == "ltm"]
    assert speed and all(0.45 < r["flops_ratio"] < 0.55 and r["speedup"] > 0 for r in speed)
    assert (tmp_path / "gpu.md").read_text().count("| tiny |") == len(rows)


def test_bench_gpu_refuses_without_a_gpu_unless_smoke():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no GPU")
