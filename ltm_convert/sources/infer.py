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

from ltm_convert.config import is_ltm_name
from ltm_convert.errors import LtmError
from ltm_convert.sources.build import _build_timm
from ltm_convert.sources.spec import ModelSource, _is_timm


def _cannot(model: nn.Module) -> LtmError:
    return LtmError(f"cannot tell how to rebuild this {type(model).__name__}; "
                    "create it with ltm_convert.load_model(...) or pass source=...")


def source_of(model: nn.Module) -> ModelSource:
    """The recipe that rebuilds ``model``'s architecture: the tag from ``load_model`` if present,
    else inferred (HF: class + config, exact; timm: architecture + read-back options, depth, width,
    heads, ... included, verified by rebuilding on the meta device and comparing state-dict keys
    and shapes and the options no shape shows, such as the number of heads)."""
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
    inner, features = _features_wrapper(model)
    unmatched = None
    for kw in _timm_candidates(arch, inner, features):
        probe = _probe(arch, kw)
        if _same_layout(probe, model) and _structure(_features_wrapper(probe)[0]) == _structure(inner):
            ours, theirs = _modules(model), _modules(probe)
            if ours == theirs:
                return ModelSource("timm", arch, False, None, kw)
            unmatched = unmatched or next((n for n in ours if ours[n] != theirs.get(n)), None)
    if unmatched is not None:
        got = _modules(model)[unmatched]
        raise LtmError(f"cannot record how to rebuild this {type(model).__name__}: its {unmatched} is "
                       f"{got[0].rsplit('.', 1)[-1]}({got[1]}), a setting no recorded option rebuilds (an "
                       "activation or norm of your own?); create it with ltm_convert.load_model(...) or pass source=...")
    raise _cannot(model)


def _features_wrapper(model: nn.Module | None) -> tuple[nn.Module | None, dict]:
    """A timm ``features_only`` ViT (FeatureGetterNet around the pruned model): the model inside
    and the options that rebuild the wrapper; any other model: itself and no options."""
    if model is None or type(model).__name__ != "FeatureGetterNet" or not type(model).__module__.startswith("timm."):
        return model, {}
    fmt = getattr(model.output_fmt, "value", model.output_fmt)
    if model.out_map is not None or model.return_dict or model.norm or fmt != "NCHW":
        raise LtmError("cannot record how to rebuild this FeatureGetterNet: out_map, return_dict, norm or "
                       "output_fmt differ from what timm.create_model(..., features_only=True) builds; create it "
                       "with ltm_convert.load_model(...) or pass source=...")
    return model.model, {"features_only": True, "out_indices": [int(i) for i in model.out_indices]}


def _timm_candidates(arch: str, model: nn.Module, features: dict | None = None) -> list[dict]:
    """Recipes to try, most specific first: the options the model shows, plus every structural
    option (depth, width, heads, ...) where it differs from the architecture built with the rest.
    ``features``: the features_only options of the wrapper ``model`` sat in (its blocks pruned
    after the last output, so it is compared with a default built the same way)."""
    features = features or {}
    base = _timm_kwargs(model)
    default = _features_wrapper(_probe(arch, {**base, **features}))[0]
    shown = _structure(model)
    theirs = _structure(default) if default is not None else {}
    extra = {k: _as_option(k, v, model) for k, v in shown.items() if v is not None and theirs.get(k) != v}
    classes = {k: v for k, v in base.items() if k == "num_classes"}
    candidates: list[dict] = []
    for kw in ({**base, **extra}, base, classes):
        kw = {**kw, **features}
        if kw not in candidates:
            candidates.append(kw)
    return candidates


def _structure(model: nn.Module | None) -> dict[str, Any]:
    """Constructor options a timm ViT-like model shows in its modules, by option name; None where
    this model does not show it. The heads count and the like do not change any tensor's shape,
    so comparing state dicts alone would miss them."""
    if model is None:
        return {}
    blocks = getattr(model, "blocks", None)
    block = blocks[0] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    embed = getattr(model, "patch_embed", None)
    patch, proj = getattr(embed, "patch_size", None), getattr(embed, "proj", None)
    dim = getattr(model, "embed_dim", None)
    fc1 = getattr(mlp, "fc1", None)
    qkv = getattr(attn, "qkv", None)
    ls1, q_norm, fc_norm = getattr(block, "ls1", None), getattr(attn, "q_norm", None), getattr(model, "fc_norm", None)
    return {
        "depth": len(blocks) if block is not None else None,
        "embed_dim": dim if isinstance(dim, int) else None,
        "num_heads": getattr(attn, "num_heads", None),
        "mlp_ratio": fc1.out_features if isinstance(fc1, nn.Linear) else None,  # as a width: exact
        "patch_size": int(patch[0]) if isinstance(patch, (tuple, list)) and len(set(patch)) == 1 else None,
        "in_chans": getattr(proj, "in_channels", None),
        "qkv_bias": qkv.bias is not None if isinstance(qkv, nn.Linear) else None,
        "qk_norm": None if q_norm is None else not isinstance(q_norm, nn.Identity),
        "init_values": None if ls1 is None else not isinstance(ls1, nn.Identity),  # layer scale or not
        "no_embed_class": getattr(model, "no_embed_class", None),
        "fc_norm": None if fc_norm is None else not isinstance(fc_norm, nn.Identity),
    }


def _as_option(key: str, value: Any, model: nn.Module) -> Any:
    """A :func:`_structure` reading as the constructor option that produces it."""
    if key == "mlp_ratio":  # timm builds int(embed_dim * mlp_ratio) hidden units
        dim = model.embed_dim
        ratio = value / dim
        return ratio if int(dim * ratio) == value else (value + 0.5) / dim
    if key == "init_values":
        return 1e-5 if value else None  # its value is a weight (saved); only its presence shapes the model
    return value


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


def _modules(model: nn.Module | None) -> dict[str, tuple[str, str]]:
    """Every module's class and settings (``extra_repr``: activation approximations, norm eps, ...),
    which change outputs without changing a tensor's shape: a recipe that rebuilds GELU where the
    user built ReLU must not pass. Dropout rates change only training and are left out; converted
    blocks compare as their original class, and ltm_* modules not at all."""
    if model is None:
        return {}
    out = {}
    for name, m in model.named_modules():
        if is_ltm_name(name) or "drop" in name.rsplit(".", 1)[-1].lower() \
                or "Drop" in type(m).__name__:
            continue
        cls = getattr(type(m), "ltm_original_class", type(m))
        settings = m.extra_repr()
        if hasattr(type(m), "ltm_original_class"):
            settings = settings.split("ltm: ")[0].rstrip(", ")
        out[name] = (f"{cls.__module__}.{cls.__qualname__}", settings)
    return out


def _same_layout(a: nn.Module | None, b: nn.Module) -> bool:
    if a is None:
        return False
    def own(state: dict) -> dict:  # a converted model adds ltm_* tensors: compare the base model's
        return {k: v for k, v in state.items() if not is_ltm_name(k)}

    sa, sb = own(a.state_dict()), own(b.state_dict())
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)

