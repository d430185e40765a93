"""The exit-code sweep: every command meets hostile inputs (missing and random-bytes files, JSON nested
thousands of levels deep, options the model library rejects, wrong option values, outputs under /proc)
and answers each with exit status 2, exactly one stderr line starting with ``error:`` and no traceback.

Most cases call ``ltm_convert.cli.main`` in this process (one import, tiny inputs: quick on 2 cores);
one case per command runs the real CLI in a subprocess, where library output that bypasses Python's
streams (progress bars, C-level prints) would show. Failures that are bugs in ltm_convert itself must
still say so: exit 1 and the ``LTM_DEBUG`` hint.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_cli import TINY, assert_one_line_error, run_cli

DEEP = 5000  # far past Python's recursion limit, well inside one command-line argument
SMALL = ["--no-pretrained", "--model-kwargs", "depth=1", "-s", "32"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """A folder of hostile inputs next to one tiny valid saved model and an image folder."""
    from PIL import Image
    from safetensors.torch import save_file

    from ltm_convert.api import convert
    from ltm_convert.io import save
    from ltm_convert.sources import load_model

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = load_model(TINY, pretrained=False, depth=1, img_size=32, embed_dim=64, num_heads=2, num_classes=3)
    save(convert(model, 0.7), root / "tiny.pt")
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 30), (40 * i, 90, 30)).save(root / "imgs" / c / f"{i}.png")
    rng = random.Random(0)
    (root / "rand.pt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (root / "rand.png").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    deep_object = '{"a":' * DEEP + "1" + "}" * DEEP
    for folder, name in (("nested", "ltm_config.json"), ("hfnested", "config.json"), ("dsnested", "dataset_info.json")):
        (root / folder).mkdir()
        (root / folder / name).write_text(deep_object)
    vit = {"model_type": "vit", "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
           "intermediate_size": 16, "image_size": 32, "patch_size": 8}
    (root / "hftype").mkdir()
    (root / "hftype" / "config.json").write_text(json.dumps({**vit, "hidden_size": "abc"}))
    (root / "hfsize").mkdir()
    (root / "hfsize" / "config.json").write_text(json.dumps(vit))
    save_file({"embeddings.patch_embeddings.projection.weight": torch.zeros(5, 3, 8, 8)},
              str(root / "hfsize" / "model.safetensors"))
    (root / "dsbad").mkdir()
    (root / "dsbad" / "dataset_dict.json").write_text('{"splits": ')
    return root


NESTED_KWARG = ["--model-kwargs", "x=" + "[" * DEEP + "]" * DEEP]

CASES = {
    # convert
    "convert-unknown-model": ["convert", "no_such_model_xyz", "--no-pretrained", "--dry-run"],
    "convert-nested-kwargs": ["convert", TINY, "--no-pretrained", "--dry-run", *NESTED_KWARG],
    "convert-nested-hf-config": ["convert", "hf:hfnested", "--no-pretrained", "--dry-run"],
    "convert-hf-validation": ["convert", "hf:hftype", "--no-pretrained", "--dry-run"],
    "convert-hf-size-mismatch": ["convert", "hf:hfsize", "--dry-run"],
    "convert-timm-assertion": ["convert", TINY, "--no-pretrained", "--dry-run", "--model-kwargs", "num_heads=5",
                               "--model-kwargs", "depth=1"],
    "convert-proc-output": ["convert", TINY, *SMALL, "-o", "/proc/x.pt"],
    "convert-proc-output-dir": ["convert", TINY, *SMALL, "-o", "/proc/ltm_out"],
    "convert-topk-with-tome": ["convert", TINY, *SMALL, "--dry-run", "--method", "tome", "--topk", "3"],
    "convert-ratio-nan": ["convert", TINY, *SMALL, "--dry-run", "--ratio", "nan"],
    "convert-random-checkpoint": ["convert", TINY, *SMALL, "--dry-run", "--checkpoint", "rand.pt"],
    "convert-calibration-empty": ["convert", TINY, *SMALL, "--dry-run", "--schedule", "calibrated",
                                  "--calibration-images", "nested"],
    # inspect
    "inspect-missing": ["inspect", "missing.pt"],
    "inspect-random-bytes": ["inspect", "rand.pt"],
    "inspect-nested-config": ["inspect", "nested"],
    "inspect-nested-hf-config": ["inspect", "hf:hfnested", "--no-pretrained"],
    # bench
    "bench-random-bytes": ["bench", "rand.pt", "--no-agreement"],
    "bench-nested-config": ["bench", "nested", "--no-agreement"],
    "bench-batch-0": ["bench", "tiny.pt", "--batch-size", "0", "--no-agreement"],
    "bench-batch-huge": ["bench", "tiny.pt", "--batch-size", "100000000", "--no-agreement"],
    "bench-bad-dtype": ["bench", "tiny.pt", "--dtype", "int3", "--no-agreement"],
    # export
    "export-random-bytes": ["export", "rand.pt", "-o", "x.onnx"],
    "export-nested-config": ["export", "nested", "-o", "x.onnx"],
    "export-proc-output": ["export", "tiny.pt", "-o", "/proc/x.onnx"],
    "export-not-onnx": ["export", "tiny.pt", "-o", "x.txt"],
    # visualize
    "visualize-random-image": ["visualize", "tiny.pt", "rand.png", "-o", "v.png"],
    "visualize-missing-image": ["visualize", "tiny.pt", "missing.png", "-o", "v.png"],
    "visualize-random-model": ["visualize", "rand.pt", "imgs/a/0.png", "-o", "v.png"],
    "visualize-proc-output": ["visualize", "tiny.pt", "imgs/a/0.png", "-o", "/proc/v.png"],
    # finetune
    "finetune-random-model": ["finetune", "rand.pt", "--data", "imgs", "-o", "t.pt"],
    "finetune-nested-model": ["finetune", "nested", "--data", "imgs", "-o", "t.pt"],
    "finetune-proc-output": ["finetune", "tiny.pt", "--data", "imgs", "-o", "/proc/t.pt"],
    "finetune-data-is-a-file": ["finetune", "tiny.pt", "--data", "rand.pt", "-o", "t.pt"],
    "finetune-data-nested": ["finetune", "tiny.pt", "--data", "dsnested", "-o", "t.pt"],
    "finetune-data-damaged": ["finetune", "tiny.pt", "--data", "dsbad", "-o", "t.pt"],
    "finetune-fit-keep-huge": ["finetune", "tiny.pt", "--data", "imgs", "-o", "t.pt", "-b", "4", "--no-progress",
                               "--fit-keep", "1000000000"],
    "finetune-epochs-negative": ["finetune", "tiny.pt", "--data", "imgs", "-o", "t.pt", "--epochs", "-1"],
}

# one per command through the real CLI in a subprocess
SUBPROCESS = ["convert-hf-size-mismatch", "convert-proc-output", "inspect-nested-config", "bench-random-bytes",
              "export-proc-output", "visualize-random-image", "finetune-data-nested"]

NEEDLES = {  # what the line must name, where the old message said something else or nothing
    "convert-nested-kwargs": "nested too deeply",
    "convert-nested-hf-config": "nested too deeply",
    "inspect-nested-config": "nested too deeply",
    "convert-hf-validation": "hidden_size",
    "convert-hf-size-mismatch": "shape",
    "convert-timm-assertion": "num_heads",
    "convert-proc-output": "/proc",
    "convert-topk-with-tome": "--topk",
    "export-proc-output": "/proc",
    "visualize-proc-output": "/proc",
    "finetune-proc-output": "/proc",
    "finetune-fit-keep-huge": "at most 56",
    "bench-batch-huge": "at most 4096",
}

OUTPUTS = ("t.pt", "t.pt.run", "v.png", "x.onnx", "x.txt")


def _in_process(args: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    from ltm_convert import cli

    monkeypatch.delenv("LTM_DEBUG", raising=False)
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def _check(code: int, out: str, err: str, case: str) -> str:
    detail = f"{case}: exit {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    lines = err.splitlines()
    assert code == 2, detail
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), detail
    assert "Traceback" not in err + out, detail
    if case in NEEDLES:
        assert NEEDLES[case] in lines[0], detail
    return lines[0]


@pytest.mark.parametrize("case", [c for c in CASES if c not in SUBPROCESS])
def test_hostile_input_exits_2_with_one_line(case, hostile, monkeypatch, capfd):
    code, out, err = _in_process(CASES[case], hostile, monkeypatch, capfd)
    _check(code, out, err, case)
    assert not any((hostile / name).exists() for name in OUTPUTS), "a failed command wrote its output"


@pytest.mark.parametrize("case", SUBPROCESS)
def test_hostile_input_through_the_real_cli(case, hostile):
    proc = run_cli(*CASES[case], cwd=hostile)
    _check(proc.returncode, proc.stdout, proc.stderr, case)
    assert not any((hostile / name).exists() for name in OUTPUTS)
    assert_one_line_error(proc)


def test_allocation_failures_are_the_users_not_bugs(hostile, monkeypatch, capfd):
    """torch's allocator reports RuntimeError, not MemoryError: either way it is a model or batch too
    large for the machine (exit 2), said in one line."""
    import ltm_convert.commands.convert as command

    def huge(*_args, **_kwargs):
        torch.empty(2 ** 40, dtype=torch.uint8)  # 1 TiB: the allocator refuses it
        raise AssertionError("the allocation above was expected to fail")

    monkeypatch.setattr(command, "resolve_model", huge)
    code, out, err = _in_process(["convert", TINY, "--dry-run"], hostile, monkeypatch, capfd)
    assert "out of memory" in _check(code, out, err, "allocation")


def test_our_own_failures_stay_internal_errors(hostile, monkeypatch, capfd):
    """The same exception types, raised by ltm_convert's own code or by a library it calls outside
    model loading, are bugs: exit 1 with the LTM_DEBUG hint, not a user error."""
    import timm

    import ltm_convert.api as api
    import ltm_convert.commands.convert as command

    def ours(*_args, **_kwargs):
        assert False, "an invariant of ours"

    monkeypatch.setattr(api, "describe", ours)
    code, out, err = _in_process(["convert", TINY, *SMALL, "--dry-run"], hostile, monkeypatch, capfd)
    assert code == 1 and err.strip().startswith("error: AssertionError") and "LTM_DEBUG=1" in err, err
    monkeypatch.undo()

    def misuse(*_args, **_kwargs):  # a library rejecting what our (non-loading) code passed it
        return timm.create_model(TINY, pretrained=False, depth=1, num_heads=5)

    monkeypatch.setattr(command, "resolve_model", misuse)
    code, out, err = _in_process(["convert", TINY, "--dry-run"], hostile, monkeypatch, capfd)
    assert code == 1 and "LTM_DEBUG=1" in err and len(err.splitlines()) == 1, err


def test_user_error_classifier():
    """The boundary's rules one by one (commands/_errors.py)."""
    import pickle

    from ltm_convert.commands._errors import user_error
    from ltm_convert.errors import LtmError

    assert user_error(LtmError("x")) == "x"
    assert "out of memory" in user_error(MemoryError())
    assert "out of memory" in user_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of memory" in user_error(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory"))
    assert user_error(RuntimeError("boom")) is None
    assert "weights-only" in user_error(pickle.UnpicklingError("Weights only load failed"))
    assert "/proc/x" in user_error(FileNotFoundError(2, "No such file or directory", "/proc/x"))
    assert user_error(ValueError("plain")) is None
    with pytest.raises(RecursionError) as nested:
        json.loads("[" * DEEP + "]" * DEEP)
    assert "nested too deeply" in user_error(nested.value)
