"""Training checkpoints: plain tensors / dicts written atomically, read with weights_only=True.

Holds everything exact resumption needs: model, optimizer, scheduler, grad scaler, EMA, IB state,
RNG states (torch CPU/CUDA as tensors, python and numpy as tensors + JSON), and the data position
(epoch, step in epoch, global step). A fingerprint of the model (parameter names and shapes plus
the LTM schedule) guards against resuming another model's run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ltm_convert.errors import LtmError

FORMAT = 1


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    config = getattr(model, "ltm_config", None)
    keep = getattr(config, "keep", None)
    if keep:
        h.update(json.dumps(keep, sort_keys=True).encode())
    return h.hexdigest()[:32]


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_meta": json.dumps([py[0], py[2]]),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, gauss = json.loads(state["python_meta"])
    random.setstate((version, tuple(int(v) for v in state["python_state"].tolist()), gauss))
    name, pos, has_gauss, cached = json.loads(state["numpy_meta"])
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LtmError(f"no checkpoint at {path}; start without --resume")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise LtmError(f"{path} is not a readable training checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise LtmError(f"{path} is not an ltm_convert training checkpoint")
    if data.get("fingerprint") != fingerprint(model):
        raise LtmError(f"{path} was written for another model (its parameters or token schedule differ); "
                       "resume with the model it was trained from, or start a new run")
    return data
