"""Model families: each knows one way of putting merges into a model, and nothing else.

A family reads the model analysis (tracer.py) and answers with a plan or the reason it cannot
convert the model, before anything is built; then it builds its merge modules into the model,
exposes what the schedule solver may choose (how many tokens each merge site keeps) and what each
choice costs (its cost model), applies a chosen or saved schedule, and describes what it did.
``api.convert`` runs the same straight pipeline for every family.

A family is one file in this package whose class carries ``@builtin_family``: every module here is
imported on the first dispatch, so a new file is found without editing any list. Families are
tried by ``priority`` (specific before general: rotary / relative-bias / class-attention sequences
before plain token sequences, then unfolded grids, then FFN grids) and the first whose ``find``
returns a plan wins (PEFT's dispatchers); when none does, the error gives every family's reason.
A user's family registers with :func:`register_family` (``examples/custom_rewriter.py``); each
family's ``examples`` (small random-weight models) are converted by tests/test_family_contract.py,
so a family is tested by being registered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from torch import nn

from ltm_convert.errors import UnsupportedModelError
from ltm_convert.schedule import CostModel, Site  # noqa: F401 - part of the family protocol

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan


# an example model a family converts: (source kind, name, options), as ltm_convert.sources.ModelSource
Example = tuple[str, str, dict[str, Any]]


class Family(Protocol):
    """What the pipeline asks of a model family (see the module docstring)."""

    name: str
    priority: int  # lower is tried first
    examples: tuple[Example, ...]  # small random-weight models the family contract test converts

    def find(self, analysis: "Analysis") -> "ConversionPlan | str": ...

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None: ...

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> CostModel: ...

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]: ...

    def apply(self, model: nn.Module, plan: "ConversionPlan", keep: dict[str, int]) -> None: ...

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]: ...


_BUILTIN: list[Family] = []  # by priority
_FIRST: list[Family] = []  # user families tried before the built-in ones (latest first)
_LAST: list[Family] = []  # user families tried after them
_LOADED = False


def builtin_family(cls: type) -> type:
    """Class decorator of a built-in family: registers one instance, tried in ``priority`` order."""
    _BUILTIN.append(cls())
    _BUILTIN.sort(key=lambda f: f.priority)
    return cls


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    package = importlib.import_module("ltm_convert.rewriters")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def register_family(family: Family, *, first: bool = True) -> Family:
    """Add a family; ``first=True`` lets it claim models before the built-in ones."""
    _load_builtin()
    if first:
        _FIRST.insert(0, family)
    else:
        _LAST.append(family)
    return family


def unregister_family(family: Family) -> None:
    for group in (_FIRST, _LAST, _BUILTIN):
        if family in group:
            group.remove(family)


def families() -> list[Family]:
    _load_builtin()
    return [*_FIRST, *_BUILTIN, *_LAST]


def family_named(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise UnsupportedModelError(f"no model family named {name!r} is registered (registered: "
                                f"{', '.join(f.name for f in families())})")


def plan_for(analysis: "Analysis") -> "tuple[Family, ConversionPlan]":
    """The first family that can convert the analysed model, with its plan; or one error line that
    gives every family's reason ("not supported yet: ... (sequence: ...; ffn-grid: ...)")."""
    from ltm_convert.tracer import no_blocks_error

    if not analysis.blocks:
        raise no_blocks_error(analysis)
    reasons = []
    for family in families():
        try:
            found = family.find(analysis)
        except UnsupportedModelError as exc:  # a family that refuses by raising still gives its reason
            found = str(exc)
        if not isinstance(found, str):
            found.family = family.name
            return family, found
        reasons.append(f"{family.name}: {_bare(found)}")
    raise UnsupportedModelError(f"not supported yet: no model family converts {analysis.model_class} "
                                f"({'; '.join(reasons)})")


def _bare(reason: str) -> str:
    """One family's reason inside the joined line: one line, without the shared opening."""
    reason = " ".join(reason.split())
    return reason[len(_OPENING):] if reason.startswith(_OPENING) else reason


_OPENING = "not supported yet: "


def chain_keep(keep: dict[str, int], sites: list[Site]) -> Callable[[str], int]:
    """Look-up of a saved schedule that refuses holes (a file from another model)."""
    from ltm_convert.errors import LtmError

    missing = [s.name for s in sites if s.name not in keep]
    if missing:
        raise LtmError(f"the saved schedule does not cover blocks {missing[:3]}; the file belongs to another model")
    return lambda name: int(keep[name])
