"""The options a model recipe may carry, per source kind, and the range each must lie in.

A saved model names its base model (a timm architecture, an HF config, the bundled DINOv2) and
the constructor options it was built with. Loading builds that model again, so every option is
code input from a file that may have been tampered with: ``trust_remote_code`` would run Python
shipped beside a config, timm's ``checkpoint_path`` reads any file, ``depth: 1e6`` hangs and an
``img_size`` of 1e5 allocates tens of GB. Only the options ltm_convert itself records are
accepted, each checked for type and bounds, before any model code is touched.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from ltm_convert.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE, is_int, is_number
from ltm_convert.errors import LtmError

Check = Callable[[Any], bool]
MAX_FRAMES = 512  # frames per clip of a video model (published ones take 8-64)


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
    "embed_dims": _ints(8, 8192),  # TinyViT's per-stage widths
    "depth": _int(1, 96),
    "features_only": _bool,  # a ViT's FeatureGetterNet (dense heads read its grid maps)
    "out_indices": lambda v: _int(-96, 96)(v) or _ints(-96, 96, 96)(v),
    "depths": _ints(1, 96),
    "num_heads": _ints(1, 128),
    "window_size": _ints(1, 64),
    "window_sizes": _ints(1, 64),  # TinyViT's per-stage windows
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
    "mlp_ratio": _num(0.25, 64.0),
    # video models (VideoMAE, TimeSformer, ViViT, V-JEPA 2): a clip's frames and tubelet shape, V-JEPA 2's
    # crop; VideoMAE builds its position table for every frame at construction
    "num_frames": _int(1, MAX_FRAMES),
    "frames_per_clip": _int(1, MAX_FRAMES),
    "tubelet_size": _ints(1, 64, longest=3),
    "crop_size": _side,
    "in_chans": _int(1, 16),
}
REFUSED_KEYS = ("trust_remote_code", "auto_map", "checkpoint_path", "pretrained_cfg_overlay", "cache_dir",
                "revision", "code_revision", "token", "local_files_only", "quantization_config")
# options handed to timm.create_model from inside an HF config (TimmWrapper's model_args, a timm
# backbone's backbone_kwargs): the timm allow-list, plus the feature indices a backbone picks
TIMM_ARGS: dict[str, Check] = {**TIMM_OPTIONS, "out_indices": _ints(-128, 128, longest=64)}
# attention / experts implementations that run without fetching code: anything else (flash_attention_*
# falls back to hub kernels, "org/repo:kernel" names one) would make a file send ltm_convert online
LOCAL_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "grouped_mm", "batched_mm")
_IMPLEMENTATION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                        "experts_implementation", "_experts_implementation", "_experts_implementation_internal")
_MAX_NESTING = 8
_LOCAL_TIMM_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # a registered architecture, never hf-hub:ORG/NAME


def _blame(where: str, from_file: bool, fix: str) -> str:
    """The end of a refusal: a file was tampered with, or the user's own option is wrong (say which fix)."""
    return f"{where} comes from a file that was tampered with" if from_file else fix


