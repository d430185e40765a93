#!/usr/bin/env bash
# Install the offline Fashion-MNIST (Debian package dataset-fashion-mnist) used by the fine-tuning
# demo, tests and benchmark. Tolerant: does nothing when the files are already there, and only
# warns (exit 0) when it cannot install (not root, no apt-get, no network).
#
#   bash scripts/setup_data.sh
set -uo pipefail

DIR="${LTM_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
log() { printf '[setup_data] %s\n' "$*" >&2; }

have() {
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        [ -f "$DIR/$f" ] || return 1
    done
}

if have; then
    log "Fashion-MNIST already installed under $DIR"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "warning: apt-get not found; install the Debian package dataset-fashion-mnist by hand"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        log "warning: not root; run 'apt-get install -y dataset-fashion-mnist' as root (fine-tuning tests will skip)"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1; then
    $SUDO apt-get update >/dev/null 2>&1 || true
    $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || true
fi
if have; then
    log "installed Fashion-MNIST under $DIR"
else
    log "warning: could not install dataset-fashion-mnist; fine-tuning tests that need it will skip"
fi
exit 0
