"""The class-attention family: CaiT (timm ``cait_*``) and any model built the same way.

Such a model runs self-attention blocks on the patch tokens alone, then *class-attention* blocks
``blk(patches, cls)`` that let a class token attend over ``cat(cls, patches)`` and update only the
class token. The self-attention blocks merge exactly as token-sequence blocks do (they are
converted by :class:`SequenceFamily`); the class-attention blocks then read the merged patch tokens
with proportional attention like any later block: each key is weighted by its size (log size
added to its logit, 0 for the class token), so a merged token counts for the patches it holds.
At ratio 1.0 nothing merges and every block runs its original code.

Attention modules that take no mask (CaiT's talking-heads and class attention compute their own
softmax) are given one (attention_bias.py), as in any token-sequence model. The class-attention
blocks become generated subclasses too (generated.py: picklable by name, their generated code
regenerated after unpickling).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

from ltm_convert.analysis.block_split import BlockCall, _compile, _mask_param, bind_call, unwrapped_forward
from ltm_convert.analysis.graph import ATTENTION_OPS, module_path, shape_of
from ltm_convert.analysis.heads import classify_heads, prefix_tokens
from ltm_convert.errors import UnsupportedModelError
from ltm_convert.generated import generated_subclass, rebuild
from ltm_convert.merge.state import state_of
from ltm_convert.plan import ConversionPlan
from ltm_convert.rewriters.attention_bias import (
    BIASED_PREFIX,
    GeneratedCode,
    accept_bias,
    add_placeholder,
    biased_class,
)
from ltm_convert.rewriters.base import builtin_family
from ltm_convert.rewriters.sequence import SequenceCost, SequenceFamily

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis

aten = torch.ops.aten
CLASS_BLOCK_PREFIX = "LtmClassAttention__"


HEAD = "class-attention:"  # plan.heads entry per class-attention block: HEAD + its attention module's path


def class_attention_paths(plan: ConversionPlan) -> list[str]:
    """The attention modules of the class-attention blocks the plan names (in its heads: they are
    what reads the last block's patch tokens), so a saved plan replays without a trace."""
    return [h[len(HEAD):] for h in plan.heads if h.startswith(HEAD)]


# --------------------------------------------------------------------------------------------
# the class-attention block: a generated class (picklable by name) over the model's own


def class_block_class(original: type) -> type:
    """The :class:`ClassAttentionBlock` subclass of a block class."""
    return generated_subclass(CLASS_BLOCK_PREFIX, original, __name__, ClassAttentionBlock)


def __getattr__(name: str) -> Any:
    """Rebuild a generated class from its name (what pickle asks for in a fresh process); attention
    classes made by earlier versions of this module live in attention_bias.py now."""
    return rebuild(__name__, name, {CLASS_BLOCK_PREFIX: class_block_class, BIASED_PREFIX: biased_class})


def key_bias(parts: list[torch.Tensor], index: int, log_sizes: torch.Tensor) -> torch.Tensor:
    """The proportional-attention bias over the keys ``cat(parts, dim=1)``: the merged patch tokens
    (``parts[index]``) add their log sizes, every other token (the class token) counts once (0)."""
    cols = [log_sizes if i == index else log_sizes.new_zeros(p.shape[0], p.shape[1]) for i, p in enumerate(parts)]
    return torch.cat(cols, dim=1)[:, None, None, :]


class ClassAttentionBlock(GeneratedCode):
    """A class-attention block that reads merged patch tokens: its attention gets their log sizes."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fn, names, call = self._ltm_code()
        values = self._ltm_bind(names, call, args, kwargs)
        x = values[call.x_name]
        state = state_of(x)
        if state is None:  # nothing merged: the original code
            return type(self).ltm_original_class.forward(self, *args, **kwargs)
        log_sizes = state.sizes.clamp_min(1e-6).log().to(x.dtype)
        return fn(self, *[values[n] for n in call.tensor_names], log_sizes)

    def _ltm_generate(self, graph: fx.Graph, call: BlockCall) -> Callable:
        what = type(self).ltm_original_class.__name__
        x = next(n for n in graph.nodes if n.op == "placeholder" and n.target == call.x_name)
        attn_child = self.__dict__["_ltm_attn_child"]
        attn_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == attn_child]
        cats = [n for n in x.users if n.op == "call_function" and n.target is torch.cat
                and isinstance(n.args[0], (list, tuple)) and n.args[0][-1] is x
                and n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) in (1, -2)]
        if len(attn_nodes) != 1 or len(cats) != 1:
            raise UnsupportedModelError(f"not supported yet: {what} does not attend once over cat(tokens, patches)")
        log_sizes = add_placeholder(graph, "ltm_log_sizes")
        parts = list(cats[0].args[0])
        param = _mask_param(getattr(self, attn_child))
        node = attn_nodes[0]
        if param is None or param in node.kwargs or len(node.args) > 1:
            raise UnsupportedModelError(f"not supported yet: {what} already passes an attention mask")
        with graph.inserting_before(node):
            bias = graph.call_function(key_bias, (parts, len(parts) - 1, log_sizes))
        node.kwargs = {**node.kwargs, param: bias}
        return _compile(graph, self)[1]


def convert_class_block(block: nn.Module, attn_child: str, block_call: tuple[tuple, dict],
                        attn_call: tuple[tuple, dict], x_name: str) -> None:
    """Make a class-attention block weigh the merged patch tokens (its input ``x_name``) by size;
    ``*_call``: the (args, kwargs) the block and its attention child were called with."""
    accept_bias(getattr(block, attn_child), *attn_call)
    args, kwargs = block_call
    call = bind_call(block, args, kwargs)
    call.x_name = x_name
    bound = _bound(block, args, kwargs)
    # batch-1 meta stand-ins of its inputs: the cost model counts the block at any token count
    side = {n: torch.empty((1, *bound[n].shape[1:]), dtype=bound[n].dtype, device="meta") for n in call.tensor_names}
    block.__class__ = class_block_class(type(block))
    block.__dict__["_ltm_call"] = call
    block.__dict__["_ltm_attn_child"] = attn_child
    block.__dict__["_ltm_side"] = side
    block._ltm_code()


def _bound(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    import inspect

    return inspect.signature(unwrapped_forward(block)).bind(block, *args, **kwargs).arguments


# --------------------------------------------------------------------------------------------
# the family


def _cat_parts(node: fx.Node) -> list | None:
    if node.op != "call_function" or node.target != aten.cat.default:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    return list(node.args[0]) if dim in (1, -2) else None


@builtin_family
class ClassAttentionFamily(SequenceFamily):
    """Self-attention blocks merge; class-attention blocks after them read the merged tokens by size."""

    name = "class-attention"
    priority = 30
    examples = (
        # 64 patch tokens, two class-attention blocks (timm's default)
        ("timm", "cait_xxs24_224", dict(depth=2, img_size=64, patch_size=8, num_classes=5)),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        cls = analysis.model_class
        if analysis.cut_refusal:
            return analysis.cut_refusal
        if analysis.on_maps:
            return f"{cls}'s blocks work on 2-D maps, not on token sequences"
        facts = analysis.facts
        n = max(analysis.token_counts)
        patch_blocks = [i for i, b in enumerate(analysis.blocks) if b.tokens_with_prefix == n]
        seq = analysis.block_adds[patch_blocks[-1]][1]
        inside = [analysis.blocks[i].name for i in patch_blocks]
        class_attn, others = [], []
        for user in seq.users:
            parts = _cat_parts(user)
            path = module_path(user) or ""
            attn = self._attention_child(facts, user, path) if parts and parts[-1] is seq and path \
                and not any(path.startswith(b + ".") for b in inside) else None
            if attn is not None:
                class_attn.append(f"{path}.{attn}")
            else:
                others.append(user)
        if not class_attn:
            return "no class token attends over the patch tokens after the last block"
        class_blocks = [a.rpartition(".")[0] for a in class_attn]
        stray = [b.name for i, b in enumerate(analysis.blocks)
                 if i not in patch_blocks and not any(b.name == c or b.name.startswith(c + ".") for c in class_blocks)]
        if stray:
            return f"{cls}'s blocks {stray[:2]} are neither patch-token blocks nor class attention"
        if len(others) > 1 or (others and (_cat_parts(others[0]) or [None])[-1] is not seq):
            return f"{cls} reads its patch tokens after the blocks other than by class attention ({others[0].name})"
        heads: list[str] = []
        carry: list[str] = []
        try:
            prefix = prefix_tokens(facts, analysis.block_adds[patch_blocks[0]][0], n)
            if others:  # the output sequence: cat(class token, patch tokens) -> norm -> head
                lead = (shape_of(others[0]) or (0, n))[1] - n
                heads, carry = classify_heads(facts, others[0], lead)
                if not all(h.startswith("token:") for h in heads):
                    return (f"not supported yet: {cls} pools the patch tokens ({', '.join(heads)}) after class "
                            "attention; use the class token (global_pool='token')")
        except UnsupportedModelError as exc:
            return str(exc)
        # the class-attention blocks read the last block's patch tokens, so no block is "free"
        # (SequenceFamily.sites): they are heads of the patch sequence, recorded as such
        return ConversionPlan(model_class=cls, input_size=analysis.input_size, tokens_with_prefix=n, prefix_tokens=prefix,
                              heads=[HEAD + a for a in class_attn] + heads,
                              blocks=[analysis.blocks[i] for i in patch_blocks], skipped=list(analysis.skipped),
                              data={"carry": carry})

    @staticmethod
    def _attention_child(facts: Any, cat: fx.Node, path: str) -> str | None:
        """The child of the module at ``path`` whose attention the concatenation feeds, if one does."""
        found = {(module_path(node) or "")[len(path) + 1:].split(".")[0] for node in facts.nodes[facts.order[cat]:]
                 if node.op == "call_function" and node.target in ATTENTION_OPS
                 and (module_path(node) or "").startswith(path + ".") and facts.is_ancestor(cat, node)}
        found.discard("")
        return found.pop() if len(found) == 1 else None

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        modules = dict(model.named_modules())
        calls = analysis.calls
        for match in plan.blocks:  # refused, not warned (sequence.py), where the bias cannot reach the logits
            path = f"{match.name}.{match.attn_child}"
            accept_bias(modules[path], *calls[path])
        super().build(model, plan, analysis, config)
        for attn in class_attention_paths(plan):
            name, _, attn_child = attn.rpartition(".")
            block = modules.get(name)
            if block is None or name not in calls or attn not in calls:
                raise UnsupportedModelError(f"not supported yet: the class-attention block {name} was not called")
            convert_class_block(block, attn_child, calls[name], calls[attn],
                                self._patch_input(block, *calls[name], plan))

    @staticmethod
    def _patch_input(block: nn.Module, args: tuple, kwargs: dict, plan: "ConversionPlan") -> str:
        call = bind_call(block, args, kwargs)
        bound = _bound(block, args, kwargs)
        names = [t for t in call.tensor_names if tuple(bound[t].shape[1:2]) == (plan.tokens_with_prefix,)]
        if len(names) != 1:
            raise UnsupportedModelError(f"not supported yet: {type(block).__name__} receives the patch tokens "
                                        f"{len(names)} times")
        return names[0]

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> "ClassAttentionCost":
        return ClassAttentionCost(meta_model, plan, self)


class ClassAttentionCost(SequenceCost):
    """Sequence FLOPs plus the class-attention blocks on the tokens the last block kept: each is
    fitted exactly (a polynomial in the patch-token count) from counts of the block on meta tensors."""

    def __init__(self, meta_model: nn.Module, plan: "ConversionPlan", family: "SequenceFamily | None" = None) -> None:
        super().__init__(meta_model, plan, family)
        from ltm_convert.flops import count_call
        from ltm_convert.schedule import fit_linear

        modules = dict(meta_model.named_modules())
        n_full = plan.tokens_with_prefix
        probes = sorted({n_full, n_full // 2 + 1, n_full // 4 + 1})
        self.class_fits = []
        for attn in class_attention_paths(plan):
            block = modules[attn.rpartition(".")[0]]
            call, side = block.__dict__["_ltm_call"], block.__dict__["_ltm_side"]

            def count(n: int, block: nn.Module = block, call: BlockCall = call, side: dict = side) -> int:
                inputs = {k: (torch.empty(1, n, *v.shape[2:], dtype=v.dtype, device="meta") if k == call.x_name else v)
                          for k, v in side.items()}
                return count_call(lambda: block(**inputs))

            quad = lambda n: [1.0, float(n), float(n * n)]  # noqa: E731
            self.class_fits.append(fit_linear(quad, {n: count(n) for n in probes}))

    def flops(self, keep: dict[str, int]) -> float:
        total = super().flops(keep)
        n = self.prefix + keep[self.blocks[-1].ltm_name]
        return total + sum(fit(n) - fit(self.plan.tokens_with_prefix) for fit in self.class_fits)
