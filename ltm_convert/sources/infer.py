"""Which recipe rebuilds a model the user built themselves (``timm.create_model``, HF ``from_pretrained``).

A model made with ``load_model`` carries its source. Others are inferred: HF models by their class
and config (exact), timm models by their pretrained_cfg architecture and the constructor options
they show, verified by building that recipe on the meta device and comparing every state-dict key
and shape. Only where that check fails is ``source=`` asked for.
"""
from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.sources.build import _build_timm
from ltm_convert.sources.spec import ModelSource, _is_timm


def _cannot(model: nn.Module) -> LtmError:
    return LtmError(f"cannot tell how to rebuild this {type(model).__name__}; "
                    "create it with ltm_convert.load_model(...) or pass source=...")


def source_of(model: nn.Module) -> ModelSource:
    """The recipe that rebuilds ``model``'s architecture: the tag from ``load_model`` if present,
    else inferred (HF: class + config, exact; timm: architecture + read-back options, verified by
    rebuilding with random weights and comparing state-dict keys and shapes)."""
    tag = getattr(model, "ltm_source", None)
    if isinstance(tag, ModelSource):
        return tag
    tf = sys.modules.get("transformers")  # an HF model means transformers is already imported
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        name = type(model).__name__
        if getattr(tf, name, None) is not type(model):  # a user subclass or remote code
            raise _cannot(model)
        return ModelSource("hf-config", name, False, None, {"config": model.config.to_dict()})
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not _is_timm(arch):
        raise _cannot(model)
    kwargs = _timm_kwargs(model)
    for kw in (kwargs, {k: v for k, v in kwargs.items() if k == "num_classes"}):
        if _same_layout(_probe(arch, kw), model):
            return ModelSource("timm", arch, False, None, kw)
    raise _cannot(model)


def _timm_kwargs(model: nn.Module) -> dict:
    """Constructor options that timm models expose as attributes and that change the layout."""
    kw: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kw["num_classes"] = model.num_classes
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        kw["img_size"] = int(img[0]) if img[0] == img[1] else [int(i) for i in img]
    if isinstance(getattr(model, "global_pool", None), str):
        kw["global_pool"] = model.global_pool
    if getattr(model, "has_class_token", True) is False:
        kw["class_token"] = False
    if getattr(model, "num_reg_tokens", 0):
        kw["reg_tokens"] = int(model.num_reg_tokens)
    if getattr(model, "dynamic_img_size", False) is True:
        kw["dynamic_img_size"] = True
    return kw


def _probe(arch: str, kw: dict) -> nn.Module | None:
    """The architecture built with ``kw``: on the meta device when it allows (shapes only, no
    init cost), else normally; None when timm rejects the options."""
    import torch

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return _build_timm(arch, False, kw)
        except (LtmError, TypeError, ValueError, RuntimeError, NotImplementedError):
            continue
    return None


def _same_layout(a: nn.Module | None, b: nn.Module) -> bool:
    if a is None:
        return False
    def own(state: dict) -> dict:  # a converted model adds ltm_* tensors: compare the base model's
        return {k: v for k, v in state.items() if not any(p.startswith("ltm_") for p in k.split("."))}

    sa, sb = own(a.state_dict()), own(b.state_dict())
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)

