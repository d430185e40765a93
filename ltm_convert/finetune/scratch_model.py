"""The model ``ltm-convert train`` trains: built with random weights (or pretrained ones when asked),
its head sized to the data, then converted at the config's ratio and method, or left unconverted
(``ratio 1.0`` / ``original``) so the original trains with the same recipe.

A model is given as ``convert`` takes one (a timm name, ``hf:...``, ``bundled``), as a file saved by
``ltm-convert convert`` (its architecture and token schedule; random weights unless pretrained), or
as an ``nn.Module`` from Python (trained as given; converted first unless it is already).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.finetune.scratch_config import ScratchConfig


@dataclass
class BuiltModel:
    model: nn.Module  # what trains: converted, or the unconverted original
    name: str  # where it came from, for the metrics file
    method: str  # "ltm", "tome", ... or "original"
    ratio: float  # the FLOPs ratio of its schedule (1.0: the original)
    input_size: tuple[int, int]


def build(model: Any, cfg: ScratchConfig, num_classes: int) -> BuiltModel:
    """The model to train, with a head of ``num_classes`` outputs (``cfg.num_classes`` when given)."""
    from ltm_convert.api import is_converted
    from ltm_convert.io import is_saved_model

    classes = cfg.num_classes or num_classes
    torch.manual_seed(cfg.seed)  # random initial weights are a function of the seed
    if cfg.checkpoint is not None and not (isinstance(model, (str, os.PathLike)) and not is_saved_model(Path(model))):
        raise LtmError("--checkpoint gives the weights of a model source (a timm name, hf:..., bundled); a saved or "
                       "built model has its own: leave --checkpoint out")
    if isinstance(model, nn.Module):
        name = type(model).__name__
        if not is_converted(model):
            _check_head(model, classes, name)
            return _prepare(model, cfg, name)
        _check_head(model, classes, name)
        return _as_converted(model, cfg, name)
    if not isinstance(model, (str, os.PathLike)):
        raise LtmError(f"the model must be a model name, a saved LTM model or an nn.Module, got {type(model).__name__}")
    spec = str(model)
    if is_saved_model(Path(spec)):
        return _as_converted(_from_saved(Path(spec), cfg, classes), cfg, spec)
    from ltm_convert.sources import load_model

    options = dict(cfg.model_kwargs)
    options["num_labels" if spec.startswith("hf:") else "num_classes"] = classes
    base = load_model(spec, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **options)
    _check_head(base, classes, spec)
    return _prepare(base, cfg, spec)


def _prepare(base: nn.Module, cfg: ScratchConfig, name: str) -> BuiltModel:
    """Converted at ``cfg.ratio`` with ``cfg.method``, or (ratio 1.0 / original) the original itself,
    resized to ``cfg.img_size`` as conversion would."""
    from ltm_convert.api import _fit_resolution, convert
    from ltm_convert.model_inputs import default_input_size

    size = tuple(cfg.img_size or default_input_size(base))
    if not cfg.merges():
        _fit_resolution(base, size)
        return BuiltModel(base, name, "original", 1.0, size)
    converted = convert(base, cfg.ratio, input_size=size, method=cfg.method)
    return BuiltModel(converted, name, cfg.method, float(cfg.ratio), tuple(converted.ltm_config.input_size))


def _as_converted(model: nn.Module, cfg: ScratchConfig, name: str) -> BuiltModel:
    """An already converted model keeps its own schedule; the ratio / method asked for do not apply."""
    config = model.ltm_config
    asked = []
    if cfg.original or cfg.ratio != ScratchConfig.ratio:
        asked.append("--original" if cfg.original else f"--ratio {cfg.ratio:g}")
    if cfg.method != ScratchConfig.method:
        asked.append(f"--method {cfg.method}")
    if cfg.img_size is not None and tuple(cfg.img_size) != tuple(config.input_size):
        asked.append(f"--img-size {cfg.img_size[0]}x{cfg.img_size[1]}")
    if asked:
        warnings.warn(f"{', '.join(asked)} ignored: {name} is already converted (ratio {config.ratio:g}, method "
                      f"{config.method}, input size {config.input_size[0]}x{config.input_size[1]}) and keeps its "
                      "schedule; give its model source to convert it anew", UserWarning, stacklevel=3)
    return BuiltModel(model, name, config.method, float(config.ratio), tuple(config.input_size))


def _from_saved(path: Path, cfg: ScratchConfig, classes: int) -> nn.Module:
    """A saved converted model: with ``pretrained``, its weights; else its architecture and schedule
    with random weights and a head of ``classes`` outputs (the recipe rebuilt, nothing loaded)."""
    from ltm_convert.api import convert
    from ltm_convert.io import check_recipe, load, read_file
    from ltm_convert.sources import ModelSource, build_model

    if cfg.pretrained:
        model = load(path)
        _check_head(model, classes, str(path))
        return model
    recipe, _ = read_file(path)
    source, config = check_recipe(recipe, str(path))
    kwargs = dict(source.kwargs)
    if source.kind == "hf-config":
        hf = dict(kwargs.get("config") or {})
        hf.update(num_labels=classes, id2label={str(i): f"LABEL_{i}" for i in range(classes)},
                  label2id={f"LABEL_{i}": i for i in range(classes)})
        kwargs["config"] = hf
    else:
        kwargs["num_classes"] = classes
    rebuilt = ModelSource(source.kind, source.name, False, None, kwargs)
    base = build_model(rebuilt)
    base.ltm_source = dataclasses.replace(source, kwargs=kwargs, pretrained=False, checkpoint=None)
    _check_head(base, classes, str(path))
    return convert(base, config=config, inplace=True)


def _check_head(model: nn.Module, classes: int, name: str) -> None:
    from ltm_convert.finetune.validation import head_module

    head = head_module(model)
    out = getattr(head, "out_features", None) if head is not None else None
    if out is None or isinstance(head, nn.Identity):
        raise LtmError(f"{name} has no classification head to train with labels; use a classifier (a timm model, or "
                       "an HF ...ForImageClassification class)")
    if out != classes:
        raise LtmError(f"{name} has a head of {out} classes and the data {classes}; build it with num_classes={classes} "
                       "(or train from its model source, which sizes the head to the data)")


def saveable(model: nn.Module, built: BuiltModel) -> nn.Module:
    """What ``ltm_convert.save`` can write: a converted model as it is; a trained original converted
    at ratio 1.0 (the identity: same outputs, nothing merged), so load / inspect read it back."""
    from ltm_convert.api import convert, is_converted

    if is_converted(model):
        return model
    source = getattr(built.model, "ltm_source", None)
    out = convert(copy.deepcopy(model), 1.0, input_size=built.input_size, inplace=True)
    if source is not None:
        out.ltm_source = source
    return out
