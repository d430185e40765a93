"""Where a model comes from, and how to build it again.

A converted model is saved as (base-model recipe, conversion config, weights). The recipe is a
:class:`ModelSource`: small, JSON-able, and enough to rebuild the *architecture* on another
machine (the saved weights go on top). ``load_model`` builds a model from a user's spec and tags
it with its source; ``source_of`` reads the tag back, or infers and verifies a recipe for models
the user built themselves.

Nothing here imports transformers at import time, and every user mistake is a one-line LtmError.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ltm_convert.errors import LtmError

KINDS = ("timm", "hf", "hf-config", "bundled")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NO_HUB = (
    "could not download pretrained weights for {name} (this machine has no access to the model hub); "
    "pass --checkpoint FILE, a local HF directory, --no-pretrained for random weights, "
    "or use the bundled real model 'bundled'"
)
_SPEC_HINT = "ltm-convert accepts a timm model name, an HF id or local directory (hf:ID), or 'bundled'"


@dataclass
class ModelSource:
    """A recipe for a base model: what to build and which weights to start from.

    kind: "timm" | "hf" | "hf-config" | "bundled".
    name: timm architecture, HF id or local dir, HF class name (hf-config), or bundled name.
    pretrained: load the source's own weights (False: random init; the weights come from elsewhere).
    checkpoint: a local state-dict file loaded after building (wins over ``pretrained``).
    kwargs: JSON-able constructor options (timm: num_classes, img_size, ...; hf-config: config).
    """

    kind: str
    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-able dict (what ``io.save`` writes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSource":
        """Inverse of :meth:`to_dict`; unknown keys are ignored so files from newer versions load."""
        ok = isinstance(d, dict) and d.get("kind") in KINDS and isinstance(d.get("name"), str)
        if not ok or not isinstance(d.get("kwargs") or {}, dict):
            raise LtmError(f"invalid model source {str(d)[:80]!r}; expected a kind in {KINDS} and a name (re-save it)")
        known = {f.name for f in dataclasses.fields(cls)}
        src = cls(**{k: v for k, v in d.items() if k in known})
        src.kwargs = dict(src.kwargs or {})
        return src


def parse_source(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource` (nothing is built or downloaded).

    ``bundled[:dinov2_vits14[-hf]]`` -> bundled DINOv2; ``hf:X``, a local dir with config.json or
    ``org/name`` -> HF; ``timm:X`` or any other name -> timm (checked against timm's registry).
    """
    from ltm_convert.bundled import BUNDLED_NAMES

    if not isinstance(spec, str) or not spec.strip():
        raise LtmError(f"model spec {spec!r} is empty; {_SPEC_HINT}")
    try:
        json.dumps(kwargs)  # the recipe is saved as JSON next to the weights
    except (TypeError, ValueError):
        raise LtmError(f"model options {sorted(kwargs)} must be plain JSON values (numbers, strings, lists)") from None
    spec, ckpt = spec.strip(), None if checkpoint is None else str(checkpoint)
    mk = lambda kind, name: ModelSource(kind, name, bool(pretrained), ckpt, dict(kwargs))  # noqa: E731
    if spec == "bundled" or spec.startswith("bundled:"):
        name = spec.partition(":")[2] or BUNDLED_NAMES[0]
        if name not in BUNDLED_NAMES:
            raise LtmError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED_NAMES)}")
        return mk("bundled", name)
    if spec.startswith("hf:"):
        return mk("hf", _hf_name(spec[3:]))
    if spec.startswith(("timm:", "hf-hub:", "hf_hub:")):  # hf-hub: is timm's own hub syntax
        name = spec[5:] if spec.startswith("timm:") else spec
        if not name.startswith("hf") and not _is_timm(name):
            raise LtmError(_unknown(name))
        return mk("timm", name)
    p = Path(spec).expanduser()
    if (p / "config.json").is_file() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return mk("hf", _hf_name(spec))
    if "/" in spec and _HF_ID.match(spec):
        return mk("hf", spec)
    if _is_timm(spec):
        return mk("timm", spec)
    if p.is_dir():
        _hf_name(spec)  # raises: a directory without config.json
    raise LtmError(_unknown(spec))


