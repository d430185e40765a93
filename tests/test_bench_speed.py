"""The speed benchmarks cannot rot: bench_gpu.py --smoke runs the same code on CPU (tiny ViT, batch 4;
compile rows through dynamo's fullgraph capture with the eager backend); bench_train.py --tiny times the
real Trainer step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_bench_train_tiny_times_the_real_trainer_step(tmp_path):
    """benchmarks/bench_train.py on a tiny random ViT: one row per model and merge, student time =
    step - teacher forward, FLOPs ratios near the targets; timed on the cpu clock (one thread)."""
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--batch", "4",
                           "--ratios", "0.5", "--steps", "2", "--clock", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 threads" in proc.stdout and "CPU seconds" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["merge"]) for r in rows] == [("original", "hard"), ("ltm@0.5", "hard"),
                                                        ("ltm@0.5", "relaxed"), ("tome@0.5", "hard")]
    assert rows[0]["flops_ratio"] == 1.0 and all(0.45 < r["flops_ratio"] < 0.55 for r in rows[1:])
    assert all(0 < r["teacher_s"] < r["step_s"] and abs(r["student_s"] - (r["step_s"] - r["teacher_s"])) < 1e-9
               for r in rows)


def test_bench_deploy_tiny_onnx_against_its_own_original(tmp_path):
    """benchmarks/bench_deploy.py: exported, verified and timed in onnxruntime against the exported original."""
    out = tmp_path / "deploy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_deploy.py"), "--tiny", "--batch", "4",
                           "--ratios", "0.5", "--repeats", "2", "--runtimes", "onnx", "--clock", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runtime"], r["model"]) for r in rows] == [("onnx", "ltm@0.5"), ("onnx", "tome@0.5")]
    assert all(0.45 < r["flops_ratio"] < 0.55 and r["speedup"] > 0 and len(r["pairs"]) == 2 for r in rows)


def test_cpu_clock_counts_work_not_waiting():
    """time_steps(clock="cpu") on a shared machine: CPU seconds of this process, which do not advance
    while the process waits (here: sleeps; on a loaded machine: is descheduled); refused with several
    threads, where OpenMP workers' spin-waits would count as work."""
    import time

    import torch

    from ltm_convert.tools.bench import clock_fn as _clock

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu, wall = _clock("cpu"), _clock("wall")
        c0, w0 = cpu(), wall()
        time.sleep(0.3)
        assert wall() - w0 >= 0.29 and cpu() - c0 < 0.05
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="one thread"):
            _clock("cpu")
    finally:
        torch.set_num_threads(threads)


def test_bench_train_interleaved_pairs_every_round(tmp_path):
    """bench_train.py --interleave: every trainer is timed once per round, and a row's speed-up is the
    median over rounds of the original's student time over its own (each less that round's teacher)."""
    import statistics

    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--batch", "4",
                           "--ratios", "0.5", "--methods", "ltm", "--no-relaxed", "--steps", "3", "--interleave",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["original", "ltm@0.5"]
    orig, ltm = rows
    teacher = orig["teacher_samples_s"]
    assert len(teacher) == len(orig["samples_s"]) == len(ltm["samples_s"]) == 3
    expected = statistics.median((o - t) / (s - t) for o, s, t in zip(orig["samples_s"], ltm["samples_s"], teacher))
    assert abs(ltm["student_speedup"] - expected) < 1e-9 and orig["student_speedup"] == 1.0
    assert abs(ltm["of_ideal"] - expected * ltm["flops_ratio"]) < 1e-9
