"""LtmConfig: everything needed to replay a conversion on a fresh copy of the base model.

It is saved next to the weights as JSON. It carries the library version, and loading ignores
keys it does not know, so a file written by a newer ltm_convert still loads (PEFT's habit).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ltm_convert.errors import LtmError

CONFIG_FORMAT = 1


def _version() -> str:
    from ltm_convert import __version__

    return __version__


DEFAULT_TOPK = 4  # targets each merged-away token may reach (design section 2.1: local and cheap)


@dataclass
class LtmConfig:
    """How a model is converted.

    ratio: fraction of the original model's FLOPs the converted model may use (1.0 = no merging).
    input_size: (H, W) the static schedule is solved for; None = the model's own default.
    exclude: block names (or prefixes) to leave untouched.
    method: the mask module: "ltm" (learnable) or a baseline registered in methods.py.
    topk: each merged-away token spreads its mass over its k most similar targets (0 = all);
        4 (the default) keeps heat-maps local and makes merging touch only R x 4 rows.
    keep: tokens kept per converted block (the solved schedule); filled in by ``convert``.
    """

    ratio: float = 0.8
    input_size: tuple[int, int] | None = None
    exclude: list[str] = field(default_factory=list)
    method: str = "ltm"
    topk: int = DEFAULT_TOPK
    keep: dict[str, int] = field(default_factory=dict)
    version: str = field(default_factory=_version)
    format: int = CONFIG_FORMAT

    def __post_init__(self) -> None:
        validate_ratio(self.ratio)
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 2 or min(size) <= 0:
                raise LtmError(f"input_size must be two positive integers (H, W), got {self.input_size!r}")
            self.input_size = size  # type: ignore[assignment]
        if self.topk < 0:
            raise LtmError(f"topk must be 0 (all targets) or positive, got {self.topk}")
        from ltm_convert.methods import method_names

        if self.method not in method_names():
            raise LtmError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size) if self.input_size else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LtmConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("format", CONFIG_FORMAT) > CONFIG_FORMAT:
            raise LtmError(
                f"this file uses config format {kwargs['format']}, newer than this ltm_convert "
                f"understands ({CONFIG_FORMAT}); upgrade with `pip install -U ltm_convert`"
            )
        if kwargs.get("input_size") is not None:
            kwargs["input_size"] = tuple(kwargs["input_size"])
        return cls(**kwargs)


def validate_ratio(ratio: float) -> float:
    """Reject a FLOPs ratio outside (0, 1] with a message that says what the number means."""
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
