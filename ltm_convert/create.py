"""Models by name: build a timm or HF model and convert it, in one call.

``ltm_convert.create_model("vit_small_patch16_224", ratio=0.8)`` and, once ltm_convert is imported,
``timm.create_model("ltm_vit_small_patch16_224", ratio=0.8)`` (timm_registry.py) hand back the converted model, so
timm's own training scripts, and anything else that builds a model from a name, get LTM models. The base model is
built by sources/ and remembers its recipe, so saving, loading, ``inspect`` and the FLOPs count treat the result
like any converted model.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from torch import nn

from ltm_convert.api import convert
from ltm_convert.config import DEFAULT_RATIO, validate_ratio
from ltm_convert.errors import LtmError
from ltm_convert.sources import ModelSource, load_model, load_source, ltm_base

# the keywords that go to convert(); every other keyword is a constructor option of the base model
CONVERT_OPTIONS = ("method", "topk", "schedule", "exclude", "input_size", "calibration_images", "dense")


def create_model(name_or_path: Any, ratio: float = DEFAULT_RATIO, *, pretrained: bool = False,
                 checkpoint: str | os.PathLike | None = None, compression_ratio: float | None = None,
                 **kwargs: Any) -> nn.Module:
    """The model ``name_or_path`` names, converted to ``ratio`` of its FLOPs, in eval mode.

    ``name_or_path``: a timm name (``ltm_`` prefix and ``.tag`` allowed), ``hf:ID``, an HF id or local directory
    (anything ``load_model`` takes), or a transformers config object (random weights). ``pretrained`` is off by
    default, as in ``timm.create_model``: the base starts from random weights (training from scratch); True loads
    the source's own weights (the hub's, or a directory's), ``checkpoint`` a local state-dict file.
    ``compression_ratio`` is the paper's name for ``ratio``. ``method``, ``topk``, ``schedule``, ``exclude``,
    ``input_size``, ``calibration_images`` and ``dense`` go to :func:`ltm_convert.convert`; the other keywords are the
    base model's options (timm: ``num_classes``, ``img_size``, ``drop_path_rate``, ...; HF: ``num_labels``, ...),
    recorded so that a saved model rebuilds the same architecture; a timm ``img_size`` is also the
    ``input_size`` the schedule is solved for, unless that is given.
    """
    ratio = _ratio(ratio, compression_ratio)
    options = {k: kwargs.pop(k) for k in CONVERT_OPTIONS if k in kwargs}
    if "img_size" in kwargs and options.get("input_size") is None:  # the size the model is built for is the
        options["input_size"] = kwargs["img_size"]  # size it runs at (MobileViT's own default ignores img_size)
    return convert(_base_model(name_or_path, pretrained, checkpoint, kwargs), ratio, inplace=True, **options)


def timm_entrypoint(base: str, pretrained: bool = False, pretrained_cfg: Any = None, **kwargs: Any) -> nn.Module:
    """What ``timm.create_model("ltm_<base>[.tag]", ...)`` runs: :func:`create_model` of ``base``, in train
    mode as timm hands back every model. timm passes the tag as ``pretrained_cfg`` and every factory option,
    unset ones as None; ``device`` / ``dtype`` place the converted model."""
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        raise LtmError(f"ltm_{base} takes a pretrained tag, not a pretrained_cfg object; name the tag in the "
                       f"model name (ltm_{base}.TAG)")
    name = f"{base}.{pretrained_cfg}" if pretrained_cfg else base
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = create_model(f"timm:{name}", pretrained=pretrained, **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.train()


def _ratio(ratio: Any, compression_ratio: Any) -> float:
    if compression_ratio is None:
        return ratio
    if ratio != DEFAULT_RATIO and validate_ratio(ratio) != validate_ratio(compression_ratio):
        raise LtmError(f"got ratio={ratio!r} and compression_ratio={compression_ratio!r}, two names for the same "
                       "setting; pass one")
    return compression_ratio


def _base_model(spec: Any, pretrained: bool, checkpoint: Any, kwargs: dict) -> nn.Module:
    """The unconverted model, tagged with its recipe (``ltm_source``)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        base = ltm_base(spec.strip())
        return load_model(f"timm:{base}" if base else spec, pretrained=pretrained,
                          checkpoint=None if checkpoint is None else os.fspath(checkpoint), **kwargs)
    tf = sys.modules.get("transformers")  # a config object means transformers is imported
    if tf is not None and isinstance(spec, tf.PretrainedConfig):
        if pretrained or checkpoint is not None:
            raise LtmError(f"a {type(spec).__name__} holds no weights; pass a local directory or hub id for "
                           "pretrained weights, or pretrained=False")
        if kwargs:
            raise LtmError(f"create_model got {', '.join(sorted(kwargs))} with a config; set them on the config")
        config = spec.to_dict()
        return load_source(ModelSource("hf-config", _hf_class_name(tf, spec), False, None, {"config": config}))
    raise LtmError(f"create_model needs a model name, a directory or a transformers config, got "
                   f"{type(spec).__name__}; pass e.g. 'vit_small_patch16_224' or 'hf:/path/to/dir'")


def _hf_class_name(tf: Any, config: Any) -> str:
    """The class a config's ``architectures`` names (a head), else transformers' base model for it."""
    for arch in getattr(config, "architectures", None) or []:
        if isinstance(getattr(tf, arch, None), type):
            return arch
    try:
        return tf.MODEL_MAPPING[type(config)].__name__
    except KeyError:
        raise LtmError(f"transformers has no model class for {type(config).__name__}; set config.architectures "
                       "to the class to build") from None
