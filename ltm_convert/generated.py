"""Generated subclasses: a model's own class extended in place, picklable by name.

Conversion swaps a module's class for a subclass of it (a block that merges, an attention that
takes a bias), so the module keeps its children, parameters, hooks and state-dict keys. Such a
class is created at run time, once per (prefix, original class), and named
``prefix + <the original's module:qualname, escaped>``. Its home module rebuilds it from that name
in its ``__getattr__`` (:func:`rebuild`), so converted models pickle, deep-copy and travel to
``torch.multiprocessing`` workers like any model, also into a fresh process.

Generated *code* (functions traced from the module's own forward) is kept in the instance's
``__dict__`` and never serialised: :class:`DropsGenerated` leaves it out of the pickled state
(it is regenerated on first use) and shares it between deep copies (the functions take the
module as ``self``), so a copy compiles without tracing again.
"""
from __future__ import annotations

import copy
import importlib
import sys
import threading
from typing import Any, Callable

from torch import nn

_CLASSES: dict[tuple[str, type], type] = {}
_LOCK = threading.Lock()


def _escape(text: str) -> str:
    return text.replace("_", "_u").replace(".", "_d").replace(":", "_c")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "_" and i + 1 < len(text):
            out.append({"u": "_", "d": ".", "c": ":"}.get(text[i + 1], "?"))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def generated_subclass(prefix: str, original: type, home: str, mixin: type | None = None,
                       members: dict[str, Any] | None = None) -> type:
    """The subclass ``prefix + <original>`` of ``original`` (``mixin`` first in its MRO, ``members``
    in its body), living in module ``home`` (whose ``__getattr__`` calls :func:`rebuild`); created
    once, then cached. ``original`` itself when it already is one of that prefix. The class records
    ``ltm_original_class`` (what it extends: code that compares or traces the model's own class reads
    it) and ``ltm_generated_by`` (its prefix)."""
    if any(c.__dict__.get("ltm_generated_by") == prefix for c in original.__mro__):
        return original
    with _LOCK:
        cls = _CLASSES.get((prefix, original))
        if cls is None:
            name = prefix + _escape(f"{original.__module__}:{original.__qualname__}")
            bases = (original,) if mixin is None else (mixin, original)
            cls = type(name, bases, {**(members or {}), "__module__": home, "__qualname__": name,
                                     "ltm_original_class": original, "ltm_generated_by": prefix})
            _CLASSES[(prefix, original)] = cls
            setattr(sys.modules[home], name, cls)
    return cls


def rebuild(home: str, name: str, makers: dict[str, Callable[[type], type]]) -> type:
    """The generated class called ``name`` in module ``home``, rebuilt by the maker of its prefix
    from the original class its name spells (what pickle asks a module's ``__getattr__`` for in a
    fresh process)."""
    for prefix, make in makers.items():
        if name.startswith(prefix):
            module, _, qualname = _unescape(name[len(prefix):]).partition(":")
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            return make(obj)
    raise AttributeError(f"module {home!r} has no attribute {name!r}")


class DropsGenerated:
    """A module whose ``__dict__`` entries named in ``ltm_generated_keys`` hold generated code:
    pickling leaves them out (rebuilt on first use), deep copies share them."""

    ltm_generated_keys: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = nn.Module.__getstate__(self) if hasattr(nn.Module, "__getstate__") else self.__dict__.copy()
        state = dict(state)
        for key in self.ltm_generated_keys:
            state.pop(key, None)
        return state

    def __deepcopy__(self, memo: dict) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__dict__.copy()
        shared = {key: state.pop(key) for key in self.ltm_generated_keys if key in state}
        new.__dict__.update(copy.deepcopy(state, memo))
        new.__dict__.update(shared)  # generated functions take the module as ``self``: shareable
        return new
