"""The LTM block: attention on N tokens, a learnable soft merge, then the MLP on N' < N tokens.

Design (ltm-method.md section 2): the block keeps the original children by reference under
their original names; the mask module ``ltm_mask`` is the only new part. Token sizes travel
between blocks in an :class:`LtmContext` shared by one model's blocks; the first converted block
resets it, so ``forward_features`` and any sub-module call work, not only ``model(x)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltm_convert.block_graph import SplitBlock
from ltm_convert.config import DEFAULT_TOPK
from ltm_convert.errors import LtmError


class LtmContext:
    """Per-forward state shared by the LTM blocks of one model.

    sizes: (B, N) float token sizes of the current sequence, or None while nothing was merged.
    record: when True each merging block appends what it did to ``records`` (visualisation, IB).
    """

    def __init__(self) -> None:
        self.sizes: torch.Tensor | None = None
        self.record = False
        self.records: list[dict[str, Any]] = []
        self.head_inputs: dict[str, Any] = {}
        self.unmerge: Any = None  # grid models: callable that restores the full grid (set by the mask)

    def reset(self) -> None:
        self.sizes = None
        self.unmerge = None
        self.records = []
        self.head_inputs = {}

    def __deepcopy__(self, memo: dict) -> "LtmContext":
        new = LtmContext()
        new.record = self.record
        return new


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C). A flat index_select is about 3x faster than gather on
    CPU for row gathers and exports to ONNX as one Gather."""
    B, N, C = x.shape
    flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * N).reshape(-1)
    return x.reshape(B * N, C).index_select(0, flat).view(B, idx.shape[1], C)


