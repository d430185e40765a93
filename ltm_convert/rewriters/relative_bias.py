"""The relative-position-bias family: timm ``beit_*`` / ``beitv2_*``, ``vit_relpos_*`` / ``vit_srelpos_*``,
HF ``BeitModel`` / ``Data2VecVisionModel`` (and their classifiers).

These models add a bias b(i, j) to the logit of query i and key j, looked up for the pair of
*positions* (an (N0 x N0) table per head over the N0 original tokens, prefix tokens included, with
BEiT's special class<->patch entries). A merged token stands for a set of original tokens, so its
bias must follow that set. Everything else is the token-sequence family (sequence.py).

The bias toward a merged key. The logit is l(i, j) = q_i . k_j + b(i, j). Let key j' hold the
original tokens m in M(j') (its *members*, read from the source map ``state.source``: for every
original patch the token that holds it; prefix tokens hold themselves). When the members share
one key and value vector (the case in which merging is lossless), their total weight in query i's
softmax is

    sum_m exp(q_i . k + b(i, m)) = exp(q_i . k + log sum_m exp b(i, m)),

so one merged key with the bias  c(i, j') = logsumexp_{m in M(j')} b(i, m)  gives query i exactly the
attention the members gave it. That term takes the place of proportional attention's log s(j'):
with all b(i, m) equal it *is* b + log |M(j')|. A merge method with a soft assignment (LTM sends a
merged-away token's mass to its two nearest targets) makes a token's size s(j') differ from its
member count |M(j')|; the bias then keeps the member positions and the mass the token holds:

    c(i, j') = logsumexp_{m in M(j')} b(i, m) - log |M(j')| + log s(j')

(the log of the mean of exp b over the members, plus log size; equal to the exact form when the
sizes are member counts: hard merges such as ToMe's, and the exactness test).

The bias of a merged query. A merged query i' is the size-weighted mean of its members' rows:
c(i', j') = mean_{i in M(i')} c(i, j') (each original member has size 1). This is an
approximation: the merged query vector is itself a mean, and no single bias row reproduces the
attention of several queries; unmerged queries (one member) are exact.

Cost: per merging block and image, one exp of the (H, N0, N0) table, a scatter-add of it onto the
N' current keys, a log of (H, N0, N'), and a scatter-add of that onto the N' current queries: two
passes of additions over the table, no products (the FLOPs counter, the unit of every ratio here,
counts none of them, as it counts no softmax). Tables computed by a network (timm's ``RelPosMlp``)
do cost FLOPs: the cost model adds them (:class:`RelativeBiasCost`).

How the bias reaches the attention. Each model computes its bias inside its own modules at the
full size, so the attention child's class is swapped for a generated subclass (generated.py:
picklable by name; state-dict keys unchanged) whose forward takes one more
argument, ``attn_mask``: None runs the original code (ratio 1.0 is the original model); a tensor
replaces the model's own position bias. The block's :class:`RelativeBiasRule` computes it each
forward from the block's own table and the incoming token state; nothing is stored on the model.
HF Data2Vec-vision blocks return the attention's extra outputs (None) next to their result; their
class is swapped for one whose forward returns the result alone, so the block can be cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.errors import LtmError
from ltm_convert.generated import generated_subclass, rebuild
from ltm_convert.merge.state import TokenState, state_of
from ltm_convert.rewriters.base import builtin_family
from ltm_convert.rewriters.heads import HEAD_ADAPTERS, size_weighted_mean
from ltm_convert.rewriters.sequence import SequenceCost, SequenceFamily

if TYPE_CHECKING:  # pragma: no cover
    from ltm_convert.config import LtmConfig
    from ltm_convert.tracer import Analysis, ConversionPlan


# --------------------------------------------------------------------------------------------
# the bias that follows the tokens (no model knowledge)


def merged_bias(table: torch.Tensor, sizes: torch.Tensor, source: torch.Tensor, prefix: int) -> torch.Tensor:
    """(H, N0, N0) or (1 or B, H, N0, N0) bias over the original tokens -> (B, H, N, N) over the current ones.

    ``sizes`` (B, N): mass per current token; ``source`` (B, P0): the current token holding each
    original patch. Columns: log-sum-exp over each key's members, moved from their count to the
    token's size; rows: the mean over each query's members (see the module docstring)."""
    B, N = sizes.shape
    t = table.float() if table.dim() == 4 else table.float().unsqueeze(0)
    H, N0 = t.shape[1], t.shape[-1]
    if source.shape[1] + prefix != N0:
        raise LtmError(f"the relative position bias covers {N0} tokens but the source map {prefix} + "
                       f"{source.shape[1]}; convert the model at the resolution it runs at")
    idx = torch.cat([torch.arange(prefix, device=source.device).expand(B, prefix), source], dim=1)  # (B, N0)
    counts = torch.zeros(B, N, dtype=torch.float32, device=t.device).scatter_add_(
        1, idx, torch.ones(B, N0, dtype=torch.float32, device=t.device)).clamp_min(1.0)
    peak = t.amax(dim=-1, keepdim=True)  # per row: the log-sum-exp's shift
    cols = torch.zeros(B, H, N0, N, dtype=torch.float32, device=t.device).scatter_add_(
        3, idx[:, None, None, :].expand(B, H, N0, N0), (t - peak).exp().expand(B, H, N0, N0))
    shift = (sizes.float().clamp_min(1e-6) / counts).log()[:, None, None, :]
    cols = cols.clamp_min(torch.finfo(torch.float32).tiny).log() + peak + shift
    rows = torch.zeros(B, H, N, N, dtype=torch.float32, device=t.device).scatter_add_(
        2, idx[:, None, :, None].expand(B, H, N0, N), cols)
    return rows / counts[:, None, :, None]


def _plus(a: torch.Tensor | None, b: Any) -> torch.Tensor | None:
    b = b if isinstance(b, torch.Tensor) else None
    return b if a is None else a if b is None else a + b


# --------------------------------------------------------------------------------------------
# the models: where each keeps its table, and an attention forward that takes a given bias


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            drop: float, scale: float | None = None) -> torch.Tensor:
    """Attention with ``bias`` added to the logits, heads joined again: (B, N, H * hd)."""
    B, _, N, _ = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop if attn.training else 0.0,
                                         scale=scale)
    return out.transpose(1, 2).reshape(B, N, -1)


def _timm_beit_attention(self: Any, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attn_mask is None:
        return self.ltm_original_class.forward(self, x, shared_rel_pos_bias=shared_rel_pos_bias)
    B, N, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = self.qkv(x) + qkv_bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return self.proj_drop(self.proj(_attend(self, q, k, v, attn_mask, self.attn_drop.p)))


def _timm_relpos_attention(self: Any, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attn_mask is None:
        return self.ltm_original_class.forward(self, x, shared_rel_pos=shared_rel_pos)
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return self.proj_drop(self.proj(_attend(self, self.q_norm(q), self.k_norm(k), v, attn_mask, self.attn_drop.p)))


def _hf_beit_attention(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    # HF's BeitAttention adds whatever it is given: the merged bias replaces the layer's full-size one
    mask = attention_mask if attn_mask is None else attn_mask.to(hidden_states.dtype)
    return self.ltm_original_class.forward(self, hidden_states, attention_mask=mask, **kwargs)


def _data2vec_attention(self: Any, hidden_states: torch.Tensor, output_attentions: bool = False,
                        relative_position_bias: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                        resolution: Any = None, attn_mask: torch.Tensor | None = None) -> Any:
    if attn_mask is None:
        return self.ltm_original_class.forward(self, hidden_states, output_attentions, relative_position_bias,
                                                   interpolate_pos_encoding, resolution)
    sa = self.attention
    B, N, _ = hidden_states.shape
    shape = (B, N, -1, sa.attention_head_size)
    q = sa.query(hidden_states).view(shape).transpose(1, 2)
    k = sa.key(hidden_states).view(shape).transpose(1, 2)
    v = sa.value(hidden_states).view(shape).transpose(1, 2)
    ctx = _attend(self, q, k, v, attn_mask, sa.config.attention_probs_dropout_prob, sa.attention_head_size ** -0.5)
    return (self.output(ctx, hidden_states),)


def _data2vec_layer(self: Any, hidden_states: torch.Tensor, output_attentions: bool = False,
                    relative_position_bias: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                    resolution: Any = None) -> tuple[torch.Tensor]:
    """Data2VecVisionLayer.forward returning its result alone (the original appends the attention's
    extra outputs, None unless attention weights are asked for, which a cut block cannot carry)."""
    out = self.attention(self.layernorm_before(hidden_states), output_attentions=output_attentions,
                         relative_position_bias=relative_position_bias,
                         interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)[0]
    if self.lambda_1 is not None:
        out = self.lambda_1 * out
    hidden_states = self.drop_path(out) + hidden_states
    out = self.output(self.intermediate(self.layernorm_after(hidden_states)))
    if self.lambda_2 is not None:
        out = self.lambda_2 * out
    return (self.drop_path(out) + hidden_states,)


def _window(values: dict[str, Any], patch: int) -> tuple[int, int]:
    h, w = values["resolution"]
    return int(h) // patch, int(w) // patch


def _timm_beit_table(block: nn.Module, attn: Any, values: dict[str, Any]) -> torch.Tensor | None:
    own = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    return _plus(own, values.get("shared_rel_pos_bias"))


def _timm_relpos_table(block: nn.Module, attn: Any, values: dict[str, Any]) -> torch.Tensor | None:
    # RelPosAttention uses its own table when it has one, else the shared one
    return attn.rel_pos.get_bias() if attn.rel_pos is not None else _plus(None, values.get("shared_rel_pos"))


def _hf_beit_table(block: Any, attn: nn.Module, values: dict[str, Any]) -> torch.Tensor | None:
    own = None
    if block.relative_position_bias is not None:
        window = _window(values, block.patch_size)
        own = block.relative_position_bias(window, values.get("interpolate_pos_encoding", False),
                                           dim_size=window[0] * window[1] + 1)
    return _plus(own, values.get("attention_mask"))  # the model's shared table, when it has one


def _data2vec_table(block: nn.Module, attn: Any, values: dict[str, Any]) -> torch.Tensor | None:
    sa, own = attn.attention, None
    if sa.has_relative_position_bias:
        window = _window(values, sa.config.patch_size)
        own = sa.relative_position_bias(window, values.get("interpolate_pos_encoding", False),
                                        dim_size=window[0] * window[1] + 1)
    return _plus(own, values.get("relative_position_bias"))


@dataclass(frozen=True)
class Kind:
    """One model's attention: its class, the block inputs that carry a full-size shared bias, how
    to read the block's whole (1, H, N0, N0) bias, and an attention forward that takes a given one."""

    name: str
    attention: str  # module.qualname of the attention class
    bias_inputs: tuple[str, ...]
    table: Callable[[nn.Module, nn.Module, dict[str, Any]], torch.Tensor | None]
    forward: Callable[..., Any]
    block_forward: Callable[..., Any] | None = None  # a block forward that can be cut, where the original cannot


