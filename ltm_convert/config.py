"""LtmConfig, and every named constant the library shares.

A config is everything needed to replay a conversion on a fresh copy of the base model. It is
saved next to the weights as JSON, carries the library version, and loading ignores keys it does
not know, so a file written by a newer ltm_convert still loads (PEFT's habit). Everything read
from a file is checked for type and range before any model code runs (a tampered file gets one
clear error, never a crash deep inside torch).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ltm_convert.errors import LtmError
from ltm_convert.merge.methods import DEFAULT_TOPK, method_names

CONFIG_FORMAT = 1

DEFAULT_RATIO = 0.8
MAX_TOPK = 4096
SCHEDULES = ("fraction", "constant", "calibrated")  # schedule shapes (schedule.py; calibrate.py)
DEFAULT_SCHEDULE = "fraction"
POSITIONS = ("coords", "rows", "target")  # how rotary tables follow merged tokens (rewriters/rotary.py)
# "rows" measured best on a distilled RoPE ViT-S/14, 350 held-out photos (benchmarks/README.md): cosine to
# the unmerged model +0.0002 / +0.0007 / +0.0025 over "coords" at ratio 0.8 / 0.65 / 0.5, intervals above 0
DEFAULT_POSITIONS = "rows"
MASK_VERSION = 2  # the LTM mask's design; files without it (0.1.0) were made with version 1
SCHEDULE_TOLERANCE = 0.001  # |FLOPs ratio - target| the solver aims for, as a fraction of the original FLOPs
GRID_TOLERANCE = 0.005  # grid sites: among schedules this close, keep the most in the most-merged site
REACH_TOLERANCE = 0.02  # a schedule within 2% (relative) of the target reaches it; beyond, the verdict says not
MIN_INPUT_SIDE = 8
MAX_INPUT_SIDE = 2048  # a 2048 px side is 16k patches of 16 px; beyond that one image's attention alone is GBs
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")  # --data names of the offline Debian package
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _version() -> str:
    from ltm_convert import __version__

    return __version__


def is_ltm_name(name: str) -> bool:
    """Whether a parameter, buffer, attribute or child name belongs to what conversion added: every
    such name has a dotted part starting with ``ltm_`` (the original model's names never do)."""
    return any(part.startswith("ltm_") for part in name.split("."))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_input_size(size: Any, what: str = "input_size") -> tuple[int, int] | None:
    """None, or (H, W) of two integers in [MIN_INPUT_SIDE, MAX_INPUT_SIDE]."""
    if size is None:
        return None
    if is_int(size):
        size = (size, size)
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) for v in size):
        raise LtmError(f"{what} must be two integers (H, W), got {size!r}")
    if not all(MIN_INPUT_SIDE <= v <= MAX_INPUT_SIDE for v in size):
        raise LtmError(f"{what} {tuple(size)} is out of range: each side must be {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} "
                       "pixels (larger inputs do not fit in memory for a ViT); choose a smaller --input-size")
    return (int(size[0]), int(size[1]))


