"""Which failures are the user's: the CLI's error boundary turns them into one line and exit 2.

A user can cause more than :class:`LtmError`: a file nested thousands of levels deep, a model too
large for memory, an output path the system does not accept, options the model library itself
rejects while building or loading the model, a weights file that is not weights-only. Each is
recognised here by what it is *and where it came from*, so that the same exception type raised by
a bug in ltm_convert's own code still reaches the user as an internal error (exit 1, with the
``LTM_DEBUG`` hint). Importing this module stays light: no torch, timm or transformers.
"""
from __future__ import annotations

import os
import pickle
import traceback
from types import TracebackType
from typing import Optional

from ltm_convert.errors import LtmError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ltm_convert

# ltm_convert's own code that reads what the user names (model sources, saved models, checkpoints,
# data sets): a failure raised inside a library below one of these is about the user's input
_LOADERS = ("sources" + os.sep, "io.py", os.path.join("finetune", "data.py"),
            os.path.join("finetune", "scratch_data.py"), os.path.join("finetune", "checkpoint.py"))

# libraries that build and load models, and what they are called in a message
_LIBRARIES = {"timm": "timm", "transformers": "transformers", "huggingface_hub": "transformers",
              "safetensors": "safetensors", "torch": "torch", "datasets": "datasets", "pyarrow": "datasets",
              "PIL": "Pillow", "json": "the JSON reader"}

# what only code that is wrong raises, whatever the input: a bug of ours even deep inside a library
_CODING_ERRORS = (NameError, ImportError, SyntaxError)

_DATA_READERS = ("datasets", "pyarrow", "PIL", "json")

_FULL = (27, 28, 30, 122)  # file too large, no space left, read-only file system, quota exceeded

_NO_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory",
              "defaultcpuallocator", "failed to allocate")


def user_error(exc: BaseException) -> Optional[str]:
    """The one-line message of a failure the user can fix, or None for a bug."""
    if isinstance(exc, LtmError):
        return str(exc)
    if _out_of_memory(exc):
        return ("out of memory: the model or the data does not fit on this machine; use a smaller model, "
                "--input-size or --batch-size")
    if isinstance(exc, RecursionError):
        if _from_input(exc) or "decoding" in str(exc) or "JSON" in str(exc):
            return ("an input is nested too deeply to read (a JSON file or option nested thousands of levels); "
                    "check the files and --model-kwargs given")
        return None
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and (exc.filename is not None or
                                                                          exc.errno in _FULL)):
        return _os_error(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return (f"a weights file could not be read weights-only (it holds something other than tensors, or it is "
                f"damaged): {_first_line(exc)}; re-save it as safetensors or as a plain state_dict")
    library = _library_below_loader(exc)
    if library is not None:
        return _rejected_by(library, exc)
    return None


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _NO_MEMORY)


def _os_error(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    if isinstance(exc, PermissionError):
        return f"permission denied{where}; choose another path"
    if exc.errno in _FULL:
        return f"{what}{where}; free space or choose another output location"
    return f"{what}{where}; check the path (for an output, choose another location)"


def _frames(tb: Optional[TracebackType]) -> list[str]:
    return [os.path.abspath(f.filename) for f in traceback.extract_tb(tb)]


def _ours(filename: str) -> Optional[str]:
    """The path inside the ltm_convert package, or None for a file outside it."""
    if filename.startswith(_PACKAGE + os.sep):
        return filename[len(_PACKAGE) + 1:]
    return None


def _library_of(filename: str) -> Optional[str]:
    """The top-level package a file belongs to, if it is one of :data:`_LIBRARIES` (installed
    packages, or the standard library's json)."""
    parts = filename.split(os.sep)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("site-packages", "dist-packages") or parts[i].startswith("python3"):
            name = parts[i + 1][:-3] if parts[i + 1].endswith(".py") else parts[i + 1]
            return name if name in _LIBRARIES else None
    return None


def _library_below_loader(exc: BaseException) -> Optional[str]:
    """The library that raised ``exc`` when it was called by ltm_convert's code that reads the user's
    input (a model source, a saved file, a data set); None when the failure is in our own code."""
    frames = _frames(exc.__traceback__)
    ours = [i for i, f in enumerate(frames) if _ours(f) is not None]
    if isinstance(exc, _CODING_ERRORS) or not frames or not ours or ours[-1] == len(frames) - 1:
        return None  # raised by ltm_convert itself (or nowhere we can see): a bug, not an input
    if not _ours(frames[ours[-1]]).startswith(_LOADERS):
        return None
    below = (_library_of(f) for f in frames[ours[-1] + 1:])
    return next((lib for lib in below if lib is not None), None)


def _from_input(exc: BaseException) -> bool:
    """Whether a failure happened while reading input: below our loaders, or in the JSON reader."""
    frames = _frames(exc.__traceback__)
    return any((_ours(f) or "").startswith(_LOADERS) or _library_of(f) == "json" for f in frames)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _rejected_by(library: str, exc: BaseException) -> str:
    name = _LIBRARIES[library]
    text = " ".join(str(exc).split())
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return (f"{name} could not load the weights: a tensor in the weights file has another shape than the model its "
                "config describes; use the config the weights were saved with")
    if isinstance(exc, AssertionError) and not text:
        entry = traceback.extract_tb(exc.__traceback__)[-1]
        text = (entry.line or "an internal check failed").strip()
    text = text or type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    if library in _DATA_READERS:
        return f"{name} could not read the input: {text}; check the files given"
    return (f"{name} rejected the model's options or files: {text}; check the model options (--model-kwargs, "
            "--num-classes, --input-size), the config file, or the weights")
