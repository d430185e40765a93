"""Build the model a source describes: timm, HF (hub id, local directory, or a saved config), bundled.

Hub downloads are wrapped so that an offline machine fails at once with one line that says what
to do instead (a local checkpoint, a local directory, --no-pretrained, or the bundled model).
Nothing here imports transformers at import time.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.sources.checkpoints import fit_state_dict, read_checkpoint
from ltm_convert.sources.spec import (
    _NO_HUB,
    KINDS,
    ModelSource,
    _first,
    _unknown,
    parse_source,
)

# --------------------------------------------------------------------------- hub access


def _hub_reachable() -> bool:
    """A quick TCP probe of the HF endpoint (milliseconds when DNS fails).

    Without it timm and transformers retry with backoff for 25-50 s per file before giving up.
    Behind a proxy a direct probe says nothing, so the hub is assumed reachable.
    """
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hc

    if hc.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(hc.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _download_errors() -> tuple[type[BaseException], ...]:
    """OSError covers the hub's own errors, urllib and requests; raw httpx errors are not OSErrors."""
    errs: list[type[BaseException]] = [OSError]
    for mod in ("httpx", "httpx2"):
        err = getattr(sys.modules.get(mod), "HTTPError", None)
        if isinstance(err, type):
            errs.append(err)
    return tuple(errs)


@contextmanager
def _hub(name: str, what: str = "pretrained weights") -> Iterator[None]:
    """Run a download: offline -> HF offline mode (cached files still load, the rest fails at
    once); any download failure -> one LtmError saying what to do instead."""
    import huggingface_hub.constants as hc

    online, old = _hub_reachable(), hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = old or not online
    try:
        yield
    except LtmError:
        raise
    except _download_errors() as e:
        msg = _NO_HUB.format(name=name).replace("pretrained weights", what)
        if online:  # reachable hub, yet it failed: say why (a typo in the id, a gated repo, ...)
            msg = msg.replace("this machine has no access to the model hub", _first(e))
        raise LtmError(msg) from None
    finally:
        hc.HF_HUB_OFFLINE = old


# --------------------------------------------------------------------------- building


def build_model(src: ModelSource) -> nn.Module:
    """Build the model a source describes, in eval mode, with the weights it names.

    A checkpoint wins over ``pretrained``: the file is loaded strictly, into a model built on the
    meta device when the file holds every tensor (random init of a ViT-B costs seconds on a small
    CPU). ``hf-config`` gives random weights. Calling this inside ``with torch.device("meta")``
    gives an empty skeleton for ``load_state_dict(..., assign=True)``.
    """
    if not isinstance(src, ModelSource):
        raise LtmError(f"expected a ModelSource, got {type(src).__name__}; use parse_source(spec)")
    if src.checkpoint is None:
        return _build(src, src.pretrained).eval()
    sd = read_checkpoint(src.checkpoint)
    try:
        return _build_from_checkpoint(src, sd)
    except LtmError as exc:
        classes = head_size(src, sd) if src.kind in ("timm", "bundled") else None
        own = src.kwargs.get("num_classes")
        if "does not fit" in str(exc) and classes is not None and classes != own:
            raise LtmError(f"{exc}; the checkpoint's head has {classes} classes: pass --num-classes {classes} "
                           f"(num_classes={classes})") from None
        raise


def _build_from_checkpoint(src: ModelSource, sd: dict) -> nn.Module:
    model = _build_meta(src)  # every weight comes from the file: skip the random init (seconds)
    if model is not None:
        model.load_state_dict(fit_state_dict(model, sd, src.checkpoint), strict=True, assign=True)
        if not _has_meta(model):
            return model.eval()
    model = _build(src, False)  # the model keeps tensors the file does not hold: build normally
    model.load_state_dict(fit_state_dict(model, sd, src.checkpoint), strict=True)
    return model.eval()


def _build_meta(src: ModelSource) -> nn.Module | None:
    import torch

    try:
        with torch.device("meta"):
            return _build(src, False)
    except LtmError:
        raise
    except Exception:  # some constructors compute on tensors (e.g. .item()); build normally
        return None


def _has_meta(model: nn.Module) -> bool:
    import torch

    return any(isinstance(t, torch.Tensor) and t.is_meta for m in model.modules()
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *vars(m).values()])


