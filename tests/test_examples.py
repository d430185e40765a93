"""Every script in examples/ runs offline, exits 0 and prints what it promises.

The scripts start together (one torch thread each) so the whole file takes about as long as the
slowest example on a 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
TIMEOUT = 600

# what each example must print (besides its final "ok"); examples added later only need "ok"
EXPECTED = {
    "convert_timm.py": ["MFLOPs (ratio", "reloaded: max diff 0.0e+00"],
    "convert_hf.py": ["Dinov2Model", "last_hidden_state"],
    "custom_rewriter.py": ["rewritten by 'mixer': blocks.0, blocks.1, blocks.2, blocks.3", "top-k 8"],
    "visualize_merging.py": ["patches ->", "wrote"],
    "finetune_image_folder.py": ["eval after step", "trained parameters:", "saved and reloaded: max diff 0.0e+00"],
    "compare_methods.py": ["| ltm | 0.65 |", "| tome | 0.65 |", "| tofu | 0.65 |", "| ltmp | 0.65 |"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env.pop("LTM_DEBUG", None)
    started = {}
    for script in EXAMPLES:
        cwd = tmp_path_factory.mktemp(script.stem)
        args = [str(cwd / "merges.png")] if script.name == "visualize_merging.py" else []
        started[script.name] = (subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cwd)
    done = {}
    for name, (proc, cwd) in started.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), cwd)
    return done


def test_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert set(EXPECTED) <= names, sorted(names)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, runs):
    proc, cwd = runs[script.name]
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "ok", proc.stdout[-2000:]
    for text in EXPECTED.get(script.name, []):
        assert text in proc.stdout, f"{script.name} did not print {text!r}:\n{proc.stdout[-2000:]}"
    if script.name == "visualize_merging.py":
        assert (cwd / "merges.png").stat().st_size > 1000
