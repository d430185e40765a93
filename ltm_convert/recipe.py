"""What a saved file records about a converted model (its recipe): the base model's source, the
conversion config with its schedule, and the plan. Below both api.py (an HF model carries its recipe
in its config, for ``save_pretrained``) and io.py (``save`` writes it, ``load`` replays it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.ltm_block import is_converted

FILE_FORMAT = 1


def recipe_of(model: nn.Module, source: Any = None) -> dict[str, Any]:
    """What a saved file records: the base model's source (an HF model as its class + config, so
    the file loads on any machine) and the conversion config with its schedule."""
    from ltm_convert import __version__
    from ltm_convert.sources import ModelSource, source_of

    if not is_converted(model):
        raise LtmError("save() needs a converted model; call ltm_convert.convert(model) first")
    src = source if source is not None else source_of(model)
    if not isinstance(src, ModelSource):
        raise LtmError(f"source= must be a ModelSource (ltm_convert.sources.parse_source(spec)), got {type(src).__name__}")
    if src.kind == "hf":  # never an absolute path or a hub id that may not be reachable: the config itself
        src = ModelSource("hf-config", type(model).__name__, False, None, {"config": hf_config_dict(model)})
    if src.checkpoint:  # a shared file names no local path; load takes the weights from the file itself
        src = dataclasses.replace(src, checkpoint=Path(src.checkpoint).name)
    return {"ltm_format": FILE_FORMAT, "ltm_version": __version__, "source": src.check("the model source").to_dict(),
            "config": model.ltm_config.to_dict(), "plan": model.ltm_plan.to_dict()}


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    for key in ("ltm_recipe", "auto_map", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    return config
