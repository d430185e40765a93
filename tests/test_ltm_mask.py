"""The LTM mask's arithmetic: the fast paths must compute exactly the merge the design defines.

x~_t = (s_t z_t + sum_i s_i A_it z_i) / (s_t + sum_i s_i A_it), written three ways in ltm_block:
a dense GEMM (every token to every target), a sparse row update (k targets per token) and the
banded redundancy score. Each is checked against the formula written out naively.
"""
from __future__ import annotations

import math

import pytest
import torch

from ltm_convert.merge.ltm_mask_v1 import LtmMaskV1 as LtmMask  # the 0.1.0 mask: its properties still hold
from ltm_convert.merge.sparse import merge_dense, merge_sparse, redundancy


def naive_merge(z_rows, s_rows, z_o, mass):
    """mass (B, R, T): straight from the definition."""
    num = s_rows.unsqueeze(-1) * z_rows + torch.einsum("brt,brd->btd", mass, z_o)
    den = s_rows + mass.sum(dim=1)
    return num / den.unsqueeze(-1), den


def test_dense_and_sparse_merge_match_the_definition():
    g = torch.Generator().manual_seed(0)
    B, N, D, R, k = 3, 40, 16, 9, 4
    z = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    rows = torch.stack([torch.randperm(N, generator=g)[: N - R] for _ in range(B)])  # output rows
    T = rows.shape[1]
    z_rows = z.gather(1, rows.unsqueeze(-1).expand(B, T, D))
    z_o = torch.randn(B, R, D, generator=g, dtype=torch.float64)
    s_rows = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    # k distinct slots per token, several tokens sharing slots (the case a plain scatter gets wrong)
    slot = torch.stack([torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(R)]) for _ in range(B)])
    mass = torch.rand(B, R, k, generator=g, dtype=torch.float64)
    dense_mass = torch.zeros(B, R, T, dtype=torch.float64).scatter_(2, slot, mass)

    want, want_s = naive_merge(z_rows, s_rows, z_o, dense_mass)
    got, got_s = merge_dense(z_rows.clone(), s_rows, z_o, dense_mass)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_s, want_s)
    got, got_s = merge_sparse(z, rows, s_rows, z_o, mass, slot)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_s, want_s)


@pytest.mark.parametrize("m", [1, 7, 63, 64, 65, 257])
def test_banded_redundancy_is_max_cosine_to_an_earlier_token(m):
    phi = torch.nn.functional.normalize(torch.randn(2, m, 8, generator=torch.Generator().manual_seed(m)), dim=-1)
    scores = phi @ phi.transpose(1, 2)
    earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)
    want = scores.masked_fill(~earlier, float("-inf")).amax(dim=-1).clamp_min(-1.0)
    torch.testing.assert_close(redundancy(phi), want)


def test_sparse_mask_keeps_sizes_and_gradients():
    """topk=4 (the 0.1.0 default): sizes add up, each token reaches at most 4 targets, every parameter
    and the input get a gradient (the straight-through gate carries kappa's)."""
    torch.manual_seed(0)
    mask = LtmMask(24, 8, topk=4)
    assert mask.topk == 4
    with torch.no_grad():
        mask.kappa.weight.normal_()
        mask.size_weight.fill_(0.3)
    z = torch.randn(2, 1 + 30, 24, requires_grad=True)
    sizes = torch.rand(2, 31) + 1.0
    from ltm_convert.merge.state import recording

    with recording() as record:
        record.append({})
        out, new_sizes, _ = mask(z, sizes, 1, 20)
    assert out.shape == (2, 21, 24)
    torch.testing.assert_close(new_sizes.sum(dim=1), sizes.sum(dim=1))
    assert int((record[-1]["assign"] > 0).sum(dim=-1).max()) <= 4
    out.square().sum().backward()
    for name, p in mask.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0


