"""Per-forward merge state: it travels with the tokens, never with the model.

A merging block hands the next block fewer tokens and their *sizes* (how many original patches
each token stands for). Those sizes are state of one forward pass, so they ride on the token
tensor itself, as the attribute ``ltm_tokens`` (a :class:`TokenState`): a block reads the state
of its input and attaches the new state to its output. Nothing is stored on the model, so

* two threads (or DataParallel replicas) calling one model never see each other's sizes;
* ``forward_head(forward_features(x))`` pools with the sizes of ``x``, even after other calls;
* a block re-run by activation checkpointing receives the same input tensor, hence the same sizes
  (reentrant checkpointing detaches its inputs: :func:`state_of` finds the state of the tensor
  they were detached from through the storage they share);
* ``torch.compile(fullgraph=True)``, ``torch.export`` and the TorchScript ONNX exporter trace
  Python attribute reads and writes on tensors like any other Python code.

Recording (what each block merged, for visualisation) and source tracking (which token holds
each original patch, for unmerging to the full grid) are off unless a caller asks for them in
its own thread with :func:`recording` / :func:`tracking_sources`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple

import torch

from ltm_convert.merge.rows import take_rows

ATTR = "ltm_tokens"


class TokenState(NamedTuple):
    """The state of one token sequence.

    sizes: (B, N) float32, original patches per token (prefix tokens count 1).
    source: (B, P0) int64 or None: for each of the P0 original patch tokens, the index (into the
        current sequence, prefix included) of the token that holds it. Tracked on request only.
    grid: family-specific payload that must reach a later block of the same forward (the soft
        assignment a MobileViT group unmerges with), or None.
    soft: the sequence comes from the relaxed merge of training (ltm_mask.forward_soft): later blocks
        add log(size) to their attention even where they would not merge themselves.
    valid: (B, N) bool or None: which tokens are real in a padded (NaFlex) batch; merges keep real
        tokens and padding apart (merge/padding.py) and later blocks mask attention by it.
    rows: (B, prefix + N') int64 or None: the tensor holds the merged tokens spread over the full grid
        (:func:`spread_over_grid`, for a model that reads this block output on the grid); row t of
        the merged sequence is its row ``rows[:, t]``, where the next block takes it back
        (merge/rows.py ``take_rows``). ``sizes`` and ``source`` still describe the merged sequence.
    """

    sizes: torch.Tensor
    source: torch.Tensor | None = None
    grid: Any = None
    soft: bool = False  # from a relaxed (training) merge: every token is still there, some with ~0 size
    valid: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __reduce__(self) -> tuple:
        # ``torch.save(features)`` pickles the tensor's attributes: as plain containers, the sizes load
        # back with ``torch.load(weights_only=True)`` (the family payload ``grid`` is left out)
        return (OrderedDict, ([("sizes", self.sizes), ("source", self.source), ("soft", bool(self.soft))],))


# Reentrant checkpointing re-runs a block on ``x.detach()``: a new tensor object over the same
# storage. The registry maps a storage (data pointer, offset, shape) to the tensor the state was
# attached to, weakly, so it never keeps a tensor alive and dies with it.
_REGISTRY: dict[tuple, weakref.ref] = {}


def _tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _key(x: torch.Tensor) -> tuple | None:
    if x.device.type == "meta" or type(x) is not torch.Tensor:  # fake / meta tensors have no storage
        return None
    try:
        return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.device.type)
    except (RuntimeError, NotImplementedError):
        return None


def _forget(key: tuple, ref: weakref.ref) -> None:
    if _REGISTRY.get(key) is ref:
        _REGISTRY.pop(key, None)


def with_state(x: torch.Tensor, state: TokenState | None) -> torch.Tensor:
    """Attach ``state`` to ``x`` (returned for chaining). None clears nothing and attaches nothing."""
    if state is None:
        return x
    setattr(x, ATTR, state)
    if not _tracing():
        key = _key(x)
        if key is not None:
            ref = weakref.ref(x, lambda r, k=key: _forget(k, r))
            _REGISTRY[key] = ref
    return x


def _as_state(found: Any) -> TokenState | None:
    """A state read back from a pickle (:meth:`TokenState.__reduce__`) is a dict: make it a state again."""
    if found is None or isinstance(found, TokenState):
        return found
    if isinstance(found, dict) and isinstance(found.get("sizes"), torch.Tensor):
        source = found.get("source")
        return TokenState(found["sizes"], source if isinstance(source, torch.Tensor) else None, None,
                          bool(found.get("soft", False)))
    return None


def state_of(x: Any) -> TokenState | None:
    """The state attached to ``x``, or to the tensor ``x`` was detached from; None if nothing merged."""
    if not isinstance(x, torch.Tensor):
        return None
    state = _as_state(getattr(x, ATTR, None))
    if state is not None or _tracing():
        return state
    key = _key(x)
    ref = _REGISTRY.get(key) if key is not None else None
    owner = ref() if ref is not None else None
    return _as_state(getattr(owner, ATTR, None)) if owner is not None else None


def carry_state(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook for token-wise modules between the last block and the head (the final norm):
    their output describes the same tokens as their input, so it gets the same state."""
    state = state_of(args[0]) if args else None
    if state is not None and isinstance(output, torch.Tensor) and output.dim() >= 2 \
            and output.shape[:2] == args[0].shape[:2]:
        with_state(output, state)
    return None


# --------------------------------------------------------------------------------------------
# opt-in extras, per thread


_LOCAL = threading.local()


def recorder() -> list[dict] | None:
    """The list this thread's merging blocks append their decisions to, or None (the default)."""
    return getattr(_LOCAL, "records", None)


def destination_rows(targets: torch.Tensor, others: torch.Tensor, strongest: torch.Tensor, prefix: int,
                     keep: int) -> torch.Tensor:
    """(B, prefix + M) output row of every input token: targets go to their own row, the others to
    ``strongest`` (B, R), the row of the target they send most of their mass to."""
    B, keep_ = targets.shape
    M = keep_ + others.shape[1]
    slot_of = torch.empty(B, M, dtype=torch.long, device=targets.device)
    slot_of.scatter_(1, targets, torch.arange(prefix, prefix + keep, device=targets.device).expand(B, keep))
    slot_of.scatter_(1, others, strongest)
    return torch.cat([torch.arange(prefix, device=targets.device).expand(B, prefix), slot_of], dim=1)


def record_assignment(targets: torch.Tensor, others: torch.Tensor, assign: torch.Tensor, near: torch.Tensor | None,
                      sizes_in: torch.Tensor, prefix: int) -> None:
    """Add a mask's decision to the block's entry in the active recording (if any): the full (B, M,
    keep) assignment of every mergeable token, from ``assign`` (B, R, k) over the targets ``near``
    (None: over all targets)."""
    record = recorder()
    if record is None:
        return
    B, keep = targets.shape
    R = others.shape[1]
    full = torch.zeros(B, keep + R, keep, dtype=assign.dtype, device=assign.device)
    eye = torch.eye(keep, dtype=assign.dtype, device=assign.device).expand(B, keep, keep)
    full.scatter_(1, targets.unsqueeze(-1).expand(B, keep, keep), eye)
    spread = assign if near is None else torch.zeros(B, R, keep, dtype=assign.dtype,
                                                    device=assign.device).scatter_(2, near, assign)
    full.scatter_(1, others.unsqueeze(-1).expand(B, R, keep), spread)
    record[-1].update(targets=targets, assign=full.detach(), prefix=prefix, sizes_in=sizes_in.detach())


def recording_merges() -> bool:
    """True inside ``recording(merges=True)`` in this thread."""
    return bool(getattr(_LOCAL, "merges", False))


@contextlib.contextmanager
def recording(merges: bool = False) -> Iterator[list[dict]]:
    """Collect, for the forwards run in this thread inside the block, one dict per merging block:
    block name, tokens in, targets, soft assignment, prefix, input sizes (see tools/visualize.py).
    With ``merges``, an LTM mask's hard merge also adds ``merge``: the tensors of its merge with
    their graph (finetune/keep_fit.py prices each token's merge from them)."""
    previous, previous_merges = recorder(), recording_merges()
    records: list[dict] = []
    _LOCAL.records, _LOCAL.merges = records, merges
    try:
        yield records
    finally:
        _LOCAL.records, _LOCAL.merges = previous, previous_merges


def sources_tracked() -> bool:
    return bool(getattr(_LOCAL, "sources", False))


@contextlib.contextmanager
def tracking_sources() -> Iterator[None]:
    """Inside the block, merging blocks of this thread keep :attr:`TokenState.source` up to date,
    so a merged sequence can be spread back over the full patch grid (:func:`unmerge_tokens`)."""
    previous = sources_tracked()
    _LOCAL.sources = True
    try:
        yield
    finally:
        _LOCAL.sources = previous


def captured() -> dict | None:
    """The dict this thread's blocks record their output states in (block name -> state), or None."""
    return getattr(_LOCAL, "capture", None)


@contextlib.contextmanager
def capturing() -> Iterator[dict]:
    """Collect the state every converted block leaves, by block name, for the forwards of this thread
    inside the block (unmerging intermediate outputs that the caller has already sliced)."""
    previous = captured()
    states: dict = {}
    _LOCAL.capture = states
    try:
        yield states
    finally:
        _LOCAL.capture = previous


def initial_source(batch: int, prefix: int, patches: int, device: torch.device) -> torch.Tensor:
    """Before any merge patch j is token prefix + j."""
    return (torch.arange(patches, device=device) + prefix).expand(batch, patches)


def unmerge_tokens(x: torch.Tensor, state: TokenState | None, prefix: int) -> torch.Tensor:
    """(B, N', C) merged patch tokens -> (B, P0, C): every original patch takes the value of the
    token it was merged into (prefix tokens are dropped; they have no place on the grid)."""
    if state is None:
        return x[:, prefix:]
    if state.source is None:
        from ltm_convert.errors import LtmError

        raise LtmError("the merged tokens carry no source map; run the forward inside "
                       "ltm_convert.merge.state.tracking_sources() to unmerge them")
    return take_rows(x, state.source)


def spread_over_grid(x: torch.Tensor, state: TokenState, prefix: int) -> torch.Tensor:
    """(B, prefix + N', C) merged tokens -> (B, prefix + P0, C), the original sequence's shape: prefix
    tokens stay in front and every original patch takes the value of the token that holds it. A
    head's plain mean over this grid is each merged token counted once per patch it holds, and an
    attention pool over it is proportional attention by those counts: the original head computes
    that on its own, with no side state to lose (``f.clone()``, slicing, numpy, hooks all keep it)."""
    return torch.cat([x[:, :prefix], unmerge_tokens(x, state, prefix)], dim=1)


def spread_rows(source: torch.Tensor, prefix: int, tokens: int) -> torch.Tensor:
    """(B, tokens) row of each merged token in its sequence spread over the grid (prefix tokens stay
    in front): the first original patch it holds (every merged token holds at least one)."""
    B, P0 = source.shape
    ids = torch.arange(tokens, device=source.device)
    if torch.onnx.is_in_onnx_export():
        # the exporter's scatter_reduce declares a wrong output shape at batch 1 (onnxruntime then fails
        # on a static-batch file): the first patch of each token as the first hit of a (B, tokens, P0) match
        hits = (source.unsqueeze(1) == ids.view(1, tokens, 1)).to(torch.float32)
        first = hits.argmax(-1) + prefix
        return torch.where(ids.view(1, tokens) < prefix, ids.view(1, tokens), first)
    last = prefix + P0 - 1
    # prefix tokens keep their row; the others start past the grid and take their patches' minimum
    start = ids.masked_fill(ids >= prefix, last + 1)
    patches = (torch.arange(P0, device=source.device) + prefix).expand(B, P0)
    rows = start.expand(B, tokens).contiguous().scatter_reduce(1, source, patches, reduce="amin", include_self=True)
    return rows.clamp_max(last)


def merge_sequence(mask: torch.nn.Module, z: torch.Tensor, state: TokenState | None, prefix: int, keep: int,
                   name: str, track: bool = False) -> tuple[torch.Tensor, TokenState]:
    """Run a sequence mask (``mask(z, sizes, prefix, keep, track) -> (tokens, sizes, dest)``) and
    build the state of its output: the new sizes, and the source map when the block asks for it
    (``track``: its model spreads the last tokens back over the grid) or this thread tracks them
    (``dest``: the output row of every input token)."""
    record = recorder()
    if record is not None:
        record.append({"block": name, "tokens_in": z.shape[1]})
    track = track or sources_tracked()
    valid = state.valid if state is not None else None
    if valid is not None:  # a padded batch: real tokens and padding never share a merged token
        from ltm_convert.merge.padding import merge_padded

        merged, sizes, dest, valid = merge_padded(mask, z, state.sizes, valid, prefix, keep)
    else:
        merged, sizes, dest = mask(z, state.sizes if state is not None else None, prefix, keep, track)
    source = None
    if track and dest is not None:
        B, N = dest.shape
        old = state.source if state is not None and state.source is not None else \
            initial_source(B, prefix, N - prefix, z.device)
        source = dest.gather(1, old)
    # sizes are bookkeeping: they travel between blocks outside any checkpointed function's inputs,
    # so they carry no gradient (a reentrant checkpoint could not replay one)
    return merged, TokenState(sizes.detach(), source, valid=valid)


class SequenceMask:
    """The contract of a merge method's mask module (a mixin of an ``nn.Module``; merge/methods.py
    registers the factories that build one per converted block).

    ``forward(z, sizes, prefix, keep, track) -> (tokens, sizes, dest)``:
        z (B, N, C) tokens after attention, the first ``prefix`` never merged; sizes (B, N) float32
        or None (every token counts 1); ``keep`` mergeable tokens stay. Returns the (B, prefix + keep, C)
        tokens, their (B, prefix + keep) float32 sizes, and ``dest`` (B, N) int64, the output row
        of every input token, or None when ``track`` is False and the mask did not compute it.
    The rest has defaults a mask overrides when it can say more:
        ``flops(tokens, keep, prefix)``: the mask's own FLOPs (None: the cost model counts one call);
        ``soft()``: whether it is running the relaxed merge of training (every token stays);
        ``topk`` / ``prune``: settings that change its cost (part of the counted cost's key).
    """

    topk: int = 0
    prune: bool = False

    def flops(self, tokens: int, keep: int, prefix: int) -> int | None:
        return None

    def soft(self) -> bool:
        return False

    def merge_tokens(self, z: torch.Tensor, state: TokenState | None, prefix: int, keep: int,
                     name: str, track: bool = False) -> tuple[torch.Tensor, TokenState]:
        return merge_sequence(self, z, state, prefix, keep, name, track)  # type: ignore[arg-type]
