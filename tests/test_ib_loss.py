"""The IB loss (finetune/losses.py) without the public code's defects, one test per defect."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from ltm_convert.errors import LtmError
from ltm_convert.finetune.losses import IBLoss, kd_features, kd_logits, soft_assign


def _blobs(n_per: int, centres: torch.Tensor, seed: int, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    k, d = centres.shape
    x = centres.repeat_interleave(n_per, 0) + noise * torch.randn(k * n_per, d, generator=g)
    y = torch.arange(k).repeat_interleave(n_per)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], y[perm]


def test_soft_assign_is_vectorised_and_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, generator=g)
    v = F.normalize(torch.randn(4, 7, generator=g), dim=-1)
    got = soft_assign(f, v, beta=2.0)
    fn = F.normalize(f, dim=-1)
    want = torch.stack([torch.softmax(torch.stack([-2.0 * ((fn[i] - v[b]) ** 2).sum() for b in range(4)]), 0)
                        for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(5))


def test_q_table_is_q_y_given_b_from_soft_counts():
    ib = IBLoss(num_classes=3, clusters=4, prior=0.0, seed=0)
    g = torch.Generator().manual_seed(1)
    f, x, y = torch.randn(12, 6, generator=g), torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    ib.update(f, x, y)  # first call initialises, then counts this batch once
    phi = soft_assign(f, ib.v_out, ib.beta)  # centroids after the step
    q = ib.q_table()
    assert q.shape == (4, 3)  # (clusters, classes): rows are clusters -> q(y | b), not p(b | y)
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    # counts[b, y] = sum_i phi_i(b) [y_i = y] with the assignment used during the update
    assert torch.all(ib.counts >= 0) and abs(float(ib.counts.sum()) - 12.0) < 1e-4
    assert phi.shape == (12, 4)


def test_loss_uses_q_y_given_b_and_term_x_has_no_gradient():
    ib = IBLoss(num_classes=2, clusters=2, beta=50.0, prior=1e-3)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f, y = _blobs(20, c, seed=0)
    ib.update(f, f, y)
    for _ in range(20):
        ib.update(f, f, y)
    feats = f.clone().requires_grad_(True)
    x = f.clone().requires_grad_(True)
    loss, parts = ib(feats, x, y)
    term_x = parts["ib_term_x"]
    assert loss.requires_grad and not term_x.requires_grad
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert x.grad is None  # term_X is for logging only: it has no path to the model
    # correctly labelled well-separated features: loss near 0; swapped labels: large
    bad, _ = ib(f, f, 1 - y)
    assert float(loss.detach()) < 0.1 < float(bad)


def test_centroids_stay_aligned_across_updates():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 8), dim=-1)
    ib = IBLoss(num_classes=3, clusters=3, beta=20.0, momentum=0.5, seed=0)
    owner = None
    for epoch in range(6):
        f, y = _blobs(30, centres, seed=epoch)
        for i in range(0, 90, 15):
            ib.update(f[i:i + 15], f[i:i + 15], y[i:i + 15])
        # which centroid each true centre is nearest to must not change between epochs
        now = torch.cdist(centres, ib.v_out).argmin(1)
        if owner is None:
            owner = now
        assert torch.equal(now, owner), f"cluster indices moved at epoch {epoch}"
    # and the table agrees with the clusters it was counted on
    q = ib.q_table()
    for cls in range(3):
        assert int(q[owner[cls]].argmax()) == cls


def test_sizes_come_from_the_data():
    for d_out, d_in, classes in ((3, 11, 2), (17, 5, 9)):
        ib = IBLoss(num_classes=classes, clusters=5)
        f, x = torch.randn(8, d_out), torch.randn(8, d_in)
        y = torch.randint(0, classes, (8,))
        ib.update(f, x, y)
        assert ib.v_out.shape == (5, d_out) and ib.v_in.shape == (5, d_in) and ib.counts.shape == (5, classes)
        loss, _ = ib(f, x, y)
        assert torch.isfinite(loss)
        fresh = IBLoss(num_classes=classes, clusters=5)
        fresh.load_state_dict(ib.state_dict())
        torch.testing.assert_close(fresh(f, x, y)[0], loss)
    with pytest.raises(LtmError):
        ib.update(torch.randn(2, d_out), torch.randn(2, d_in), torch.tensor([0, classes]))
    with pytest.raises(LtmError):
        IBLoss(num_classes=1)


def test_distillation_losses():
    s = torch.randn(4, 10)
    assert float(kd_logits(s, s, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_logits(s, torch.randn(4, 10), 2.0)) > 0
    assert float(kd_features(s, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_features(torch.randn(4, 5, 8), torch.randn(4, 9, 8))) > 0  # token counts may differ
    with pytest.raises(LtmError):
        kd_logits(s, s, 0.0)


# ---- statistics are all-reduced across ranks -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, f, x, y, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ib = IBLoss(num_classes=4, clusters=6, seed=3)
        n = f[0].shape[0] // world
        for step in range(3):
            sl = slice(rank * n, (rank + 1) * n)
            ib.update(f[step][sl], x[step][sl], y[step][sl])
        torch.save(dict(ib.state_dict()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_statistics_are_all_reduced_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    f = [torch.randn(8, 6, generator=g) for _ in range(3)]
    x = [torch.randn(8, 5, generator=g) for _ in range(3)]
    y = [torch.randint(0, 4, (8,), generator=g) for _ in range(3)]
    single = IBLoss(num_classes=4, clusters=6, seed=3)
    for step in range(3):
        single.update(f[step], x[step], y[step])
    mp.start_processes(_worker, args=(2, _free_port(), f, x, y, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")


def test_compression_term_is_a_bottleneck():
    """The compression term KL(p(b|x) || p(b)) is 0 when every input lands in the same mix of clusters
    and grows as the clusters tell inputs apart; it carries a gradient into the features, and at the
    default beta the assignments are far from uniform (beta = 1 left them at the maximum entropy)."""
    torch.manual_seed(0)
    ib = IBLoss(num_classes=3, clusters=6, seed=0)
    c = torch.eye(3, 8)
    f, y = _blobs(60, c, seed=1)
    for _ in range(5):
        ib.update(f, f, y)
    feats = f.clone().requires_grad_(True)
    loss, parts = ib(feats, f, y)
    assert parts["ib_compression"] > 0.3
    same = torch.ones(180, 8)
    _, flat = ib(same, same, y)
    assert float(flat["ib_compression"]) < 1e-4
    loss.backward()
    assert feats.grad.abs().sum() > 0
    phi = soft_assign(f, ib.v_out, ib.beta)
    entropy = float(-(phi * phi.clamp_min(1e-12).log()).sum(-1).mean())
    assert entropy < 0.5 * math.log(6)