def _hf_name(name: str) -> str:
    """An HF id, or a local directory checked for config.json (returned absolute)."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LtmError(f"directory {name} has no config.json; pass a directory saved with save_pretrained()")
        return str(p.resolve())
    if _HF_ID.match(name):
        return name
    raise LtmError(f"{name!r} is neither a local directory nor an HF id like org/name; {_SPEC_HINT}")


def _first(e: BaseException) -> str:
    """An exception's first line, shortened, so wrapped messages stay one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _unknown(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
    alt = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown model {name!r}{alt}; {_SPEC_HINT}"


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
    model = _build_meta(src)  # every weight comes from the file: skip the random init (seconds)
    if model is not None:
        model.load_state_dict(_fit(model, sd, src.checkpoint), strict=True, assign=True)
        if not _has_meta(model):
            return model.eval()
    model = _build(src, False)  # the model keeps tensors the file does not hold: build normally
    model.load_state_dict(_fit(model, sd, src.checkpoint), strict=True)
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
        from ltm_convert import bundled

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
            config = transformers.AutoConfig.from_pretrained(name, **kwargs)
        else:
            with _hub(name, "pretrained weights" if pretrained else "the config"):
                config = transformers.AutoConfig.from_pretrained(name, **kwargs)
    except ValueError as e:
        raise LtmError(f"transformers cannot read the config of {name} ({_first(e)}); upgrade it or fix config.json") from None
    heads = any("ForImageClassification" in a for a in getattr(config, "architectures", None) or [])
    auto = transformers.AutoModelForImageClassification if heads else transformers.AutoModel
    try:
        if not pretrained:
            return auto.from_config(config)
        kw = {"ignore_mismatched_sizes": True} if kwargs else {}  # a resized head starts fresh
        if local:
            return auto.from_pretrained(name, config=config, **kw)
        with _hub(name):
            return auto.from_pretrained(name, config=config, **kw)
    except ValueError:
        raise LtmError(f"transformers has no model class for {name} ({type(config).__name__}); pass an HF vision model") from None
    except OSError as e:
        raise LtmError(f"could not load weights from {name} ({_first(e)}); pass --no-pretrained or --checkpoint FILE") from None


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


# --------------------------------------------------------------------------- checkpoints

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A state dict from ``.safetensors`` or a torch file, never executing pickled code.

    Torch files are read with ``weights_only=True`` only: a file holding arbitrary pickled
    objects is refused (unpickling them could run code). Common wrappers ({"state_dict": ...},
    {"model": ...}) and DDP's ``module.`` prefix are removed.
    """
    import pickle

    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise LtmError(f"checkpoint file {path} not found; pass the path of a .safetensors or .pt state-dict file")
    with open(p, "rb") as f:
        head = f.read(9)  # safetensors: an 8-byte header length, then the JSON header
    if p.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except Exception as e:  # SafetensorError has no stable public base class
            raise LtmError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}); re-save it") from None
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # the weights-only unpickler met a non-tensor object
            if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
                raise LtmError(f"checkpoint {path} contains pickled Python objects, refusing to load it; "
                               "save a plain state_dict: torch.save(model.state_dict(), f)") from None
            raise LtmError(f"checkpoint {path} is corrupt; re-save it with torch.save(model.state_dict(), f)") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise LtmError(f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}); "
                           "re-save it with torch.save(model.state_dict(), f)") from None
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), sd)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LtmError(f"checkpoint {path} does not hold a state dict of tensors; save model.state_dict()")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fit(model: nn.Module, sd: dict, path: str | os.PathLike) -> dict:
    """``sd`` if it fits ``model`` exactly, else timm's own converter for the architecture (it
    maps official releases and resamples position embeddings), else a one-line LtmError."""
    problem = _mismatch(model, sd)
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if problem and callable(fn):
        try:
            converted = fn(dict(sd), model)
            if not _mismatch(model, converted):
                return converted
        except Exception:  # the converter is a best effort; report the original mismatch
            pass
    if problem:
        raise LtmError(f"checkpoint {path} does not fit {type(model).__name__}: {problem}; "
                       "check the model name and its options (num_classes, img_size)")
    return sd


def _mismatch(model: nn.Module, sd: dict) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    found = ((missing, "missing keys"), (extra, "unexpected keys"), (shape, "shape mismatches"))
    return ", ".join(f"{len(ks)} {what} (e.g. {ks[0]})" for ks, what in found if ks)


# --------------------------------------------------------------------------- reading back


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
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