KINDS = {k.name: k for k in [
    Kind("timm-beit", "timm.models.beit.Attention", ("shared_rel_pos_bias",), _timm_beit_table, _timm_beit_attention),
    Kind("timm-relpos", "timm.models.vision_transformer_relpos.RelPosAttention", ("shared_rel_pos",),
         _timm_relpos_table, _timm_relpos_attention),
    Kind("hf-beit", "transformers.models.beit.modeling_beit.BeitAttention", ("attention_mask",), _hf_beit_table,
         _hf_beit_attention),
    Kind("hf-data2vec", "transformers.models.data2vec.modeling_data2vec_vision.Data2VecVisionAttention",
         ("relative_position_bias",), _data2vec_table, _data2vec_attention, _data2vec_layer),
]}


def kind_of(attn: Any) -> Kind | None:
    """The kind of an attention module (by its class or a base class), or None."""
    return _kind_of_class(type(attn))


def _kind_of_class(attn_cls: type) -> Kind | None:
    for cls in attn_cls.__mro__:
        for kind in KINDS.values():
            if f"{cls.__module__}.{cls.__qualname__}" == kind.attention:
                return kind
    return None


# --------------------------------------------------------------------------------------------
# generated classes (generated.py: picklable by name, state-dict keys unchanged)

_ATTN_PREFIX, _BLOCK_PREFIX = "LtmRelBiasAttn__", "LtmRelBiasBlock__"


