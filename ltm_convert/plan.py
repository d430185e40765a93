"""What a conversion changes: the plan a family makes from the analysis, saved in the file.

A :class:`ConversionPlan` is printable and JSON-able. ``convert`` makes it from the graph analysis
(tracer.py); ``save`` records it with the family's name, and ``load`` replays it (api.py) instead
of tracing the model again: the file says which family converted which blocks, so another family
registered later cannot re-plan it, and loading does not need torch.export to succeed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ltm_convert.errors import LtmError


@dataclass
class BlockMatch:
    """One transformer block found in the graph."""

    name: str  # module path of the block, e.g. "blocks.3"
    attn_child: str  # the block's child that computes attention, e.g. "attn"
    index: int  # position along the residual stream
    tokens_with_prefix: int  # tokens entering the block at the traced resolution, prefix included
    dim: int


@dataclass
class GridGroup:
    """Consecutive blocks that run on patches unfolded from one 2-D feature map (MobileViT).

    The tokens are the n_h x n_w patch positions in raster order; the batch dimension holds
    batch x patch_area sequences, one per pixel position inside a patch, which must all merge the
    same way so that the feature map can be folded back.
    """

    blocks: list[str]
    mergeable: int  # n_h x n_w patch positions (a grid has no prefix tokens)
    grid: tuple[int, int]  # (n_h, n_w)
    patch_area: int


@dataclass
class ConversionPlan:
    """What a conversion would change: printable, JSON-able, computed without touching the model."""

    model_class: str
    input_size: tuple[int, int]
    tokens_with_prefix: int  # tokens entering the first block, prefix tokens included
    prefix_tokens: int
    heads: list[str]
    blocks: list[BlockMatch] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    family: str = "sequence"  # the rewriters/ family that converts it
    # what only the family reads (JSON-able; the family parses it, e.g. with :func:`records`):
    # sequence: "carry" (modules between the last block and the head); unfolded grids: "grids"
    # (GridGroup); FFN grids: "ffn_grids" (FfnSite)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import json

        self.data = json.loads(json.dumps(self.data))  # plain JSON, as a file gives it back (tuples -> lists)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    def __str__(self) -> str:
        lines = [
            f"{self.model_class} at {self.input_size[0]}x{self.input_size[1]}: {self.tokens_with_prefix} tokens "
            f"({self.prefix_tokens} prefix), head: {', '.join(self.heads) or 'none'}",
        ]
        lines += [f"  {b.name:<32} attention={b.attn_child:<16} tokens={b.tokens_with_prefix}" for b in self.blocks]
        for key, value in self.data.items():
            for item in (value if isinstance(value, list) else [value]):
                lines.append(f"  {key}: " + (", ".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict)
                                             else str(item)))
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: Any, where: str = "the file") -> "ConversionPlan":
        """The plan a file recorded, every field checked (a tampered plan is refused, not run)."""
        bad = LtmError(f"{where}: its recorded conversion plan is malformed; the file is corrupt (convert the model again)")
        if not isinstance(data, dict):
            raise bad
        data = _renamed(data, {"num_tokens": "tokens_with_prefix"})
        if set(data) - {f.name for f in fields(cls)}:
            raise bad
        try:
            plan = cls(
                model_class=_text(data["model_class"]), input_size=_pair(data["input_size"]),
                tokens_with_prefix=_count(data["tokens_with_prefix"]), prefix_tokens=_count(data["prefix_tokens"]),
                heads=[_text(h) for h in data.get("heads", [])],
                blocks=[_record(BlockMatch, b) for b in data.get("blocks", [])],
                skipped=[(_text(n), _text(w)) for n, w in data.get("skipped", [])],
                family=_text(data.get("family", "sequence")), data=_json(data.get("data", {})))
        except (KeyError, TypeError, ValueError):
            raise bad from None
        return plan


def records(kind: type, items: Any, where: str = "the conversion plan") -> list[Any]:
    """Dataclasses of ``kind`` from their asdict() forms in a plan's ``data`` (fields: strings,
    counts, (H, W) pairs, lists of strings); a malformed entry is refused in one line."""
    try:
        return [item if isinstance(item, kind) else _record(kind, item) for item in items]
    except (TypeError, ValueError):
        raise LtmError(f"{where}: its {kind.__name__} entries are malformed; the file is corrupt "
                       "(convert the model again)") from None


def _json(value: Any, depth: int = 0) -> Any:
    """Plain JSON data only (what a family may keep in ``data``), bounded in depth and size."""
    if depth > 6:
        raise ValueError("too deep")
    if isinstance(value, dict):
        if len(value) > 4096:
            raise ValueError("too large")
        return {_text(k): _json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > 4096:
            raise ValueError("too large")
        return [_json(v, depth + 1) for v in value]
    if isinstance(value, str):
        return _text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise ValueError(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 512:
        raise ValueError(value)
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**7:
        raise ValueError(value)
    return value


def _pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(value)
    return (_count(value[0]), _count(value[1]))


# token counts renamed to say whether prefix tokens are included (files written before keep the old names)
_OLD_NAMES = {"BlockMatch": {"tokens": "tokens_with_prefix"}, "GridGroup": {"tokens": "mergeable"}}


def _renamed(data: dict, names: dict[str, str]) -> dict:
    """``data`` with the fields of an older file format under today's names (a clash is left to fail)."""
    if not any(old in data and new not in data for old, new in names.items()):
        return data
    return {(names[k] if k in names and names[k] not in data else k): v for k, v in data.items()}


def _record(kind: type, data: Any) -> Any:
    """A dataclass from its asdict() form: strings, counts and (H, W) pairs only."""
    if isinstance(data, dict):
        data = _renamed(data, _OLD_NAMES.get(kind.__name__, {}))
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(kind)}:
        raise ValueError(data)
    parse = {"str": _text, "int": _count, "tuple[int, int]": _pair,
             "list[str]": lambda v: [_text(x) for x in v] if isinstance(v, list) else _text([])}
    return kind(**{f.name: parse[str(f.type)](data[f.name]) for f in fields(kind)})
