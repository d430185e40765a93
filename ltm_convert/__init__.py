"""ltm_convert: swap a vision transformer's blocks for Learnable Token Merging blocks.

Importing the package stays light: nothing here imports torch, timm or transformers, or touches CUDA;
the public names below are resolved on first use. Importing it also teaches timm the ``ltm_<name>``
models (``timm.create_model("ltm_vit_small_patch16_224", ratio=0.8)``), as soon as timm is imported
(timm_registry.py).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "convert",
    "find_blocks",
    "save",
    "load",
    "load_model",
    "create_model",
    "LtmConfig",
    "LtmError",
    "count_flops",
    "__version__",
]

_LAZY = {
    "convert": ("ltm_convert.api", "convert"),
    "find_blocks": ("ltm_convert.api", "find_blocks"),
    "save": ("ltm_convert.io", "save"),
    "load": ("ltm_convert.io", "load"),
    "load_model": ("ltm_convert.sources", "load_model"),
    "create_model": ("ltm_convert.create", "create_model"),
    "LtmConfig": ("ltm_convert.config", "LtmConfig"),
    "LtmError": ("ltm_convert.errors", "LtmError"),
    "count_flops": ("ltm_convert.flops", "count_flops"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ltm_convert' has no attribute {name!r}")


def _teach_timm() -> None:
    from ltm_convert import timm_registry

    timm_registry.install()


_teach_timm()