def attention_class(original: type) -> type:
    """The attention class whose forward also takes a given bias (``attn_mask``)."""
    return generated_subclass(_ATTN_PREFIX, original, __name__, members={"forward": _kind_of_class(original).forward})


def block_class(original: type) -> type:
    """The block class whose forward returns its result alone (HF Data2Vec-vision)."""
    return generated_subclass(_BLOCK_PREFIX, original, __name__, members={"forward": _data2vec_layer})


def __getattr__(name: str) -> Any:
    """Rebuild a generated class from its name (what pickle asks for in a fresh process)."""
    return rebuild(__name__, name, {_ATTN_PREFIX: attention_class, _BLOCK_PREFIX: block_class})


# --------------------------------------------------------------------------------------------
# the rule each converted block runs before its attention half


class RelativeBiasRule:
    """Make a block's relative position bias follow its merged tokens (a ``ltm_block.PositionRule``;
    holds only the kind's name, so it pickles and deep-copies with the block)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def table(self, block: nn.Module, values: dict[str, Any]) -> torch.Tensor | None:
        """The block's whole bias over the original tokens, as its own modules compute it."""
        return KINDS[self.kind].table(block, getattr(block, block.__dict__["_ltm_attn_child"]), values)

    def block_inputs(self, block: nn.Module, values: dict[str, Any], state: TokenState | None,
                     bias: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor | None]:
        if state is None:  # nothing merged: the attention adds its own bias, as in the original
            return values, bias
        table = self.table(block, values)
        if table is None:  # no relative position bias in this block: proportional attention only
            return values, bias
        x = values[block.__dict__["_ltm_call"].x_name]
        if state.source is None:
            if x.shape[1] != table.shape[-1]:
                raise LtmError(f"block {block.ltm_name} received merged tokens without their source map; "
                               "call the converted model's blocks in sequence")
            # the relaxed merge of training keeps every token in place: the table applies as it is
            return values, (table if bias is None else table + bias).to(x.dtype)
        return values, merged_bias(table, state.sizes, state.source, block.ltm_prefix).to(x.dtype)


