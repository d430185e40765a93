"""The token-sequence family: ViT, DeiT, DeiT-III, DINOv2, SigLIP, CLIP (timm and HF).

It covers every "x + attn(...); x + mlp(...)" block that works on a (batch, tokens, dim)
sequence whose halves can be cut by graph analysis (analysis/block_split.py), without a
per-class table. Each block is converted in place (ltm_block.py): after its attention the mask
chosen by ``config.method`` merges the mergeable tokens down to the scheduled count, and every
later block runs on the shorter sequence. What follows the blocks is adapted by heads.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ltm_convert.analysis.block_split import bind_call, split_block
from ltm_convert.analysis.heads import classify_heads, prefix_tokens, read_as_grid
from ltm_convert.errors import LtmError, UnsupportedModelError
from ltm_convert.ltm_block import PositionRule, ltm_class
from ltm_convert.merge.methods import MaskSpec, mask_factory
from ltm_convert.merge.positions import refused_positions
from ltm_convert.rewriters.attention_bias import give_attention_a_mask, warn_without_bias
from ltm_convert.rewriters.base import Site, builtin_family, chain_keep
from ltm_convert.rewriters.heads import install_head_adapters

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan


def side_templates(call: Any, args: tuple, kwargs: dict, block: nn.Module) -> dict[str, torch.Tensor]:
    """Meta stand-ins (shape, dtype) for the block's tensor inputs other than the tokens, so its two
    halves can be counted in isolation."""
    import inspect

    from ltm_convert.analysis.block_split import unwrapped_forward
    from ltm_convert.flops import meta_like

    bound = inspect.signature(unwrapped_forward(block)).bind(block, *args, **kwargs).arguments
    return {name: meta_like(bound[name]) for name in call.tensor_names if name != call.x_name}


def pools_patches(plan: "ConversionPlan") -> bool:
    """Whether what follows the blocks reads the patch tokens: as a set (average, max or attention
    pooling), or as the model's output sequence (an HF base model's last_hidden_state), which then
    has the original's shape and every patch the value of the token holding it."""
    return bool(set(plan.heads) & {"avg", "max", "attention-pool", "sequence"})


def converted_blocks(model: nn.Module, plan: "ConversionPlan") -> list[Any]:
    modules = dict(model.named_modules())
    return [modules[name] for name in plan.block_names]


