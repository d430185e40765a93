"""What building a model may cost and touch: its size, the network, stderr, and how it may fail.

A recipe in a file (or a model spec) is code input: every option is bounded on its own
(options.py), but their product is not (depth 96 x width 8192 x mlp_ratio 16 is ~232 billion
parameters, ~0.9 TB), so the model is first built on the meta device (no memory, milliseconds)
and its tensors counted. Hub access happens only where the user asked for pretrained weights;
anything else runs with the hub in offline mode (cached files only). Constructors of timm and
transformers raise AssertionError, ValueError, huggingface_hub's StrictDataclassError, ... on bad
options: all of them become one-line LtmErrors here.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.sources.spec import _first

# generous: ViT-g is 1.1e9, the largest public ViTs ~2e9-2.5e9; 3e9 float32 parameters are 12 GB
MAX_PARAMETERS = 3_000_000_000

M = TypeVar("M", bound=nn.Module)


def tensor_count(model: nn.Module) -> int:
    """Elements in the model's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel()
    return sum(seen.values())


def check_size(model: nn.Module, what: str) -> None:
    """Refuse a model above :data:`MAX_PARAMETERS` with one line (``model`` may live on the meta device)."""
    n = tensor_count(model)
    if n > MAX_PARAMETERS:
        raise LtmError(f"{what} would have {n / 1e9:.1f} billion parameters ({n * 4 / 2**30:,.0f} GiB in float32), "
                       f"over ltm_convert's limit of {MAX_PARAMETERS / 1e9:g} billion; check its size options "
                       "(depth, width, mlp ratio, image size)")


def _on_meta() -> bool:
    import torch

    get = getattr(torch, "get_default_device", None)
    return get is not None and get().type == "meta"


def sized(make: Callable[[], M], what: str, probe: Callable[[], nn.Module] | None = None) -> M:
    """``make()``, after ``probe()`` (default: ``make``) built on the meta device passed :func:`check_size`.

    A constructor that cannot run on the meta device (it computes on tensors) gives no estimate;
    each of its options is still bounded on its own.
    """
    import torch

    if _on_meta():
        model = make()
        check_size(model, what)
        return model
    try:
        with torch.device("meta"):
            skeleton = (probe or make)()
    except LtmError:
        raise
    except Exception:  # noqa: BLE001 - no estimate; the real build below reports a real problem
        skeleton = None
    if skeleton is not None:
        check_size(skeleton, what)
        del skeleton
    return make()


def constructor_error(e: BaseException, what: str) -> LtmError:
    """What a constructor raised on bad options (AssertionError, ValueError, huggingface_hub's
    StrictDataclassError, an allocation failure, ...) as one LtmError; an LtmError stays as it is."""
    if isinstance(e, LtmError):
        return e
    text = _first(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "alloc" in text.lower()):
        return LtmError(f"not enough memory to build {what} ({text}); check its size options")
    if isinstance(e, RecursionError):
        return LtmError(f"{what} cannot be built: its options nest too deep")
    return LtmError(f"{what} cannot be built with these options ({type(e).__name__}: {text}); "
                    "fix or drop the offending option")


@contextmanager
def hub_offline() -> Iterator[None]:
    """The model hub in offline mode (HF_HUB_OFFLINE semantics): cached files load, nothing is
    downloaded and no connection is opened; a file not in the cache fails at once."""
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old


@contextmanager
def quiet_hf(errors_only: bool = False) -> Iterator[None]:
    """No progress bars on stderr from transformers / huggingface_hub during our own calls (a CLI
    run prints its own status lines; bars are noise in logs and in `--json` pipelines).
    ``errors_only``: transformers logs errors only (e.g. its load report of the ltm_* tensors it
    does not know, which ltm_convert loads itself)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    tf_bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if tf_bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()
