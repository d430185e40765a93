"""LTM blocks: the converted block is the original object, with a merge between attention and MLP.

A block is converted in place: its class becomes a subclass of its own class that overrides
``forward`` (:func:`ltm_class`), and the mask module is added as the child ``ltm_mask``. So the
block keeps its children, parameters, hooks and state-dict keys, and everything that looks for
its class still finds it (HF's hidden-state recorder and gradient checkpointing, timm's feature
helpers, ``isinstance`` checks in user code).

The new ``forward`` runs the block's own code cut in two at the attention residual
(analysis/block_split.py): ``z = part_a(x, bias=log sizes)``, the merge, ``part_b(z)``. Token
sizes ride on the token tensors (merge/state.py), never on the model.

The generated subclasses are picklable by name (generated.py), so converted models pickle,
deep-copy and travel to ``torch.multiprocessing`` workers like any model; the cut code is
regenerated after unpickling.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ltm_convert.analysis.block_split import BlockCall, SplitBlock, split_block
from ltm_convert.errors import LtmError
from ltm_convert.generated import DropsGenerated, generated_subclass, rebuild
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.state import (
    SequenceMask,
    TokenState,
    captured,
    recorder,
    sources_tracked,
    spread_over_grid,
    spread_rows,
    state_of,
    with_state,
)

CLASS_PREFIX = "LtmBlock__"


def ltm_class(original: type) -> type:
    """The LTM subclass of a block class (created once, then cached; picklable by name)."""
    return generated_subclass(CLASS_PREFIX, original, __name__, LtmBlockMixin)


def __getattr__(name: str) -> Any:
    """Rebuild a generated class from its name (what pickle asks for in a fresh process)."""
    return rebuild(__name__, name, {CLASS_PREFIX: ltm_class})


# --------------------------------------------------------------------------------------------
# the block


class LtmBlockMixin(DropsGenerated):
    """The forward of a converted block (placed in front of the original class in the MRO).

    Per-block settings (plain attributes, set by the family that converts the block):
    ltm_name (module path), ltm_prefix (leading tokens never merged), ltm_in_with_prefix (tokens
    entering at the planned resolution, prefix included) / ltm_keep_mergeable (mergeable tokens
    kept, prefix excluded), ltm_prop_attn (add
    log(size) to the attention logits: True once an earlier block merged), ltm_unmerge (grid
    groups: restore the full grid after this block), and ``ltm_mask`` (child module or None).
    """

    ltm_original_class: type
    ltm_mask: Any
    ltm_generated_keys = ("_ltm_split",)  # the cut code: rebuilt after unpickling, shared by deep copies
    # ``__dict__["_ltm_positions"]``: an optional :class:`PositionRule` set by the family that converted
    # the block (picklable, holds no tensors of its own)
    ltm_track_sources = False  # (class defaults: models pickled before these settings existed)
    ltm_full_grid_out = False
    ltm_spread_out = False

    def ltm_setup(self, *, call: BlockCall, attn_child: str, name: str, prefix: int, in_with_prefix: int,
                  keep_mergeable: int, mask: nn.Module | None, prop_attn: bool = False,
                  unmerge: bool = False) -> None:
        self.ltm_mask = mask
        self.ltm_name = name
        self.ltm_prefix = prefix
        self.ltm_unmerge = unmerge
        self.ltm_collapse = False  # keep one patch token, their size-weighted mean (nothing reads them)
        self.ltm_track_sources = False  # keep the source map: a later block spreads the tokens over the grid
        self.ltm_full_grid_out = False  # last block before a pooling head: hand it the original's shape
        # a block whose output the model reads on the patch grid: hand it out spread over the grid, the
        # next block takes the merged tokens back (TokenState.rows)
        self.ltm_spread_out = False
        self.__dict__["_ltm_call"] = call
        self.__dict__["_ltm_attn_child"] = attn_child
        self.register_buffer("ltm_schedule", torch.zeros(2, dtype=torch.long))
        self.register_load_state_dict_pre_hook(check_schedule)
        self.ltm_set(in_with_prefix, keep_mergeable, prop_attn)

    def ltm_set(self, in_with_prefix: int, keep_mergeable: int, prop_attn: bool) -> None:
        """Set the block's static counts. They are also a buffer (``ltm_schedule``), so a state dict
        records the schedule it was trained with and refuses to load into another one."""
        self.ltm_in_with_prefix, self.ltm_keep_mergeable = int(in_with_prefix), int(keep_mergeable)
        self.ltm_prop_attn = bool(prop_attn)
        if self.ltm_schedule.device.type != "meta":
            self.ltm_schedule.copy_(torch.tensor([self.ltm_in_with_prefix, self.ltm_keep_mergeable]))

    # the counts' names before they said whether prefix tokens are included (read-only, for code
    # written against them, e.g. a family of one's own)
    ltm_tokens_in = property(lambda self: self.ltm_in_with_prefix)
    ltm_keep = property(lambda self: self.ltm_keep_mergeable)

    def ltm_split(self) -> SplitBlock:
        split = self.__dict__.get("_ltm_split")
        if split is None:
            split = split_block(self, self.__dict__["_ltm_attn_child"], self.__dict__["_ltm_call"],
                                cls=type(self).ltm_original_class)
            self.__dict__["_ltm_split"] = split
        return split

    # -- schedule ---------------------------------------------------------------------------------
    def keep_for(self, tokens_in: int) -> int:
        """Mergeable tokens kept for an input of ``tokens_in`` tokens (static per resolution)."""
        planned_m = self.ltm_in_with_prefix - self.ltm_prefix
        if tokens_in == self.ltm_in_with_prefix:
            return self.ltm_keep_mergeable
        m = tokens_in - self.ltm_prefix
        return max(1, min(m, int(round(m * self.ltm_keep_mergeable / max(planned_m, 1)))))

    def merges(self, tokens_in: int | None = None) -> bool:
        tokens_in = self.ltm_in_with_prefix if tokens_in is None else tokens_in
        return self.ltm_mask is not None and self.keep_for(tokens_in) < tokens_in - self.ltm_prefix

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        ltm = (f"ltm: prefix={self.ltm_prefix}, tokens_in={self.ltm_in_with_prefix}, keep={self.ltm_keep_mergeable}")
        return f"{base}, {ltm}" if base else ltm

    # -- forward ------------------------------------------------------------------------------------
    def _bind(self, split: SplitBlock, args: tuple, kwargs: dict, accepts: tuple[str, ...] = ()) -> dict[str, Any]:
        """The call's arguments by name; a constant the block was cut with must keep its value, except
        those the block's position rule takes over (``accepts``: NaFlex's attention mask)."""
        names = [p for p in split.signature.parameters if p != "self"]
        values = dict(zip(names, args))
        values.update(kwargs)
        for key, planned in split.constants.items():
            if key in accepts:
                continue
            value = values.get(key, planned)
            if isinstance(value, torch.Tensor) or (value is None) != (planned is None):
                if type(value).__name__ == "BlockMask":  # HF switched to flex_attention after conversion
                    raise LtmError(
                        f"{type(self).ltm_original_class.__name__} {self.ltm_name} received a flex_attention "
                        "BlockMask; merged tokens need attention that takes the token-size bias: run the model with "
                        "attn_implementation 'sdpa' or 'eager' (model.set_attn_implementation('sdpa'))")
                raise LtmError(
                    f"{type(self).ltm_original_class.__name__} {self.ltm_name} was converted for calls with "
                    f"{key}={planned!r} and got a different {key}; convert the model for this calling convention"
                )
        return values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        split = self.ltm_split()
        rule = self.__dict__.get("_ltm_positions")
        values = self._bind(split, args, kwargs, getattr(rule, "accepts", ()))
        x = values[split.a_inputs[0]]
        state = state_of(x)
        if state is not None and state.rows is not None:  # the previous block's output, spread over the grid
            x = values[split.a_inputs[0]] = take_rows(x, state.rows)
            state = state._replace(rows=None)
        if rule is not None and hasattr(rule, "arriving"):  # e.g. the validity of a padded batch's tokens
            state = rule.arriving(self, values, state)
        if state is None and self.ltm_prop_attn and x.shape[1] == self.ltm_in_with_prefix:
            raise LtmError(
                f"block {self.ltm_name} received merged tokens without their sizes: code between the blocks "
                "replaced the token tensor (ltm_convert attaches the sizes to it); call the blocks in sequence")
        bias = None
        if state is not None and (self.ltm_prop_attn or state.soft):
            # proportional attention weighs a token by its size; without it, the relaxed merge of
            # training must still look like the hard one: a token counts by its presence (size
            # capped at 1), so an emptied token vanishes and a target counts once, as after a hard merge
            sizes = state.sizes if self.ltm_prop_attn else state.sizes.detach().clamp_max(1.0)
            bias = sizes.clamp_min(1e-6).log()[:, None, None, :]
            bias = bias.to(x.dtype if x.is_floating_point() else torch.float32)
        if rule is not None:  # what the model attaches to positions (rotary tables, relative bias) follows the tokens
            values, bias = rule.block_inputs(self, values, state, bias)
        z = split.part_a(self, *[values[n] for n in split.a_inputs], bias)
        # grid groups (MobileViT) merge with their own modules; only a sequence mask relaxes in training
        soft = isinstance(self.ltm_mask, SequenceMask) and self.ltm_mask.soft()
        # training relaxes the merge (every token stays, so the planned count applies); inference
        # merges to the count planned for the tokens that arrive
        if soft:
            keep = self.ltm_keep_mergeable if self.ltm_keep_mergeable < self.ltm_in_with_prefix - self.ltm_prefix else None
        else:
            keep = self.keep_for(z.shape[1]) if self.merges(z.shape[1]) else None
        if keep is not None:
            if self.ltm_collapse and keep == 1:
                z, state = collapse_tokens(z, state, self.ltm_prefix, self.ltm_name)
            else:
                if state is not None and state.valid is not None:  # a padded batch: each image keeps its own share
                    from ltm_convert.merge.padding import image_share

                    with image_share(lambda v: self.keep_for(self.ltm_prefix + v)):
                        z, state = self.ltm_mask.merge_tokens(z, state, self.ltm_prefix, keep, self.ltm_name,
                                                              track=self.ltm_track_sources)
                else:
                    z, state = self.ltm_mask.merge_tokens(z, state, self.ltm_prefix, keep, self.ltm_name,
                                                          track=self.ltm_track_sources)
                if soft:
                    state = state._replace(soft=True)
        out = split.part_b(self, z, *[values[n] for n in split.b_inputs])
        if self.ltm_unmerge and state is not None and state.grid is not None:
            out = state.grid.unmerge_sequence(out) if isinstance(out, torch.Tensor) else \
                (state.grid.unmerge_sequence(out[0]), *out[1:])
            state = None
        if (self.ltm_full_grid_out or self.ltm_spread_out) and state is not None and not state.soft \
                and state.source is not None:
            out = spread_over_grid(out, state, self.ltm_prefix) if isinstance(out, torch.Tensor) else \
                (spread_over_grid(out[0], state, self.ltm_prefix), *out[1:])
            # the last block's spread is the original sequence for the head; another's is taken back by the next
            state = None if self.ltm_full_grid_out else \
                state._replace(rows=spread_rows(state.source, self.ltm_prefix, state.sizes.shape[1]))
        head = out if isinstance(out, torch.Tensor) else out[0]
        with_state(head, state)
        capture = captured()
        if capture is not None:
            capture[self.ltm_name] = state
        return out


class PositionRule(Protocol):
    """How a family makes the per-position inputs of a block follow merged tokens.

    Called before the block's attention half with the bound block inputs (``values``, by parameter
    name), the incoming token state (None before any merge; ``state.source`` maps every original
    patch to the token holding it when the family tracks sources) and the proportional-attention
    bias (log sizes, or None). Returns the inputs and the bias the attention half receives: e.g. a
    rotary table evaluated at the merged tokens' positions, or a relative-position bias whose
    column for a merged key is the log-sum-exp of its members' columns (which replaces log size).

    Optional: ``accepts`` (names of block arguments the block was cut without, which the rule takes
    over, e.g. NaFlex's ``attn_mask``) and ``arriving(block, values, state) -> state`` (called first,
    to give the incoming state what the rule knows, e.g. which tokens of a padded batch are real).
    """

    def block_inputs(self, block: nn.Module, values: dict[str, Any], state: TokenState | None,
                     bias: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor | None]: ...


def collapse_tokens(z: torch.Tensor, state: TokenState | None, prefix: int, name: str) -> tuple[torch.Tensor, TokenState]:
    """All mergeable tokens into one, their size-weighted mean: for the last block before a head that
    reads only the prefix tokens, where no merge decision can matter (and none is computed)."""
    B, N, _ = z.shape
    sizes = state.sizes if state is not None else z.new_ones(B, N, dtype=torch.float32)
    w = sizes[:, prefix:].to(z.dtype).unsqueeze(-1)
    mean = (z[:, prefix:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    new_sizes = torch.cat([sizes[:, :prefix], sizes[:, prefix:].sum(1, keepdim=True)], dim=1)
    source = None
    if sources_tracked():
        source = torch.full((B, state.source.shape[1] if state is not None and state.source is not None else N - prefix),
                            prefix, dtype=torch.long, device=z.device)
    record = recorder()
    if record is not None:
        record.append({"block": name, "tokens_in": N, "targets": torch.zeros(B, 1, dtype=torch.long, device=z.device),
                       "assign": torch.ones(B, N - prefix, 1, device=z.device), "prefix": prefix,
                       "sizes_in": sizes[:, prefix:].detach()})
    return torch.cat([z[:, :prefix], mean], dim=1), TokenState(new_sizes.detach(), source)


def check_schedule(module: nn.Module, state_dict: dict, prefix: int | str, *args: Any) -> None:
    """Load-state-dict pre-hook: a state dict saved at another schedule is refused with the reason
    (loading it would give silently different outputs: the masks were trained for other counts)."""
    key = f"{prefix}ltm_schedule"
    theirs = state_dict.get(key)
    if theirs is None or not isinstance(theirs, torch.Tensor) or theirs.device.type == "meta":
        return
    ours = module.ltm_schedule
    if ours.device.type != "meta" and not torch.equal(theirs.to(ours.device).long(), ours):
        raise LtmError(
            f"this state dict was saved from a model converted with another schedule ({prefix.rstrip('.')} receives "
            f"{int(theirs[0])} tokens and keeps {int(theirs[1])} there, {int(ours[0])} and {int(ours[1])} here); "
            "convert with the same settings (ltm_convert.load rebuilds a saved model exactly)")


def is_converted(model: nn.Module) -> bool:
    """Whether ltm_convert converted the model (a sequence block or a grid merge in it)."""
    from ltm_convert.merge.grid import GridMerge

    return any(isinstance(m, (LtmBlockMixin, GridMerge)) for m in model.modules())


def ltm_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every converted block of a model, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LtmBlockMixin)]
