"""The options a model recipe may carry, per source kind, and the range each must lie in.

A saved model names its base model (a timm architecture, an HF config, the bundled DINOv2) and
the constructor options it was built with. Loading builds that model again, so every option is
code input from a file that may have been tampered with: ``trust_remote_code`` would run Python
shipped beside a config, timm's ``checkpoint_path`` reads any file, ``depth: 1e6`` hangs and an
``img_size`` of 1e5 allocates tens of GB. Only the options ltm_convert itself records are
accepted, each checked for type and bounds, before any model code is touched.
"""
from __future__ import annotations

from typing import Any, Callable

from ltm_convert.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE, is_int, is_number
from ltm_convert.errors import LtmError

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda v: is_int(v) and lo <= v <= hi


def _num(lo: float, hi: float) -> Check:
    return lambda v: is_number(v) and lo <= v <= hi


def _side(v: Any) -> bool:
    if is_int(v):
        return MIN_INPUT_SIDE <= v <= MAX_INPUT_SIDE
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x) and MIN_INPUT_SIDE <= x <= MAX_INPUT_SIDE for x in v)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(*values: str) -> Check:
    return lambda v: v in values


def _ints(lo: int, hi: int, longest: int = 8) -> Check:
    """An int in range, or a short list of them (per-stage settings of hierarchical models)."""
    one = _int(lo, hi)
    return lambda v: one(v) or (isinstance(v, (list, tuple)) and 0 < len(v) <= longest and all(one(x) for x in v))


def _opt_num(lo: float, hi: float) -> Check:
    return lambda v: v is None or (is_number(v) and lo <= v <= hi)


# timm constructor options (what --num-classes / --model-kwargs and source inference record)
TIMM_OPTIONS: dict[str, Check] = {
    "num_classes": _int(0, 100_000),
    "img_size": _side,
    "in_chans": _int(1, 16),
    "global_pool": _one_of("", "token", "avg", "avgmax", "max", "map"),
    "class_token": _bool,
    "no_embed_class": _bool,
    "reg_tokens": _int(0, 64),
    "dynamic_img_size": _bool,
    "qk_norm": _bool,
    "qkv_bias": _bool,
    "patch_size": _int(1, 64),
    "embed_dim": _ints(8, 8192),
    "depth": _int(1, 96),
    "depths": _ints(1, 96),
    "num_heads": _ints(1, 128),
    "window_size": _ints(1, 64),
    "fc_norm": lambda v: v is None or isinstance(v, bool),
    "mlp_ratio": _num(0.25, 16.0),
    "init_values": _opt_num(0.0, 10.0),
    "drop_rate": _num(0.0, 1.0),
    "drop_path_rate": _num(0.0, 1.0),
    "attn_drop_rate": _num(0.0, 1.0),
    "proj_drop_rate": _num(0.0, 1.0),
}
# options applied on top of an HF config
HF_OPTIONS: dict[str, Check] = {
    "num_labels": _int(1, 100_000),
    "image_size": _side,
}
BUNDLED_OPTIONS: dict[str, Check] = {
    "img_size": _int(14, MAX_INPUT_SIDE),
    "image_size": _int(14, MAX_INPUT_SIDE),
    "num_classes": _int(0, 100_000),
    "global_pool": _one_of("", "token", "avg", "avgmax", "max"),
}
# sizes inside an HF config dict (a saved hf-config recipe): bounded so a file cannot ask for a
# model that does not fit in memory or takes hours to build
HF_CONFIG_BOUNDS: dict[str, Check] = {
    "hidden_size": _int(1, 16384),
    "intermediate_size": _int(1, 65536),
    "num_hidden_layers": _int(1, 128),
    "num_attention_heads": _int(1, 256),
    "image_size": _side,
    "patch_size": _ints(1, 64, longest=2),
    "num_channels": _int(1, 16),
    "num_labels": _int(1, 100_000),
    "num_register_tokens": _int(0, 64),
    "embed_dim": _int(1, 16384),
}
REFUSED_KEYS = ("trust_remote_code", "auto_map", "checkpoint_path", "pretrained_cfg_overlay", "cache_dir",
                "revision", "code_revision", "token", "local_files_only")


def check_options(kind: str, options: Any, where: str = "model options") -> dict[str, Any]:
    """The options, if every one is allowed for ``kind`` and in range; else one LtmError."""
    if not isinstance(options, dict):
        raise LtmError(f"{where} must be a JSON object, got {type(options).__name__}; the file is corrupt")
    allowed = {"timm": TIMM_OPTIONS, "hf": HF_OPTIONS, "bundled": BUNDLED_OPTIONS,
               "hf-config": {"config": lambda v: isinstance(v, dict)}}[kind]
    for key, value in options.items():
        if key in REFUSED_KEYS:
            raise LtmError(f"{where} ask for {key}, which ltm_convert never records and refuses (it could run "
                           "code or read other files); the file was tampered with")
        check = allowed.get(key)
        if check is None:
            raise LtmError(f"{where} hold {key!r}, which is not an option ltm_convert records for {kind} models "
                           f"(allowed: {', '.join(sorted(allowed))})")
        if not check(value):
            raise LtmError(f"{where}: {key}={value!r} is not allowed (wrong type or out of range)")
    if kind == "hf-config":
        check_hf_config(options.get("config"), where)
    return dict(options)


def check_hf_config(config: Any, where: str) -> None:
    """An HF config dict: no remote code, sizes in range (nested vision/text configs too)."""
    if not isinstance(config, dict):
        raise LtmError(f"{where}: the HF config must be a JSON object; the file is corrupt")
    if not isinstance(config.get("model_type"), str):
        raise LtmError(f"{where}: the HF config has no model_type; the file is corrupt")

    def walk(cfg: dict, path: str, depth: int) -> None:
        if depth > 3:
            raise LtmError(f"{where}: the HF config nests too deep; the file is corrupt")
        for key, value in cfg.items():
            if key in REFUSED_KEYS:
                raise LtmError(f"{where}: the HF config asks for {key}, which would run code shipped beside it; "
                               "ltm_convert refuses it (the file was tampered with)")
            check = HF_CONFIG_BOUNDS.get(key)
            if check is not None and value is not None and not check(value):
                raise LtmError(f"{where}: the HF config's {path}{key}={value!r} is out of range")
            if isinstance(value, dict) and key.endswith("_config"):
                walk(value, f"{path}{key}.", depth + 1)

    walk(config, "", 0)