@builtin_family
class SequenceFamily:
    name = "sequence"
    priority = 50
    follows: frozenset[str] = frozenset()  # position modules (merge/positions.py REFUSED) a subclass follows
    full_sequence_out = False  # a subclass whose last block always hands the whole original sequence out
    examples = (
        ("timm", "vit_tiny_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=128, num_classes=5)),
        ("timm", "vit_tiny_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=128, num_classes=5,
                                              global_pool="avg", class_token=False)),
        ("hf-config", "ViTModel", {"config": dict(model_type="vit", image_size=128, patch_size=16, hidden_size=64,
                                                  num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)}),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        from ltm_convert.tracer import ConversionPlan

        if analysis.cut_refusal:
            return analysis.cut_refusal
        if refused_positions(m for m in analysis.modules.values() if type(m).__name__ not in self.follows):
            # the rotary family gives the reason
            return f"{analysis.model_class}'s rotary positions cannot follow merged tokens (see rotary)"
        if analysis.on_maps or len(analysis.token_counts) != 1:
            return (f"{analysis.model_class}'s blocks do not all work on one token sequence "
                    f"(token counts {analysis.token_counts})")
        tokens = analysis.blocks[0].tokens_with_prefix
        prefix = prefix_tokens(analysis.facts, analysis.block_adds[0][0], tokens)
        names = [b.name for b in analysis.blocks]
        try:
            heads, carry = classify_heads(analysis.facts, analysis.block_adds[-1][1], prefix, grid=True,
                                          full=self.full_sequence_out)
        except UnsupportedModelError as exc:
            return str(exc)
        # block outputs the model's own code lays out on the 2-D patch grid (HF backbones' feature maps,
        # DPT's reassembly): those blocks hand out their tokens spread over the full grid (build)
        grid_reads = [name for name, (_, out) in zip(names[:-1], analysis.block_adds[:-1])
                      if read_as_grid(analysis.facts, out, names)] + (names[-1:] if "grid" in heads else [])
        data: dict[str, Any] = {"carry": carry, **({"grid_reads": grid_reads} if grid_reads else {})}
        reshape = getattr(getattr(analysis.modules.get(""), "config", None), "reshape_hidden_states", None)
        if isinstance(reshape, bool):  # an HF backbone: what its feature maps were traced as (heads.py checks it)
            data["reshape_hidden_states"] = reshape
        plan = ConversionPlan(model_class=analysis.model_class, input_size=analysis.input_size,
                              tokens_with_prefix=tokens, prefix_tokens=prefix, heads=heads, blocks=list(analysis.blocks),
                              skipped=list(analysis.skipped), data=data)
        try:  # what each block receives besides its tokens, checked before anything is built
            for match in plan.blocks:
                block = analysis.modules[match.name]
                args, kwargs = analysis.calls[match.name]
                self.check_side_inputs(block, match, plan, side_templates(bind_call(block, args, kwargs), args, kwargs,
                                                                          block))
        except UnsupportedModelError as exc:
            return str(exc)
        return plan

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        modules = dict(model.named_modules())
        factory = mask_factory(config.method)
        # blocks whose outputs the model lays out on the patch grid hand them out spread over it (the
        # next block takes its merged tokens back): such a model is dense whatever the config says
        grid_reads = set(plan.data.get("grid_reads", []))
        plan.data["dense"] = bool(config.dense or grid_reads)  # read by sites(): no last-block collapse
        # dense (asked for): the last block hands its tokens out on the full grid too, so forward_features
        # and every output keep the original's shape
        full_grid = pools_patches(plan) or "grid" in plan.heads or bool(config.dense)
        without_bias: dict[str, str] = {}  # block -> why its attention cannot take the size bias
        for i, match in enumerate(plan.blocks):
            block = modules[match.name]
            args, kwargs = analysis.calls[match.name]
            why = give_attention_a_mask(block, match.name, match.attn_child, analysis)
            if why is not None:
                without_bias[match.name] = why
            call = bind_call(block, args, kwargs)
            side = side_templates(call, args, kwargs, block)
            self.check_side_inputs(block, match, plan, side)
            split = split_block(block, match.attn_child, call)
            attn = getattr(block, match.attn_child)
            spec = MaskSpec(dim=match.dim, block=block, attn=attn, pre_norm=split.pre_norm, first=(i == 0),
                            topk=config.topk, index=i, version=config.mask_version)
            param = next(block.parameters())
            mask = factory(spec).to(device=param.device, dtype=param.dtype)
            block.__class__ = ltm_class(type(block))
            block.ltm_setup(call=call, attn_child=match.attn_child, name=match.name, prefix=plan.prefix_tokens,
                            in_with_prefix=match.tokens_with_prefix,
                            keep_mergeable=match.tokens_with_prefix - plan.prefix_tokens, mask=mask)
            block.__dict__["_ltm_split"] = split
            block.__dict__["_ltm_dim"] = match.dim
            block.__dict__["_ltm_side"] = side
            rule = self.position_rule(model, block, match, plan, analysis)
            if rule is not None:
                block.__dict__["_ltm_positions"] = rule
            # a head that pools the patch tokens gets them back on the full grid (merge/state.py
            # spread_over_grid): the original head then weighs each merged token by the patches it holds
            last = i == len(plan.blocks) - 1
            block.ltm_track_sources = full_grid or bool(grid_reads)
            block.ltm_full_grid_out = full_grid and last
            block.ltm_spread_out = match.name in grid_reads and not last
        warn_without_bias(without_bias)
        install_head_adapters(model, plan)

    # -- what a family built on this one overrides ------------------------------------------------
    def check_side_inputs(self, block: nn.Module, match: Any, plan: "ConversionPlan",
                          side: dict[str, torch.Tensor]) -> None:
        """Refuse blocks that receive a per-token table (e.g. rotary embeddings: one row per token),
        which merged tokens cannot follow unless a family supplies a :class:`PositionRule`."""
        for name, value in side.items():
            for t in (value if isinstance(value, (tuple, list)) else (value,)):  # HF: (cos, sin)
                if any(d in (match.tokens_with_prefix, match.tokens_with_prefix - plan.prefix_tokens) for d in t.shape):
                    raise UnsupportedModelError(
                        f"not supported yet: {type(block).__name__} receives a per-token table {name!r} of shape "
                        f"{tuple(t.shape)} (rotary position embeddings?), which merged tokens cannot follow")

    def position_rule(self, model: nn.Module, block: nn.Module, match: Any, plan: "ConversionPlan",
                      analysis: "Analysis") -> "PositionRule | None":
        """The rule that makes this block's per-position inputs follow merged tokens (none here)."""
        return None

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> "SequenceCost":
        return SequenceCost(meta_model, plan, self)

    def sites(self, model: nn.Module, plan: "ConversionPlan") -> list[Site]:
        m = plan.tokens_with_prefix - plan.prefix_tokens
        # a head that reads only prefix tokens (a class token) makes the last block's patch tokens
        # dead weight: that block merges them all into one, unless the model is converted for heads
        # that read the patch grid (dense)
        free_last = bool(plan.heads) and all(h.startswith("token:") for h in plan.heads) and plan.prefix_tokens > 0 \
            and not plan.data.get("dense")
        names = plan.block_names
        return [Site(name=name, mergeable=m, chained=True, prefix=plan.prefix_tokens,
                     free=free_last and i == len(names) - 1) for i, name in enumerate(names)]

    def apply(self, model: nn.Module, plan: "ConversionPlan", keep: dict[str, int]) -> None:
        """Set every block's kept count; each block receives what the previous one kept."""
        sites = self.sites(model, plan)
        get = chain_keep(keep, sites)
        m, merged = plan.tokens_with_prefix - plan.prefix_tokens, False
        for block, site in zip(converted_blocks(model, plan), sites):
            k = get(site.name)
            if not 1 <= k <= m:
                raise LtmError(f"the schedule keeps {k} tokens in {site.name}, which receives {m}; "
                               "the file is corrupt or belongs to another model")
            block.ltm_set(plan.prefix_tokens + m, k, merged)
            block.ltm_collapse = site.free and k == 1 < m
            merged = merged or k < m
            m = k

    def describe(self, model: nn.Module, plan: "ConversionPlan") -> dict[str, Any]:
        blocks = converted_blocks(model, plan)
        return {"blocks": [{"name": b.ltm_name, "tokens_in": b.ltm_in_with_prefix, "tokens_out": b.ltm_prefix + b.ltm_keep_mergeable}
                           for b in blocks]}


class SequenceCost:
    """FLOPs of any schedule of a token-sequence model, without counting the whole model again.

    A block costs A(n) before the merge (attention: linear and quadratic in its n input tokens),
    the mask's cost M(n, k), and B(k) after it (the MLP: linear in the k tokens it keeps). A and B
    are fitted exactly from three and two FlopCounterMode counts of the block's own two halves on
    meta tensors; M is counted for each (n, k) the solver asks about. Blocks with the same cut and
    the same parameter shapes share all of it, so a 12-block ViT counts one block's pieces.
    Everything else in the model costs what it cost in the one full count (``base``).
    """

    def __init__(self, meta_model: nn.Module, plan: "ConversionPlan", family: "SequenceFamily | None" = None) -> None:
        from ltm_convert.flops import count_flops

        self.plan = plan
        self.blocks = converted_blocks(meta_model, plan)
        self.free = {s.name: s.free for s in (family or SequenceFamily()).sites(meta_model, plan)}
        self.prefix = plan.prefix_tokens
        self.size = plan.input_size
        family_disable(self.blocks)
        self.base = float(count_flops(meta_model, self.size))
        self._fits: dict[tuple, tuple] = {}
        self._mask: dict[tuple, int] = {}
        self.full = [self._a(b, plan.tokens_with_prefix, False) + self._b(b, plan.tokens_with_prefix) for b in self.blocks]
        # a head that reads more than the prefix tokens gets the full grid back (pools_patches), so
        # what follows the blocks costs the same whatever the schedule: it is all in ``base``

    # -- the pieces ---------------------------------------------------------------------------------
    def _inputs(self, block: Any, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(part_a's tensor inputs, the token input) for n tokens, on meta."""
        split = block.ltm_split()
        x = torch.empty(1, n, block.__dict__["_ltm_dim"], dtype=next(block.parameters()).dtype, device="meta")
        return [x, *[self._side(block, name) for name in split.a_inputs[1:]]], x

    def _fit(self, block: Any) -> tuple:
        from ltm_convert.flops import count_call
        from ltm_convert.schedule import fit_linear

        key = (id(block.ltm_split()), tuple(tuple(p.shape) for p in block.parameters()))
        fit = self._fits.get(key)
        if fit is None:
            split = block.ltm_split()
            n_full = self.plan.tokens_with_prefix
            probes = sorted({n_full, max(self.prefix + 1, n_full // 2 + 1), max(self.prefix + 1, n_full // 4 + 1)})

            def b(n: int) -> int:
                _, x = self._inputs(block, n)
                side = [self._side(block, name) for name in split.b_inputs]
                return count_call(lambda: split.part_b(block, x, *side))

            quad = lambda n: [1.0, float(n), float(n * n)]  # noqa: E731
            lin = lambda n: [1.0, float(n)]  # noqa: E731
            fit = (fit_linear(quad, {n: self._count_a(block, n, False) for n in probes}),
                   fit_linear(quad, {n: self._count_a(block, n, True) for n in probes}),
                   fit_linear(lin, {n: b(n) for n in probes[-2:]}))
            self._fits[key] = fit
        return fit

    def _count_a(self, block: Any, n: int, bias: bool) -> int:
        """FLOPs of the attention half for n tokens, with or without the proportional-attention bias."""
        from ltm_convert.flops import count_call

        inputs, x = self._inputs(block, n)
        b = torch.zeros(1, 1, 1, n, dtype=x.dtype, device="meta") if bias else None
        return count_call(lambda: block.ltm_split().part_a(block, *inputs, b))

    def _side(self, block: Any, name: str) -> torch.Tensor:
        from ltm_convert.flops import meta_like

        return meta_like(block.__dict__["_ltm_side"][name])

    def _a(self, block: Any, n: int, bias: bool) -> float:
        return self._fit(block)[1 if bias else 0](n)

    def _b(self, block: Any, n: int) -> float:
        return self._fit(block)[2](n)

    def _m(self, block: Any, n: int, k: int) -> int:
        from ltm_convert.flops import count_call

        mask = block.ltm_mask
        known = mask.flops(n, k, self.prefix)  # the mask knows its cost (tested against counting)
        if known is not None:
            return known
        key = (type(mask), tuple(tuple(p.shape) for p in mask.parameters()), mask.topk, mask.prune, n, k)
        found = self._mask.get(key)
        if found is None:
            _, x = self._inputs(block, n)
            sizes = torch.empty(1, n, dtype=torch.float32, device="meta")
            was_training = mask.training
            mask.eval()  # inference cost (a mask may relax its merge in training mode)
            try:
                found = self._mask[key] = count_call(lambda: mask(x, sizes, self.prefix, k, False))
            finally:
                mask.train(was_training)
        return found

    def flops(self, keep: dict[str, int]) -> float:
        total, m, merged = self.base, self.plan.tokens_with_prefix - self.prefix, False
        for block, full in zip(self.blocks, self.full):
            k = keep[block.ltm_name]
            n = self.prefix + m
            cost = self._a(block, n, merged) + self._b(block, self.prefix + k)
            if k < m and not (self.free.get(block.ltm_name) and k == 1):
                cost += self._m(block, n, k)
            total += cost - full
            merged = merged or k < m
            m = k
        return total


def family_disable(blocks: list[Any]) -> None:
    for block in blocks:
        block.ltm_set(block.ltm_in_with_prefix, block.ltm_in_with_prefix - block.ltm_prefix, False)
