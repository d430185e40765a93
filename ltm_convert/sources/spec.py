"""What a model spec or a saved recipe names: a :class:`ModelSource`, checked before anything is built.

A converted model is saved as (base-model recipe, conversion config, weights). The recipe is a
ModelSource: small, JSON-able, and enough to rebuild the *architecture* on another machine (the
saved weights go on top). Its options pass the allow-lists of options.py, both when a user's spec
is parsed and when a file is read, so a recipe can only ask for what convert itself records.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltm_convert.errors import LtmError
from ltm_convert.sources.options import check_options

KINDS = ("timm", "hf", "hf-config", "bundled")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TIMM_NAME = re.compile(r"^(hf[-_]hub:[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*)$")
_NO_HUB = (
    "could not download pretrained weights for {name} (this machine has no access to the model hub); "
    "pass --checkpoint FILE, a local HF directory, --no-pretrained for random weights, "
    "or use the bundled real model 'bundled'"
)
_SPEC_HINT = "ltm-convert accepts a timm model name, an HF id or local directory (hf:ID), or 'bundled'"
LTM_PREFIX = "ltm_"  # timm.create_model("ltm_<timm name>") names the converted model (timm_registry.py)


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
        if not ok:
            raise LtmError(f"invalid model source {str(d)[:80]!r}; expected a kind in {KINDS} and a name (re-save it)")
        known = {f.name for f in dataclasses.fields(cls)}
        src = cls(**{k: v for k, v in d.items() if k in known})
        src.kwargs = dict(src.kwargs or {}) if isinstance(src.kwargs or {}, dict) else src.kwargs
        src.check("the saved model source", from_file=True)
        return src

    def check(self, where: str = "the model source", *, from_file: bool = False) -> "ModelSource":
        """Refuse anything a recipe must not ask for (options.py), before any model code runs.

        ``from_file``: the recipe was read from a saved model, so a refusal blames the file; else the
        options are the user's own and the refusal names the option to fix."""
        corrupt = "the file is corrupt" if from_file else "fix the model name"
        if not isinstance(self.pretrained, bool) or not (self.checkpoint is None or isinstance(self.checkpoint, str)):
            raise LtmError(f"{where} is malformed (pretrained must be true/false, checkpoint a path); "
                           f"{'the file is corrupt' if from_file else 'pass a bool and a path'}")
        if self.kind == "timm" and not _TIMM_NAME.match(self.name):
            raise LtmError(f"{where} names timm model {self.name[:60]!r}, which is not a model name; {corrupt}")
        if self.kind == "timm" and ltm_base(self.name) is not None:  # it would build a converted model
            raise LtmError(f"{where} names {self.name}, an LTM model; a recipe names the model that is converted "
                           f"({ltm_base(self.name)}); {corrupt}")
        if self.kind == "bundled":
            from ltm_convert.sources.bundled import BUNDLED_NAMES

            if self.name not in BUNDLED_NAMES:
                raise LtmError(f"{where} names bundled model {self.name[:60]!r}; choose one of {', '.join(BUNDLED_NAMES)}")
        if self.kind == "hf-config" and not self.name.isidentifier():
            raise LtmError(f"{where} names HF class {self.name[:60]!r}, which is not a class name; {corrupt}")
        options = where if where.endswith("options") else f"{where}'s options"
        self.kwargs = check_options(self.kind, self.kwargs, options, from_file=from_file)
        return self


def parse_source(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource` (nothing is built or downloaded).

    ``bundled[:dinov2_vits14[-hf]]`` -> bundled DINOv2; ``hf:X``, a local dir with config.json or
    ``org/name`` -> HF; ``timm:X`` or any other name -> timm (checked against timm's registry).
    """
    from ltm_convert.sources.bundled import BUNDLED_NAMES

    if not isinstance(spec, str) or not spec.strip():
        raise LtmError(f"model spec {spec!r} is empty; {_SPEC_HINT}")
    try:
        json.dumps(kwargs)  # the recipe is saved as JSON next to the weights
    except (TypeError, ValueError):
        raise LtmError(f"model options {sorted(kwargs)} must be plain JSON values (numbers, strings, lists)") from None
    spec, ckpt = spec.strip(), None if checkpoint is None else str(checkpoint)
    mk = lambda kind, name: ModelSource(kind, name, bool(pretrained), ckpt, dict(kwargs)).check("model options")  # noqa: E731
    if spec == "bundled" or spec.startswith("bundled:"):
        name = spec.partition(":")[2] or BUNDLED_NAMES[0]
        if name not in BUNDLED_NAMES:
            raise LtmError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED_NAMES)}")
        return mk("bundled", name)
    if spec.startswith("hf:"):
        return mk("hf", _hf_name(spec[3:]))
    base = ltm_base(spec)
    if base is not None:  # a recipe names the model that is converted, never its LTM version
        raise LtmError(f"{spec} names the LTM version of timm model {base}; pass {base} (it is converted at the "
                       f"ratio you give) or build the LTM model with ltm_convert.create_model({spec!r}, ratio=...)")
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


def ltm_base(spec: str) -> str | None:
    """The timm model (pretrained tag kept) that ``ltm_<name>`` or ``timm:ltm_<name>`` converts; None
    for any other spec, an existing path named ``ltm_...`` included."""
    name = spec[5:] if spec.startswith("timm:") else spec
    if not name.startswith(LTM_PREFIX) or Path(spec).expanduser().exists():
        return None
    base = name[len(LTM_PREFIX):]
    return base if _TIMM_NAME.match(base) and ":" not in base and _is_timm(base) else None


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
    """An exception's first line, shortened, so wrapped messages stay one line (a first line that
    ends in ':' announces the next one, e.g. huggingface_hub's validation errors: both are kept)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:160]


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _unknown(name: str) -> str:
    import timm

    prefix = LTM_PREFIX if name.startswith(LTM_PREFIX) else ""  # ltm_ names: match the timm name they convert
    base = name[len(prefix):].split(".")[0]
    known = timm.list_models(exclude_filters=f"{LTM_PREFIX}*")
    close = [prefix + n for n in difflib.get_close_matches(base, known, n=3, cutoff=0.6)]
    alt = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown model {name!r}{alt}; {_SPEC_HINT}"

