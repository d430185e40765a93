"""Where a model comes from (timm, HF, local, bundled), how to build it, and how to rebuild it.

Nothing here imports transformers at import time, and every user mistake is a one-line LtmError.
"""
from ltm_convert.sources.build import build_model, from_pretrained_checked, load_model, load_source
from ltm_convert.sources.checkpoints import read_checkpoint
from ltm_convert.sources.infer import source_of
from ltm_convert.sources.spec import KINDS, ModelSource, ltm_base, parse_source

__all__ = ["KINDS", "ModelSource", "build_model", "from_pretrained_checked", "load_model", "load_source",
           "ltm_base", "parse_source", "read_checkpoint", "source_of"]