def check_options(kind: str, options: Any, where: str = "model options", *, from_file: bool = False) -> dict[str, Any]:
    """The options, if every one is allowed for ``kind`` and in range; else one LtmError.

    ``from_file``: the options were read from a saved model (a refusal means the file was tampered
    with); else they are the user's own (--model-kwargs, load_model(**kwargs)): name the option to fix.
    """
    if not isinstance(options, dict):
        end = "the file is corrupt" if from_file else "pass keyword options (NAME=VALUE)"
        raise LtmError(f"{where} must be a JSON object, got {type(options).__name__}; {end}")
    allowed = {"timm": TIMM_OPTIONS, "hf": HF_OPTIONS, "bundled": BUNDLED_OPTIONS,
               "hf-config": {"config": lambda v: isinstance(v, dict)}}[kind]
    for key, value in options.items():
        if key in REFUSED_KEYS:
            fix = "pass --checkpoint FILE instead" if key == "checkpoint_path" else "drop it"
            raise LtmError(f"{where}: {key} is refused (ltm_convert never passes it on: it could run code, read "
                           f"other files or go online); {_blame('it', from_file, fix)}")
        check = allowed.get(key)
        if check is None:
            raise LtmError(f"{where} hold {key!r}, which is not an option ltm_convert records for {kind} models "
                           f"(allowed: {', '.join(sorted(allowed))})")
        if not check(value):
            raise LtmError(f"{where}: {key}={_short(value)} is not allowed (wrong type or out of range)")
    if kind == "hf-config":
        check_hf_config(options.get("config"), where, from_file=from_file)
    return dict(options)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_hf_config(config: Any, where: str, *, from_file: bool = True) -> None:
    """An HF config dict (a saved recipe's, or a model directory's config.json): no remote code, no
    file or hub access, sizes in range. Every nested dict is walked (vision/text configs, TimmWrapper's
    ``model_args``, ``pretrained_cfg``, ...): whatever reaches a constructor passes the allow-lists."""
    corrupt = "the file is corrupt" if from_file else "pass a config saved by transformers"
    if not isinstance(config, dict):
        raise LtmError(f"{where}: the HF config must be a JSON object; {corrupt}")
    if not isinstance(config.get("model_type"), str):
        raise LtmError(f"{where}: the HF config has no model_type; {corrupt}")

    def refuse(path: str, key: str, why: str) -> LtmError:
        sep = "" if why.startswith("=") else " "
        return LtmError(f"{where}: the HF config's {path}{key}{sep}{why}; ltm_convert refuses it "
                        f"({_blame('the config', from_file, 'fix config.json')})")

    def walk(cfg: dict, path: str, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise LtmError(f"{where}: the HF config is nested too deeply; {corrupt}")
        for key, value in cfg.items():
            if key in REFUSED_KEYS:
                raise refuse(path, key, "would run code shipped beside it, read other files or go online")
            check = HF_CONFIG_BOUNDS.get(key)
            if check is not None and value is not None and not check(value):
                raise LtmError(f"{where}: the HF config's {path}{key}={_short(value)} is out of range")
            _check_special(cfg, key, value, lambda why, k=key: refuse(path, k, why))
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, dict):
                    walk(child, f"{path}{key}.", depth + 1)

    walk(config, "", 0)


def _check_special(cfg: dict, key: str, value: Any, refuse: Callable[[str], LtmError]) -> None:
    """Config fields that name code, files or hub repositories to load, or pass options on to timm."""
    if key in _IMPLEMENTATION_KEYS:
        values = list(value.values()) if isinstance(value, dict) else [value]
        if not all(v is None or v in LOCAL_IMPLEMENTATIONS for v in values):
            raise refuse(f"={_short(value)} names an implementation that may be fetched from the hub "
                         f"(allowed: {', '.join(LOCAL_IMPLEMENTATIONS)})")
    elif key in ("model_args", "backbone_kwargs") and value is not None:
        if not isinstance(value, dict):
            raise refuse("is not a JSON object")
        for name, arg in value.items():
            check = TIMM_ARGS.get(name)
            if check is None or not check(arg):
                raise refuse(f"passes {name}={_short(arg)} to timm, which is not an allowed timm option "
                             "(or out of range)")
    elif key == "architecture" and cfg.get("model_type") == "timm_wrapper":
        if not (isinstance(value, str) and _LOCAL_TIMM_NAME.match(value)):
            raise refuse(f"={_short(value)} is not a timm architecture name (hf-hub: names go online)")
    elif key == "use_pretrained_backbone" and value:
        raise refuse("asks to download backbone weights")
    elif key == "backbone" and value:
        if not (cfg.get("use_timm_backbone") and isinstance(value, str) and _LOCAL_TIMM_NAME.match(value)):
            raise refuse(f"={_short(value)} names a backbone loaded from the hub or a local directory")