def test_default_k_matches_all_targets_at_the_initial_temperature():
    """At tau = 1e-3 a token's mass beyond its 4 nearest targets is below float precision when the
    tokens are distinct, so topk=4 computes what topk=0 (all targets) computes; k >= keep is the
    dense path itself."""
    torch.manual_seed(1)
    dense, sparse, full = LtmMask(24, 8, topk=0), LtmMask(24, 8, topk=4), LtmMask(24, 8, topk=20)
    sparse.load_state_dict(dense.state_dict())
    full.load_state_dict(dense.state_dict())
    z = torch.randn(2, 31, 24)
    a, sa, _ = dense(z, None, 1, 20)
    b, sb, _ = sparse(z, None, 1, 20)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(sb, sa)
    torch.testing.assert_close(full(z, None, 1, 20)[0], a, rtol=0, atol=0)


def test_relaxed_training_merge_computes_what_the_hard_merge_does():
    """Training mode runs the relaxed merge (all tokens stay, weighted); it must stay close to the
    hard merge of eval mode, or the masks would learn for a model that is never run."""
    from model_zoo import images_for, timm_model

    from ltm_convert.api import convert

    teacher = timm_model("vit-avg")
    student = convert(teacher, 0.5)
    x = images_for(student, batch=4)
    with torch.no_grad():
        hard = student.eval()(x)
        soft = student.train()(x)
        original = teacher(x)
    cos = torch.nn.functional.cosine_similarity
    assert cos(soft, hard).min() > 0.95, cos(soft, hard)
    # closer to the hard model than the hard model is to the original: the relaxation is not the gap
    assert cos(soft, hard).mean() > cos(hard, original).mean()


def test_relaxed_merge_gradients_are_bounded():
    """The gradient comes from a smooth surrogate (straight-through): before, the keep gate's and the
    assignment's sharpness gave gradients of 1e4-1e8 that predicted nothing a step away."""
    from model_zoo import images_for, timm_model

    from ltm_convert.api import convert, ltm_parameters

    teacher = timm_model("vit-avg")
    student = convert(teacher, 0.5).train()
    x = images_for(student, batch=2)
    with torch.no_grad():
        target = teacher(x)
    (1 - torch.nn.functional.cosine_similarity(student(x), target)).mean().backward()
    norms = {n: p.grad.norm().item() for n, p in ltm_parameters(student) if p.grad is not None}
    assert norms and all(math.isfinite(v) and v < 100.0 for v in norms.values()), max(norms.values())


def test_base_keep_score_is_used_by_rank():
    from ltm_convert.merge.ltm_mask import _ranks

    x = torch.tensor([[0.9990, 0.9991, -1.0, 0.9992]])
    r = _ranks(x)
    assert torch.equal(r.argsort(), x.argsort())
    assert abs(r.mean().item()) < 1e-6 and (r[0, 1:2] - r[0, 0:1]).item() == pytest.approx((r[0, 3] - r[0, 1]).item())
    present = torch.tensor([[True, True, False, True]])
    rp = _ranks(x, present)
    assert rp[0, 2] < rp[0, [0, 1, 3]].min() and rp[0, [0, 1, 3]].max().item() == pytest.approx(math.sqrt(3.0))


def _mutual_by_definition(phi, present=None):
    """Best cosine to another (present) token; the earlier token of a mutual best pair scores 2 less."""
    B, M, _ = phi.shape
    cos = phi @ phi.transpose(1, 2)
    cos = cos.masked_fill(torch.eye(M, dtype=torch.bool), float("-inf"))
    if present is not None:
        cos = cos.masked_fill(~present.unsqueeze(1), float("-inf"))
    best, partner = cos.max(dim=-1)  # first maximal column
    idx = torch.arange(M)
    earlier = (partner.gather(1, partner) == idx) & (partner > idx)
    return torch.where(earlier, best - 2.0, best)