@dataclass
class LtmConfig:
    """How a model is converted.

    ratio: fraction of the original model's FLOPs the converted model may use (1.0 = no merging).
    input_size: (H, W) the static schedule is solved for; None = the model's own default.
    exclude: block names (or prefixes) to leave untouched.
    method: the mask module: "ltm" (learnable) or a baseline registered in merge/methods.py.
    topk: each merged-away token spreads its mass over its k most similar targets (0 = all).
    schedule: the schedule shape the FLOPs target is solved in ("fraction", "constant" or "calibrated").
    keep: tokens kept per merge site (the solved schedule); filled in by ``convert``.
    positions: how a rotary model's position table follows merged tokens: "coords" (the model's own
        rope at the mean of the members' coordinates), "rows" (mean of the members' sin/cos rows) or
        "target" (the row of the token it was merged into); other families ignore it.
    dense: keep patch tokens to the last block, for heads that read the patch grid (segmentation,
        depth, feature maps): no block collapses them, even where the model's own head reads only the
        class token, and the FLOPs target is met with every block merging normally. Models whose own
        code lays block outputs out on the grid (DPT, Depth Anything, HF backbones) convert dense on
        their own; files written before this setting load as False.
    """

    ratio: float = DEFAULT_RATIO
    input_size: tuple[int, int] | None = None
    exclude: list[str] = field(default_factory=list)
    method: str = "ltm"
    topk: int = DEFAULT_TOPK
    keep: dict[str, int] = field(default_factory=dict)
    schedule: str = DEFAULT_SCHEDULE
    mask_version: int = MASK_VERSION
    positions: str = DEFAULT_POSITIONS
    dense: bool = False
    version: str = field(default_factory=_version)
    format: int = CONFIG_FORMAT

    def __post_init__(self) -> None:
        self.ratio = validate_ratio(self.ratio)
        self.input_size = check_input_size(self.input_size)
        if isinstance(self.exclude, str):  # one name
            self.exclude = [self.exclude]
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(e, str) and e for e in self.exclude):
            raise LtmError(f"exclude must be a list of block names, got {self.exclude!r}")
        self.exclude = list(self.exclude)
        if not is_int(self.topk) or not 0 <= self.topk <= MAX_TOPK:
            raise LtmError(f"topk must be an integer: 0 (all targets) or 1..{MAX_TOPK}, got {self.topk!r}")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise LtmError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(self.keep, dict) or not all(isinstance(k, str) and is_int(v) and v >= 1
                                                      for k, v in self.keep.items()):
            raise LtmError(f"keep must map block names to positive token counts, got {str(self.keep)[:80]!r}")
        if not isinstance(self.method, str):
            raise LtmError(f"method must be a name, got {self.method!r}")
        if self.method not in method_names():
            raise LtmError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise LtmError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if not isinstance(self.dense, bool):
            raise LtmError(f"dense must be True or False, got {self.dense!r}")
        if self.mask_version not in (1, 2) or isinstance(self.mask_version, bool):
            raise LtmError(f"mask_version must be 1 or 2, got {self.mask_version!r}; the file is corrupt")
        if not is_int(self.format) or not isinstance(self.version, str):
            raise LtmError("the config's format must be an integer and its version a string; the file is corrupt")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "LtmConfig":
        """A config read from a file: every field checked; a saved config must carry its schedule."""
        if not isinstance(data, dict):
            raise LtmError(f"the saved config must be a JSON object, got {type(data).__name__}; the file is corrupt")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        fmt = kwargs.get("format", CONFIG_FORMAT)
        if not is_int(fmt):
            raise LtmError(f"the saved config has format {fmt!r}, not an integer; the file is corrupt")
        if fmt > CONFIG_FORMAT:
            raise LtmError(
                f"this file uses config format {fmt}, newer than this ltm_convert understands ({CONFIG_FORMAT}); "
                "upgrade with `pip install -U ltm_convert`")
        if not is_number(kwargs.get("ratio")):
            raise LtmError(f"the saved ratio must be a number, got {kwargs.get('ratio')!r}; the file is corrupt")
        kwargs.setdefault("mask_version", 1)  # written before mask versions existed: 0.1.0's mask
        kwargs.setdefault("topk", 4)  # every writer stored it; a file without it predates the default of 2
        if not kwargs.get("keep"):
            raise LtmError("the saved config has no schedule (keep); the file is corrupt or was not written by convert")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a field of the wrong kind that the checks above did not name
            raise LtmError(f"the saved config is malformed ({exc}); the file is corrupt") from None


def validate_ratio(ratio: Any) -> float:
    """Reject a FLOPs ratio outside (0, 1] (or not a number) with a message that says what it means."""
    if isinstance(ratio, bool):
        raise LtmError(f"ratio must be a number in (0, 1], got {ratio!r}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise LtmError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0) or value != value:
        raise LtmError(
            f"ratio must be in (0, 1] (the fraction of the original FLOPs to keep), got {ratio!r}; "
            "try --ratio 0.8"
        )
    return value