def redundancy(phi: torch.Tensor, row_blocks: int = 4) -> torch.Tensor:
    """Each token's max cosine to an earlier token, phi (B, M, d) unit rows -> (B, M), -1 for the first.

    Only the lower triangle of the M x M scores matters, so rows are taken in ``row_blocks`` bands,
    each against the columns up to its end: 10/16 of the full GEMM for four bands. Later tokens
    (and the token itself) are pushed below -1 by a constant bias fused into the GEMM, then clamped.
    """
    M = phi.shape[1]
    bands = row_blocks if M >= 16 * row_blocks else 1
    edges = [i * M // bands for i in range(bands + 1)]
    parts = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        later = torch.full((r1 - r0, r1), -3.0, dtype=phi.dtype, device=phi.device).triu(r0)
        parts.append(torch.baddbmm(later, phi[:, r0:r1], phi[:, :r1].transpose(1, 2)).amax(dim=-1))
    return torch.cat(parts, dim=1).clamp_min(-1.0)


def add_rows(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) with rows src (B, K, C) added at rows idx (B, K), in place when x is contiguous
    (use the result). Shared by the LTM mask and the baselines. A flat index_add_ is
    several times faster than scatter_add_ along dim 1 on CPU (whole rows, not single elements), but
    ONNX exports index_add as ScatterND, which overwrites repeated rows instead of summing them;
    the export takes scatter_add (ScatterElements with reduction "add")."""
    B, T, C = x.shape
    if torch.onnx.is_in_onnx_export():
        return x.scatter_add_(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C), src)
    flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * T).reshape(-1)
    x = x.contiguous()  # a no-op for fresh tensors; strided inputs (ToMe's odd rows) get one copy
    return x.view(B * T, C).index_add_(0, flat, src.reshape(-1, C)).view(B, T, C)


def merge_dense(z_rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor, mass: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x~_t = (s_t z_t + sum_i m_it z_i) / s~_t with s~_t = s_t + sum_i m_it, every token to every target.

    z_rows (B, T, D) output rows, s_rows (B, T), z_o (B, R, D) merged-away tokens, mass (B, R, T).
    The division is folded into the weights so the (B, T, D) output is written once and accumulated
    once (in place: no copy).
    """
    new_sizes = s_rows + mass.sum(dim=1)
    inv = new_sizes.reciprocal()
    merged = z_rows * (s_rows * inv).unsqueeze(-1)
    return merged.baddbmm_((mass * inv.unsqueeze(1)).transpose(1, 2), z_o), new_sizes


def merge_sparse(z: torch.Tensor, rows: torch.Tensor, s_rows: torch.Tensor, z_o: torch.Tensor,
                 mass: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same merge when every token reaches only k targets: mass (B, R, k), slot (B, R, k) output rows.

    Written as x~_t = z_t + sum_i (m_it / s~_t)(z_i - z_t), only the R x k touched rows are read and
    updated; the other output rows are plain copies. That is what makes merging cheaper than the
    MLP rows it saves when few tokens leave a block (ratio 0.8 removes ~4% per block).
    """
    B, R, k = mass.shape
    D = z.shape[-1]
    flat_slot, flat_mass = slot.reshape(B, R * k), mass.reshape(B, R * k)
    new_sizes = s_rows.scatter_add(1, flat_slot, flat_mass)
    weight = (flat_mass / new_sizes.gather(1, flat_slot)).view(B, R, k, 1)
    z_t = take_rows(z, rows.gather(1, flat_slot)).view(B, R, k, D)
    delta = (weight * (z_o.unsqueeze(2) - z_t)).view(B, R * k, D)
    return add_rows(take_rows(z, rows), flat_slot, delta), new_sizes


class LtmMask(nn.Module):
    """Chooses M' target tokens per image and softly assigns every token to its k nearest targets.

    phi = normalize(W_phi LN(z)) is the merge metric, initialised from the block's own key
    projection so that an untrained module already merges tokens the attention sees as alike.
    The keep score is kappa = w_kappa . LN(z) + w_size * log(s) - (max cosine to an earlier
    token): the first token of each group of near-duplicates is kept, the rest merge into targets.
    Merged-away tokens spread over the targets by softmax(cos / tau); tau starts at 1e-3, which is
    close to ToMe's hard merge (the best untrained choice measured on real photos), and is learned.
    topk > 0 restricts each token to its k most similar targets: local heat-maps, and the merge
    then touches only the R x k rows that receive mass (``merge_sparse``); 0 means all targets
    (a dense GEMM over every output row, ``merge_dense``).
    """

    def __init__(self, dim: int, metric_dim: int, topk: int = DEFAULT_TOPK, tau: float = 1e-3, use_sizes: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.phi = nn.Linear(dim, metric_dim)
        self.kappa = nn.Linear(dim, 1)
        nn.init.zeros_(self.kappa.weight)
        nn.init.zeros_(self.kappa.bias)
        # the first block sees no earlier merge, so a weight on log(size) would never learn there
        self.size_weight = nn.Parameter(torch.zeros(())) if use_sizes else None
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.topk = topk

    def keep_score(self, learned: torch.Tensor, phi: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """kappa (B, M) from the learned term w_kappa . LN(z) (B, M): the top-M' become targets."""
        kappa = learned - redundancy(phi)
        if self.size_weight is not None:
            kappa = kappa + self.size_weight * sizes.log().to(learned.dtype)
        return kappa

    def forward(self, z: torch.Tensor, sizes: torch.Tensor | None, prefix: int, keep: int,
                record: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge z (B, N, D) into prefix + keep tokens; returns (tokens, sizes)."""
        B, N, D = z.shape
        M = N - prefix
        R = M - keep  # tokens merged away
        if sizes is None:
            sizes = z.new_ones(B, N, dtype=torch.float32)
        sm = sizes[:, prefix:]

        # phi and the learned keep term in one projection of the whole (contiguous) sequence
        weight = torch.cat([self.phi.weight, self.kappa.weight], dim=0)
        bias = torch.cat([self.phi.bias, self.kappa.bias], dim=0)
        projected = F.linear(self.norm(z), weight, bias)[:, prefix:]
        phi = F.normalize(projected[..., :-1], dim=-1)
        kappa = self.keep_score(projected[..., -1], phi, sm)

        # top-k, not a sort: deterministic for a given input and ONNX-exportable
        order = kappa.topk(M, dim=-1).indices
        targets = order[:, :keep].sort(dim=-1).values  # (B, K) kept in their original order
        others = order[:, keep:]  # (B, R)

        # each merged-away token spreads its mass over the targets: A = softmax(phi_o . phi_t / tau)
        logits = (take_rows(phi, others) @ take_rows(phi, targets).transpose(1, 2)) / self.log_tau.exp()
        near = None
        if 0 < self.topk < keep:  # locality: only the k most similar targets (sparse merge below)
            logits, near = logits.topk(self.topk, dim=-1)  # (B, R, k)
        assign = torch.softmax(logits, dim=-1)  # (B, R, K) or (B, R, k)

        # Output rows are [prefix tokens, targets]: one row gather from z, no concatenation.
        rows = torch.cat([torch.arange(prefix, device=z.device).expand(B, prefix), targets + prefix], dim=1)
        s_rows = sizes.gather(1, rows).to(z.dtype)
        s_o = sm.gather(1, others).to(z.dtype)
        if kappa.requires_grad:  # straight-through gate: value 1, gradient tells kappa whether keeping a token helped
            gate = torch.sigmoid(kappa)
            st = gate - gate.detach()
            s_rows = s_rows * (1.0 + F.pad(st.gather(1, targets), (prefix, 0)))
            s_o = s_o * (1.0 - st.gather(1, others))
        mass = assign * s_o.unsqueeze(-1)  # s_i * A_it
        z_o = take_rows(z, others + prefix)
        if near is None:
            merged, new_sizes = merge_dense(take_rows(z, rows), s_rows, z_o, F.pad(mass, (prefix, 0)))
        else:
            merged, new_sizes = merge_sparse(z, rows, s_rows, z_o, mass, near + prefix)
        if record is not None:  # the block put its entry last; add what this module decided
            full = torch.zeros(B, M, keep, dtype=assign.dtype, device=z.device)
            eye = torch.eye(keep, dtype=assign.dtype, device=z.device).expand(B, keep, keep)
            full.scatter_(1, targets.unsqueeze(-1).expand(B, keep, keep), eye)
            spread = assign if near is None else torch.zeros(B, R, keep, dtype=assign.dtype,
                                                            device=z.device).scatter_(2, near, assign)
            full.scatter_(1, others.unsqueeze(-1).expand(B, R, keep), spread)
            record[-1].update(targets=targets, assign=full.detach(), prefix=prefix, sizes_in=sm.detach())
        return merged, new_sizes.to(sizes.dtype)


class LtmBlock(nn.Module):
    """A transformer block that merges tokens between its attention and its MLP."""

    def __init__(self, block: nn.Module, split: SplitBlock, mask: nn.Module | None, *, context: LtmContext,
                 prefix: int, tokens_in: int, keep: int, first: bool) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block._parameters.items():
            self.register_parameter(name, param)
        for name, buf in block._buffers.items():
            self.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)
        for name, value in vars(block).items():  # tensor constants fx attached while tracing
            if name.startswith("_tensor_constant") and isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=False)
        self.ltm_mask = mask
        self.ltm_original_class = type(block).__name__
        self.ltm_name = ""  # module path in the model, set by the rewriter
        self.ltm_prefix = prefix
        self.ltm_tokens_in = tokens_in  # mergeable + prefix tokens at the planned resolution
        self.ltm_keep = keep  # mergeable tokens kept at the planned resolution
        self.ltm_first = first
        self.ltm_unmerge = False  # grid models: the last block of a group restores the full grid
        self.ltm_prop_attn = not first  # set by convert: True once an earlier block merges
        self.__dict__["_ltm_split"] = split
        self.__dict__["_ltm_context"] = context
        names = [p for p in split.signature.parameters if p != "self"]
        self.__dict__["_ltm_param_names"] = names

    # -- state helpers ------------------------------------------------------------------------
    @property
    def ltm_context(self) -> LtmContext:
        return self.__dict__["_ltm_context"]

    def keep_for(self, tokens_in: int) -> int:
        """Mergeable tokens kept for an input of ``tokens_in`` tokens (static per resolution)."""
        planned_m = self.ltm_tokens_in - self.ltm_prefix
        m = tokens_in - self.ltm_prefix
        if tokens_in == self.ltm_tokens_in:
            return self.ltm_keep
        return max(1, min(m, int(round(m * self.ltm_keep / max(planned_m, 1)))))

    def merges(self, tokens_in: int | None = None) -> bool:
        tokens_in = self.ltm_tokens_in if tokens_in is None else tokens_in
        return self.keep_for(tokens_in) < tokens_in - self.ltm_prefix

    def extra_repr(self) -> str:
        return (f"original={self.ltm_original_class}, prefix={self.ltm_prefix}, "
                f"tokens_in={self.ltm_tokens_in}, keep={self.ltm_keep}")

    # -- forward ------------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        names = self.__dict__["_ltm_param_names"]
        split: SplitBlock = self.__dict__["_ltm_split"]
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            values[key] = value
        for key in split.constants:
            value = values.get(key, split.constants[key])
            if isinstance(value, torch.Tensor) or (value is None) != (split.constants[key] is None):
                raise LtmError(
                    f"{self.ltm_original_class} was converted for calls with {key}={split.constants[key]!r}; "
                    f"it got a different {key}; convert the model for this calling convention"
                )
        return values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        split: SplitBlock = self.__dict__["_ltm_split"]
        ctx: LtmContext = self.__dict__["_ltm_context"]
        values = self._bind(args, kwargs)
        if self.ltm_first:
            ctx.reset()
        bias = None
        if self.ltm_prop_attn and ctx.sizes is not None:
            bias = ctx.sizes.log()[:, None, None, :]
            x = values[split.a_inputs[0]]
            bias = bias.to(x.dtype) if x.is_floating_point() else bias
        z = split.part_a(self, *[values[n] for n in split.a_inputs], bias)
        n = z.shape[1]
        keep = self.keep_for(n)
        if keep < n - self.ltm_prefix:
            record = None
            if ctx.record:
                ctx.records.append({"block": self.ltm_name, "tokens_in": n})
                record = ctx.records
            z, ctx.sizes = self.ltm_mask(z, ctx.sizes, self.ltm_prefix, keep, record)
        out = split.part_b(self, z, *[values[n] for n in split.b_inputs])
        if self.ltm_unmerge and ctx.unmerge is not None:
            out = ctx.unmerge(out) if isinstance(out, torch.Tensor) else (ctx.unmerge(out[0]), *out[1:])
            ctx.reset()
        return out
