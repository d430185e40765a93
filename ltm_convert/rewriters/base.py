"""Model families: each knows one way of putting merges into a model, and nothing else.

A family reads the model analysis (tracer.py) and answers with a plan or the reason it cannot
convert the model; then it builds its merge modules into the model, exposes what the schedule
solver may choose (how many tokens each merge site keeps), applies a chosen or saved schedule,
switches merging off, and describes what it did. ``api.convert`` runs the same straight pipeline
for every family; adding a family is one new file that calls :func:`register_family`
(``examples/custom_rewriter.py`` shows one).

Families are tried in order and the first whose ``find`` returns a plan wins (PEFT's
dispatchers); the built-in ones are: token sequences (ViT, DeiT, DINOv2, CLIP, SigLIP...),
unfolded patch grids (MobileViT) and FFN grids (Swin, EfficientViT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from torch import nn

from ltm_convert.errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan


@dataclass
class Site:
    """One place where a converted model merges: ``tokens`` mergeable tokens enter it at the planned
    resolution (for a chained site: when no earlier site merged) and it may keep any of
    ``options`` of them. Chained sites (token sequences) pass their output on to the next site, so
    the next one receives what this one kept; grid sites are independent."""

    name: str
    tokens: int
    options: list[int] = field(default_factory=list)  # allowed kept counts, ascending; empty = 1..tokens
    chained: bool = True
    prefix: int = 0
    # nothing reads this site's mergeable tokens afterwards (the last block before a class-token
    # head): merging them all into one costs nothing in quality, so it keeps 1 whatever the shape
    free: bool = False

    def allowed(self, tokens_in: int) -> list[int]:
        return [k for k in self.options if k <= tokens_in] if self.options else list(range(1, tokens_in + 1))


class Family(Protocol):
    """What the pipeline asks of a model family (see the module docstring)."""

    name: str

    def find(self, analysis: "Analysis") -> "ConversionPlan | str": ...

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None: ...

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]: ...

    def apply(self, model: nn.Module, plan: "ConversionPlan", keep: dict[str, int]) -> None: ...

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]: ...


_FAMILIES: list[Family] = []


def _builtin() -> None:
    if _FAMILIES:
        return
    from ltm_convert.rewriters.ffn_grid import FfnGridFamily
    from ltm_convert.rewriters.relative_bias import RelativeBiasFamily
    from ltm_convert.rewriters.sequence import SequenceFamily
    from ltm_convert.rewriters.unfolded_grid import UnfoldedGridFamily

    _FAMILIES.extend([RelativeBiasFamily(), SequenceFamily(), UnfoldedGridFamily(), FfnGridFamily()])


def register_family(family: Family, *, first: bool = True) -> Family:
    """Add a family; ``first=True`` lets it claim models before the built-in ones."""
    _builtin()
    if first:
        _FAMILIES.insert(0, family)
    else:
        _FAMILIES.append(family)
    return family


def unregister_family(family: Family) -> None:
    if family in _FAMILIES:
        _FAMILIES.remove(family)


def families() -> list[Family]:
    _builtin()
    return list(_FAMILIES)


def family_named(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise UnsupportedModelError(f"no model family named {name!r} is registered (registered: "
                                f"{', '.join(f.name for f in families())})")


def plan_for(analysis: "Analysis") -> "tuple[Family, ConversionPlan]":
    """The first family that can convert the analysed model, with its plan; or one error that
    says what each family found."""
    from ltm_convert.tracer import no_blocks_error

    if not analysis.blocks:
        raise no_blocks_error(analysis)
    reasons = []
    for family in families():
        found = family.find(analysis)
        if not isinstance(found, str):
            found.family = family.name
            return family, found
        reasons.append(found)
    # families are ordered from the most common to the most general: the last one's reason is the
    # most informative (it says what the others already ruled out)
    raise UnsupportedModelError(reasons[-1])


def chain_keep(keep: dict[str, int], sites: list[Site]) -> Callable[[str], int]:
    """Look-up of a saved schedule that refuses holes (a file from another model)."""
    from ltm_convert.errors import LtmError

    missing = [s.name for s in sites if s.name not in keep]
    if missing:
        raise LtmError(f"the saved schedule does not cover blocks {missing[:3]}; the file belongs to another model")
    return lambda name: int(keep[name])