def _build(src: ModelSource, weights: bool) -> nn.Module:
    if src.kind == "timm":
        model = _build_timm(src.name, weights, src.kwargs)
    elif src.kind == "hf":
        model = _build_hf(src.name, weights, src.kwargs)
    elif src.kind == "hf-config":
        model = _build_hf_config(src.name, src.kwargs)
    elif src.kind == "bundled":
        from ltm_convert.sources import bundled

        make = bundled.bundled_hf if src.name.endswith("-hf") else bundled.bundled_timm
        try:
            model = make(pretrained=weights, **src.kwargs)
        except TypeError as e:
            raise LtmError(f"bundled model {src.name} rejected the options {sorted(src.kwargs)} ({_first(e)})") from None
    else:
        raise LtmError(f"unknown model source kind {src.kind!r}; expected one of {KINDS}")
    return model


def _build_timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if pretrained and not name.startswith(("hf-hub:", "hf_hub:")):
        cfg = timm.models.get_pretrained_cfg(name)  # timm would build the model, then refuse
        if cfg is not None and not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
            raise LtmError(f"timm has no pretrained weights for {name}; pass --checkpoint FILE, --no-pretrained, or use 'bundled'")
    try:
        if pretrained:
            with _hub(name):
                return timm.create_model(name, pretrained=True, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise LtmError(f"timm model {name} rejected the options {sorted(kwargs)} ({_first(e)}); drop or fix them") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise LtmError(_unknown(name)) from None
        raise


def _build_hf(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """AutoConfig, then AutoModelForImageClassification when the config's architectures name a
    classification head (else AutoModel); ``kwargs`` override config fields (e.g. num_labels)."""
    import transformers

    local = Path(name).is_dir()
    try:
        if local:
            config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
        else:
            with _hub(name, "pretrained weights" if pretrained else "the config"):
                config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
    except ValueError as e:
        raise LtmError(f"transformers cannot read the config of {name} ({_first(e)}); upgrade it or fix config.json") from None
    heads = any("ForImageClassification" in a for a in getattr(config, "architectures", None) or [])
    auto = transformers.AutoModelForImageClassification if heads else transformers.AutoModel
    try:
        if not pretrained:
            return auto.from_config(config)
        kw = {"ignore_mismatched_sizes": True} if kwargs else {}  # a resized head starts fresh
        if local:
            return auto.from_pretrained(name, config=config, trust_remote_code=False, **kw)
        with _hub(name):
            return auto.from_pretrained(name, config=config, trust_remote_code=False, **kw)
    except ValueError:
        raise LtmError(f"transformers has no model class for {name} ({type(config).__name__}); pass an HF vision model") from None
    except OSError as e:
        raise LtmError(f"could not load weights from {name} ({_first(e)}); pass --no-pretrained or --checkpoint FILE") from None
    except Exception as e:  # noqa: BLE001 - torch's weights-only unpickler refusing a pickled .bin
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__ or "Unpickl" in str(e):
            raise LtmError(f"{name} holds pickled Python objects in its weights file (pytorch_model.bin), which "
                           "ltm_convert refuses to unpickle (it could run code); re-save the model with "
                           "save_pretrained(..., safe_serialization=True) to get model.safetensors") from None
        raise


def _build_hf_config(name: str, kwargs: dict) -> nn.Module:
    """Rebuild an HF model from its class name and ``config.to_dict()`` (random weights)."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = kwargs.get("config")
    cls = getattr(transformers, name, None)
    if not isinstance(cfg, dict) or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LtmError(f"cannot rebuild HF model {name!r} from its saved config; use a transformers version that has it")
    if cfg.get("model_type") not in CONFIG_MAPPING:
        raise LtmError(f"transformers does not know model_type {cfg.get('model_type')!r}; upgrade it to rebuild {name}")
    return cls(CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg))


def load_model(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model from a spec and remember how (``model.ltm_source``), so a converted copy can
    be saved and rebuilt anywhere."""
    src = parse_source(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    model = build_model(src)
    model.ltm_source = src
    return model


def head_size(src: ModelSource, state: dict) -> int | None:
    """The class count of the classifier in a checkpoint (0 for a headless one), by the head's name in
    timm's pretrained config; None when the architecture names no classifier."""
    import timm

    arch = src.name if src.kind == "timm" else "vit_small_patch14_dinov2"
    cfg = timm.models.get_pretrained_cfg(arch.split(":")[-1]) if not arch.startswith("hf") else None
    classifier = getattr(cfg, "classifier", None) if cfg is not None else "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    return 0 if names and not any(k.startswith(tuple(n + "." for n in names)) for k in state) else None