# --------------------------------------------------------------------------------------------
# the family


def _kind_of_block(block: nn.Module, attn_child: str) -> Kind | None:
    return kind_of(getattr(block, attn_child, None))


@builtin_family
class RelativeBiasFamily(SequenceFamily):
    """Token sequences whose attention adds a relative position bias (see the module docstring)."""

    name = "relative-bias"
    priority = 20
    examples = (
        ("timm", "beit_base_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=128)),
        ("timm", "vit_relpos_small_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=128)),
        ("hf-config", "BeitModel", {"config": dict(model_type="beit", hidden_size=64, num_hidden_layers=4,
                                                   num_attention_heads=2, intermediate_size=128, image_size=128,
                                                   patch_size=16, use_relative_position_bias=True)}),
    )

    def find(self, analysis: "Analysis") -> "ConversionPlan | str":
        found = {_kind_of_block(analysis.modules[b.name], b.attn_child) for b in analysis.blocks}
        if not found or None in found:
            return f"{analysis.model_class}'s attention adds no relative position bias this family knows"
        return super().find(analysis)

    def build(self, model: nn.Module, plan: "ConversionPlan", analysis: "Analysis", config: "LtmConfig") -> None:
        modules = dict(model.named_modules())
        for match in plan.blocks:
            block = modules[match.name]
            attn = getattr(block, match.attn_child)
            kind = kind_of(attn)
            attn.__class__ = attention_class(type(attn))
            if kind.block_forward is not None:
                block.__class__ = block_class(type(block))
        super().build(model, plan, analysis, config)
        for match in plan.blocks:  # every block reads the members of its tokens from the source map
            modules[match.name].ltm_track_sources = True

    def check_side_inputs(self, block: nn.Module, match: Any, plan: "ConversionPlan",
                          side: dict[str, torch.Tensor]) -> None:
        kind = _kind_of_block(block, match.attn_child)
        super().check_side_inputs(block, match, plan, {n: t for n, t in side.items() if n not in kind.bias_inputs})

    def position_rule(self, model: nn.Module, block: nn.Module, match: Any, plan: "ConversionPlan",
                      analysis: "Analysis") -> RelativeBiasRule:
        return RelativeBiasRule(_kind_of_block(block, match.attn_child).name)

    def cost_model(self, meta_model: nn.Module, plan: "ConversionPlan") -> "RelativeBiasCost":
        return RelativeBiasCost(meta_model, plan, self)


class RelativeBiasCost(SequenceCost):
    """SequenceCost for attention that adds a relative position bias. The original attention can
    only run on all N0 tokens (its table is N0 x N0), so both halves' curves are counted on the
    attention that takes a given bias, plus the FLOPs of computing the table: inside the original
    attention, and in the rule after a merge (non-zero only for tables computed by a network:
    timm's ``RelPosMlp``). The merge of the table itself is additions, which the FLOPs counter
    does not count (module docstring)."""

    def _count_a(self, block: Any, n: int, bias: bool) -> int:
        return super()._count_a(block, n, True) + self._table(block)

    def _table(self, block: Any) -> int:
        from ltm_convert.flops import count_call

        cache = self.__dict__.setdefault("_tables", {})
        key = (id(block.ltm_split()), tuple(tuple(p.shape) for p in block.parameters()))
        if key not in cache:
            values = dict(block.__dict__["_ltm_call"].constants)
            values.update({name: self._side(block, name) for name in block.__dict__["_ltm_side"]})
            rule = block.__dict__["_ltm_positions"]
            cache[key] = count_call(lambda: rule.table(block, values))
        return cache[key]


# --------------------------------------------------------------------------------------------
# HF BEiT / Data2Vec poolers average the patch tokens: size-weighted in the relaxed merge of training


_MEAN_POOLERS = ("BeitPooler", "Data2VecVisionPooler")


def _size_weighted_pooler_input(module: nn.Module, args: tuple) -> tuple | None:
    """The pooler's ``h[:, 1:].mean(1)`` of one patch token, the size-weighted mean of them all."""
    state = state_of(args[0]) if args else None
    if state is None:  # the original grid (inference spreads merged tokens over it)
        return None
    h = args[0]
    mean = size_weighted_mean(h[:, 1:], state.sizes[:, 1:])
    return (torch.cat([h[:, :1], mean[:, None]], dim=1), *args[1:])


def hf_mean_pooler(model: nn.Module, plan: "ConversionPlan", needs: set[str]) -> str | None:
    """Head adapter (rewriters/heads.py ``HEAD_ADAPTERS``) for HF BEiT / Data2Vec mean pooling."""
    poolers = [m for m in model.modules() if type(m).__name__ in _MEAN_POOLERS and getattr(m, "layernorm", None)]
    if needs != {"avg"} or not poolers:
        return None
    for pooler in poolers:
        pooler.register_forward_pre_hook(_size_weighted_pooler_input)
    return "hf-mean-pooler"


HEAD_ADAPTERS.append(hf_mean_pooler)

__all__ = ["RelativeBiasFamily", "RelativeBiasRule", "RelativeBiasCost", "merged_bias", "kind_of", "KINDS"]