@pytest.mark.parametrize("with_present", [False, True])
def test_mutual_redundancy_matches_its_definition_with_ties(with_present):
    """The partner is found without ``max``'s indices (a plain max over shifted values); exact
    duplicates (ties) must still pick the first maximal column, as ``max`` does."""
    from ltm_convert.merge.sparse import mutual_redundancy_, partner_cosines

    g = torch.Generator().manual_seed(3)
    phi = torch.nn.functional.normalize(torch.randn(4, 97, 16, generator=g), dim=-1)
    phi[:, 5] = phi[:, 40]
    phi[:, 60] = phi[:, 40]  # three identical tokens
    phi[:, 7] = phi[:, 8]
    present = torch.rand(4, 97, generator=g) > 0.2 if with_present else None
    got = mutual_redundancy_(partner_cosines(phi, present))
    want = _mutual_by_definition(phi, present)
    if present is not None:
        got, want = got[present], want[present]
    assert torch.equal(got, want)


def test_untrained_fast_path_merges_what_the_general_path_merges(monkeypatch):
    """An untrained keep term (exactly 0) skips one sort: the targets must be the same ones."""
    from ltm_convert.merge import ltm_mask as L
    from ltm_convert.merge.state import recording

    torch.manual_seed(4)
    mask = L.LtmMask(24, 8).eval()
    z, sizes = torch.randn(3, 1 + 50, 24), torch.rand(3, 51) + 1.0

    def run():
        with recording() as record, torch.no_grad():
            record.append({})
            out = mask(z, sizes, 1, 30)
        return out, record[-1]["targets"]

    (fast, fast_s, _), fast_t = run()
    monkeypatch.setattr(L, "_all_zero_on_cpu", lambda x: False)
    (slow, slow_s, _), slow_t = run()
    assert torch.equal(fast_t, slow_t)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_s, slow_s)


def test_split_in_order_keeps_original_order():
    from ltm_convert.merge.ltm_mask import _split_in_order

    order = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    targets, others = _split_in_order(order, 7)
    for b in range(5):
        assert targets[b].tolist() == sorted(order[b, :7].tolist())
        assert others[b].tolist() == sorted(order[b, 7:].tolist())


def test_touched_row_norm_correction_is_the_full_one():
    """merge_sparse_keep_norms rescales only the rows a token reached; it must equal merge_sparse +
    preserve_norms on every row, and leave untouched rows exactly as they were."""
    from ltm_convert.merge.sparse import merge_sparse_keep_norms, preserve_norms

    g = torch.Generator().manual_seed(5)
    B, N, D, R, k = 3, 40, 16, 9, 2
    z = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    rows, others = perm[:, : N - R], perm[:, N - R:]
    z_o = z.gather(1, others.unsqueeze(-1).expand(B, R, D))
    s_rows = torch.rand(B, N - R, generator=g, dtype=torch.float64) + 0.5
    slot = torch.stack([torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(R)]) for _ in range(B)])
    mass = torch.rand(B, R, k, generator=g, dtype=torch.float64)
    want, want_s = merge_sparse(z, rows, s_rows, z_o, mass, slot)
    want = preserve_norms(want, z, rows, s_rows, others, mass, slot, want_s)
    got, got_s = merge_sparse_keep_norms(z, rows, s_rows, z_o, mass, slot)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_s, want_s)
    untouched = torch.ones(B, N - R, dtype=torch.bool).scatter_(1, slot.reshape(B, -1), False)
    z_rows = z.gather(1, rows.unsqueeze(-1).expand(B, N - R, D))
    assert torch.equal(got[untouched], z_rows[untouched])


def test_spread_is_the_standard_deviation():
    from ltm_convert.merge.ltm_mask import _spread

    x = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(_spread(x), x.std(dim=-1, keepdim=True))


def test_a_saved_config_without_topk_replays_the_old_default():
    """The default went from 4 targets to 2; a file that never stored topk was made with 4."""
    from ltm_convert.config import DEFAULT_TOPK, LtmConfig

    saved = LtmConfig(ratio=0.7, keep={"blocks.0": 10}).to_dict()
    assert saved["topk"] == DEFAULT_TOPK == 2
    del saved["topk"]
    assert LtmConfig.from_dict(saved).topk == 4
