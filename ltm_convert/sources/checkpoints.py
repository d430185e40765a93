"""Read a user's checkpoint file: safetensors, or a torch file read with ``weights_only=True`` only.

This is the one weights-only reader of the package (io.py reads saved models through it too):
a file holding pickled Python objects is refused, never unpickled (that could run code).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ltm_convert.errors import LtmError

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")


def load_weights_only(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for every way it can fail: a
    file holding pickled objects is refused (never unpickled: that could run code), a damaged or
    foreign file is named as such."""
    import pickle
    import zipfile

    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": noise before the one-line error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LtmError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise LtmError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise LtmError(f"cannot read {what} {path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all mean one thing here
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "global" in text.lower():  # it names a class to import
            raise LtmError(f"{what} {path} contains pickled Python objects, refusing to load it (unpickling could run "
                           "code); ltm_convert reads only tensors: save a plain state_dict "
                           "(torch.save(model.state_dict(), f)) or safetensors") from None
        if _starts_pickle(p) and not zipfile.is_zipfile(p):
            raise LtmError(f"{what} {path} is a plain Python pickle (pickle.dump), not a torch file; ltm_convert does "
                           "not unpickle it (that could run code): save it with torch.save(model.state_dict(), f) "
                           "or as safetensors") from None
        weights_only = "Weights only load failed" in text  # torch's long advice; the bytes are simply not a torch file
        detail = "" if weights_only or not text else f" ({text.splitlines()[0][:120]})"
        raise LtmError(f"{what} {path} is corrupt or not a torch / safetensors file{detail}; pass a file written by "
                       "torch.save or safetensors") from None


def _starts_pickle(path: Path) -> bool:
    """A pickle stream's first bytes: the PROTO opcode and a protocol torch and Python write (2-5)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A state dict from ``.safetensors`` or a torch file, never executing pickled code.

    Torch files are read with ``weights_only=True`` only: a file holding arbitrary pickled
    objects is refused (unpickling them could run code). Common wrappers ({"state_dict": ...},
    {"model": ...}) and DDP's ``module.`` prefix are removed.
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise LtmError(f"checkpoint file {path} not found; pass the path of a .safetensors or .pt state-dict file")
    with open(p, "rb") as f:
        head = f.read(9)  # safetensors: an 8-byte header length, then the JSON header
    if p.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except Exception as e:  # SafetensorError has no stable public base class
            raise LtmError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}); re-save it") from None
    else:
        sd = load_weights_only(p, what="checkpoint")
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), sd)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LtmError(f"checkpoint {path} does not hold a state dict of tensors; save model.state_dict()")
    odd = next((k for k, v in sd.items() if v.layout != torch.strided or v.is_quantized), None)
    if odd is not None:
        raise LtmError(f"checkpoint {path} holds {odd} as a {str(sd[odd].layout).replace('torch.', '')} tensor; "
                       "save the dense weights (model.state_dict() of the float model)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def fit_state_dict(model: nn.Module, sd: dict, path: str | os.PathLike) -> dict:
    """``sd`` if it fits ``model`` exactly, else timm's own converter for the architecture (it
    maps official releases and resamples position embeddings), else a one-line LtmError."""
    problem = _mismatch(model, sd)
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if problem and callable(fn):
        try:
            converted = fn(dict(sd), model)
            if not _mismatch(model, converted):
                return converted
        except Exception:  # the converter is a best effort; report the original mismatch
            pass
    if problem:
        raise LtmError(f"checkpoint {path} does not fit {type(model).__name__}: {problem}; "
                       "check the model name and its options (num_classes, img_size)")
    return sd


def _mismatch(model: nn.Module, sd: dict) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    found = ((missing, "missing keys"), (extra, "unexpected keys"), (shape, "shape mismatches"))
    return ", ".join(f"{len(ks)} {what} (e.g. {ks[0]})" for ks, what in found if ks)


# --------------------------------------------------------------------------- reading back
