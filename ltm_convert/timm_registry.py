"""``ltm_<name>`` in timm's model registry, for every timm model, without importing timm.

``import ltm_convert`` must stay light (no torch, no timm), yet ``timm.create_model("ltm_vit_small_patch16_224")``
has to work whichever of the two is imported first. So: if timm is already imported the names are registered at
once; otherwise a finder on ``sys.meta_path`` waits for ``import timm`` and registers them the moment timm's own
import finishes (all of its models are registered by then), then leaves ``sys.meta_path``.

Registering adds one entry per timm architecture (and its pretrained configs, so ``list_pretrained`` and
``is_model_pretrained`` know the names): about 3 ms for timm 1.0's ~1400 architectures, paid once, when timm is
imported. Each entry is a small function that imports ltm_convert.create only when called. Deprecated timm names
get none. timm's registry is a set of module-level dicts; a timm without them gets no names (one warning), and
``ltm_convert.create_model`` still works.
"""
from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Any, Callable

PREFIX = "ltm_"
MODULE = "ltm_convert"  # what timm.list_models(module=...) and list_modules() call these names
_registered: set[int] = set()  # id() of the timm registries already filled


def install() -> None:
    """Register now if timm is imported, else when it is; safe to call more than once."""
    timm = sys.modules.get("timm")
    if timm is not None:
        if not getattr(getattr(timm, "__spec__", None), "_initializing", False):
            register()
        return
    if not any(isinstance(f, _TimmFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())


def register() -> int:
    """Add ``ltm_<name>`` for every registered, non-deprecated timm architecture; returns how many were added."""
    registry = sys.modules.get("timm.models._registry")
    if registry is None or id(registry) in _registered:
        return 0
    try:
        added = _fill(registry)
    except (AttributeError, TypeError) as exc:  # a timm whose registry is laid out differently
        warnings.warn(f"ltm_convert could not add ltm_* names to timm's registry ({exc}); use "
                      "ltm_convert.create_model(NAME, ratio=...) instead", stacklevel=2)
        return 0
    _registered.add(id(registry))
    return added


def _fill(r: ModuleType) -> int:
    entrypoints, deprecated = r._model_entrypoints, r._deprecated_models
    names = [n for n in list(entrypoints) if not n.startswith(PREFIX) and n not in deprecated]
    module_models = r._module_to_models[MODULE]
    for base in names:
        name = PREFIX + base
        entrypoints[name] = _entrypoint(base, name)
        r._model_to_module[name] = MODULE
        module_models.add(name)
        tagged = r._model_with_tags.get(base)
        if not tagged:
            continue
        r._model_with_tags[name] = [PREFIX + t for t in tagged]
        for full in tagged:
            cfg = r._model_pretrained_cfgs.get(full)
            if cfg is not None:
                r._model_pretrained_cfgs[PREFIX + full] = cfg
            if full in r._model_has_pretrained:
                r._model_has_pretrained.add(PREFIX + full)
        if base in r._model_pretrained_cfgs:
            r._model_pretrained_cfgs[name] = r._model_pretrained_cfgs[base]
            if base in r._model_has_pretrained:
                r._model_has_pretrained.add(name)
        if base in r._model_default_cfgs:
            r._model_default_cfgs[name] = r._model_default_cfgs[base]
    return len(names)


def _entrypoint(base: str, name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, **kwargs: Any) -> Any:
        from ltm_convert.create import timm_entrypoint

        return timm_entrypoint(base, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"timm's {base}, converted by ltm_convert (ratio=0.8 unless given)"
    return create


class _TimmFinder:
    """A ``sys.meta_path`` finder that only watches for ``import timm``: it hands back timm's own spec, with a
    loader that runs timm's as usual and then registers the ltm_ names."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once, and never asked about its own lookup below
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    """timm's loader, plus the registration once timm's module has run; the module keeps timm's own loader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
