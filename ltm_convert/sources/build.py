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
from ltm_convert.sources.guard import constructor_error, hub_offline, quiet_hf, sized
from ltm_convert.sources.options import check_hf_config
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
    CPU); a timm head's class count is read from it unless ``num_classes`` is given. ``hf-config``
    gives random weights. Calling this inside ``with torch.device("meta")`` gives an empty skeleton
    for ``load_state_dict(..., assign=True)``. Only ``pretrained`` sources reach the model hub.
    """
    return _build_model(src)[0]


def _build_model(src: ModelSource) -> tuple[nn.Module, ModelSource]:
    """(model, the source it was built from: ``src`` checked, with the checkpoint's head size)."""
    if not isinstance(src, ModelSource):
        raise LtmError(f"expected a ModelSource, got {type(src).__name__}; use parse_source(spec)")
    kwargs = dict(src.kwargs) if isinstance(src.kwargs, dict) else src.kwargs
    src = ModelSource(src.kind, src.name, src.pretrained, src.checkpoint, kwargs).check()
    if src.checkpoint is None:
        return _build(src, src.pretrained).eval(), src
    sd = read_checkpoint(src.checkpoint)
    given = src.kwargs.get("num_classes")
    src = _with_head_size(src, sd)
    try:
        return _build_from_checkpoint(src, sd), src
    except LtmError as exc:
        classes = head_size(src, sd) if src.kind in ("timm", "bundled") else None
        if "does not fit" in str(exc) and classes is not None and given is not None and classes != given:
            raise LtmError(f"{exc}; the checkpoint's head has {classes} classes: pass --num-classes {classes} "
                           f"(num_classes={classes})") from None
        raise


def _with_head_size(src: ModelSource, sd: dict) -> ModelSource:
    """``src`` with ``num_classes`` read from the checkpoint's classifier when the user gave none."""
    if src.kind not in ("timm", "bundled") or "num_classes" in src.kwargs:
        return src
    classes = head_size(src, sd)
    if classes is None:
        return src
    return ModelSource(src.kind, src.name, src.pretrained, src.checkpoint,
                       {**src.kwargs, "num_classes": classes}).check(f"the head of checkpoint {src.checkpoint}")


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
    """``weights``: load the source's own weights. The hub is reached only when the user asked for
    them (``src.pretrained``): a checkpoint's hf-hub architecture config may then be fetched too."""
    if src.kind == "timm":
        model = _build_timm(src.name, weights, src.kwargs, hub=src.pretrained)
    elif src.kind == "hf":
        model = _build_hf(src.name, weights, src.kwargs, hub=src.pretrained)
    elif src.kind == "hf-config":
        model = _build_hf_config(src.name, src.kwargs)
    elif src.kind == "bundled":
        from ltm_convert.sources import bundled

        make = bundled.bundled_hf if src.name.endswith("-hf") else bundled.bundled_timm
        try:
            model = make(pretrained=weights, **src.kwargs)
        except TypeError as e:
            raise LtmError(f"bundled model {src.name} rejected the options {sorted(src.kwargs)} ({_first(e)})") from None
        except Exception as e:  # noqa: BLE001 - timm's assertions on bad options
            raise constructor_error(e, f"bundled model {src.name}") from None
    else:
        raise LtmError(f"unknown model source kind {src.kind!r}; expected one of {KINDS}")
    return model


def _offline_error(name: str, what: str) -> LtmError:
    return LtmError(f"{name} names a model on the hub and its {what} is not in the local cache; without pretrained "
                    "weights ltm_convert never goes online: pass a local name (a timm architecture, a directory "
                    "saved with save_pretrained()) or ask for pretrained weights")


def _build_timm(name: str, pretrained: bool, kwargs: dict, hub: bool | None = None) -> nn.Module:
    """``timm.create_model``; an ``hf-hub:`` name reads its config from the hub only when ``hub``
    (default: ``pretrained``), else from the local cache (HF offline mode)."""
    import timm

    hub = pretrained if hub is None else hub
    on_hub = name.startswith(("hf-hub:", "hf_hub:"))
    if pretrained and not on_hub:
        cfg = timm.models.get_pretrained_cfg(name)  # timm would build the model, then refuse
        if cfg is not None and not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
            raise LtmError(f"timm has no pretrained weights for {name}; pass --checkpoint FILE, --no-pretrained, or use 'bundled'")
    what = f"timm model {name}"
    try:
        online = hub and (pretrained or on_hub)  # a local architecture without weights needs nothing
        with _hub(name, "pretrained weights" if pretrained else "the config") if online else hub_offline():
            return sized(lambda: timm.create_model(name, pretrained=pretrained, **kwargs), what,
                         probe=lambda: timm.create_model(name, pretrained=False, **kwargs))
    except LtmError:
        raise
    except TypeError as e:
        raise LtmError(f"timm model {name} rejected the options {sorted(kwargs)} ({_first(e)}); drop or fix them") from None
    except Exception as e:  # noqa: BLE001 - see constructor_error
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            raise LtmError(_unknown(name)) from None
        if on_hub and isinstance(e, _download_errors()):
            raise _offline_error(name, "config") from None
        raise constructor_error(e, what) from None


_MAX_CONFIG_BYTES = 16 * 2**20  # HF configs are a few KB; label names of 100k classes stay far below this


def read_config_json(path: str | os.PathLike) -> dict:
    """A model directory's config.json as a dict, with one-line errors (too big, not JSON, too deep)."""
    import json

    p = Path(path) / "config.json"
    try:
        if p.stat().st_size > _MAX_CONFIG_BYTES:
            raise LtmError(f"{p} is {p.stat().st_size:,} bytes, not an HF config; pass a directory saved with save_pretrained()")
        config = json.loads(p.read_text(encoding="utf-8"))
    except LtmError:
        raise
    except OSError as e:
        raise LtmError(f"cannot read {p} ({_first(e)})") from None
    except RecursionError:
        raise LtmError(f"{p} is nested too deeply to be an HF config; fix config.json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise LtmError(f"{p} is not valid JSON ({_first(e)}); fix config.json") from None
    check_hf_config(config, str(p), from_file=False)
    return config


def _hf_config(name: str, kwargs: dict, hub: bool, pretrained: bool = False) -> Any:
    """The config of an HF id or directory, checked like a saved recipe's before any model code
    sees it (a directory's config.json as written, and the config transformers makes of it)."""
    import transformers

    local = Path(name).is_dir()
    if local:
        read_config_json(name)
    try:
        need = "pretrained weights" if pretrained else "the config"
        with quiet_hf(), (_hub(name, need) if hub and not local else hub_offline()):
            config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
    except LtmError:
        raise
    except Exception as e:  # noqa: BLE001 - ValueError, StrictDataclassError, OSError, ...
        if not local and isinstance(e, _download_errors()):
            raise _offline_error(name, "config") from None
        raise LtmError(f"transformers cannot read the config of {name} ({_first(e)}); upgrade it or fix config.json") from None
    check_hf_config(config.to_dict(), f"the config of {name}", from_file=False)
    return config


# heads of dense prediction: a config whose architectures name one of these builds that class (DPT's
# depth head, Depth Anything, a Backbone's feature maps), not the bare encoder AutoModel gives
DENSE_HEADS = ("ForDepthEstimation", "ForSemanticSegmentation", "ForPoseEstimation", "Backbone")


def _build_hf(name: str, pretrained: bool, kwargs: dict, hub: bool | None = None) -> nn.Module:
    """AutoConfig, then AutoModelForImageClassification when the config's architectures name a
    classification head, the class they name for a dense head (DENSE_HEADS), else AutoModel;
    ``kwargs`` override config fields (e.g. num_labels). The hub is reached only when ``hub``
    (default: ``pretrained``); a directory never reaches it."""
    import transformers

    hub = pretrained if hub is None else hub
    config = _hf_config(name, kwargs, hub, pretrained)
    archs = getattr(config, "architectures", None) or []
    heads = any("ForImageClassification" in a for a in archs)
    auto = transformers.AutoModelForImageClassification if heads else transformers.AutoModel
    dense = [getattr(transformers, a, None) for a in archs if isinstance(a, str) and a.endswith(DENSE_HEADS)]
    if len(dense) == 1 and isinstance(dense[0], type) and isinstance(config, getattr(dense[0], "config_class", ())):
        auto = dense[0]
    kw = {"ignore_mismatched_sizes": True} if kwargs else {}  # a resized head starts fresh
    return from_pretrained_checked(auto, name, config, pretrained=pretrained, hub=hub, **kw)


def from_pretrained_checked(cls: Any, name: str | os.PathLike, config: Any = None, *, pretrained: bool = True,
                            hub: bool = False, quiet: bool = False, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(name, config=config)`` (``cls.from_config(config)`` when not
    ``pretrained``) with every guard of an HF load: a directory's config.json checked like a saved
    recipe's (``config=None``: read here; it must describe ``cls``), the size bounded before any
    weight is read, no progress bars (``quiet``: no warnings either), the hub only when ``hub``, and
    one-line errors for everything transformers raises (a pickled pytorch_model.bin, validation
    errors). ``cls`` is a model class or an Auto class.
    """
    name = str(name)
    if config is None:
        config = _hf_config(name, {}, hub, pretrained)
    expected = getattr(cls, "config_class", None)
    if isinstance(expected, type) and not isinstance(config, expected):
        raise LtmError(f"the config of {name} describes a {type(config).__name__}, not the {expected.__name__} of "
                       f"{getattr(cls, '__name__', cls)}; the directory was altered or mixes two models")
    what = f"HF model {name}"
    if pretrained:
        make = lambda: cls.from_pretrained(name, config=config, trust_remote_code=False, **kwargs)  # noqa: E731
    else:
        make = lambda: cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # noqa: E731
    probe = lambda: cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # noqa: E731
    online = hub and pretrained and not Path(name).is_dir()
    try:
        with quiet_hf(quiet), (_hub(name) if online else hub_offline()):
            return sized(make, what, probe)
    except LtmError:
        raise
    except Exception as e:  # noqa: BLE001 - sorted below
        text = str(e)
        if "weights_only" in text or "Unpickl" in type(e).__name__ or "Unpickl" in text:
            raise LtmError(f"{name} holds pickled Python objects in its weights file (pytorch_model.bin), which "
                           "ltm_convert refuses to unpickle (it could run code); re-save the model with "
                           "save_pretrained(..., safe_serialization=True) to get model.safetensors") from None
        if isinstance(e, ValueError) and "Unrecognized configuration class" in text:
            raise LtmError(f"transformers has no model class for {name} ({type(config).__name__}); pass an HF vision model") from None
        if pretrained and isinstance(e, OSError):
            raise LtmError(f"could not load weights from {name} ({_first(e)}); pass --no-pretrained or --checkpoint FILE") from None
        if "mismatched_sizes" in text or "size mismatch" in text:
            raise LtmError(f"the weights of {name} do not fit its config (a tensor has another shape); the directory "
                           "mixes two models or was altered: save it again with save_pretrained") from None
        raise constructor_error(e, what) from None


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
    try:
        with quiet_hf(), hub_offline():
            config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
            check_hf_config(config.to_dict(), f"the saved config of {name}")
            return sized(lambda: cls(config), f"HF model {name}")
    except Exception as e:  # noqa: BLE001 - see constructor_error
        raise constructor_error(e, f"HF model {name}") from None


def load_model(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model from a spec and remember how (``model.ltm_source``), so a converted copy can
    be saved and rebuilt anywhere."""
    return load_source(parse_source(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs))


def load_source(src: ModelSource) -> nn.Module:
    """:func:`build_model`, with the recipe it was built from remembered (``model.ltm_source``)."""
    model, src = _build_model(src)
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


