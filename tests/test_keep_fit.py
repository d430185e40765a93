"""The keep fit (ltm_convert/finetune/keep_fit.py, `finetune --fit-keep N`): its prices are the
first-order change of the merged rows, it replaces only the keep terms and leaves the model as it
found it otherwise, and the trainer keeps it only when validation agrees at least as well."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from ltm_convert.api import convert
from ltm_convert.errors import LtmError
from ltm_convert.finetune import FinetuneConfig, Trainer
from ltm_convert.finetune.data import DataBundle
from ltm_convert.finetune.keep_fit import fit_keep_terms, keep_terms, merge_prices
from ltm_convert.merge.ltm_mask import LtmMask
from ltm_convert.merge.rows import take_rows
from ltm_convert.merge.sparse import merge_dense, preserve_norms
from ltm_convert.merge.state import recorder, recording_merges
from ltm_convert.sources import load_model

TINY = dict(depth=3, img_size=64, global_pool="avg", num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return convert(load_model("vit_tiny_patch16_224", pretrained=False, **TINY), 0.5)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _merge(z, targets, others, mass, near, prefix):
    """The LTM merge in float64: size-weighted average, then each row rescaled to the size-weighted
    mean norm of what it holds (preserve_norms computes the scale in float32, too coarse for a
    derivative; the test checks the two agree)."""
    B = z.shape[0]
    rows = torch.cat([torch.arange(prefix).expand(B, prefix), targets + prefix], dim=1)
    slot = near + prefix
    full = torch.zeros(B, others.shape[1], rows.shape[1], dtype=z.dtype).scatter_(2, slot, mass)
    s_rows = torch.ones(rows.shape, dtype=z.dtype)
    z_o = take_rows(z, others + prefix)
    average, sizes = merge_dense(take_rows(z, rows), s_rows, z_o, full)
    norm = (s_rows * take_rows(z, rows).norm(dim=-1) + (full * z_o.norm(dim=-1).unsqueeze(-1)).sum(1)) / sizes
    merged = average * (norm / average.norm(dim=-1)).unsqueeze(-1)
    reference = preserve_norms(average, z, rows, s_rows, others + prefix, mass, slot, sizes)
    torch.testing.assert_close(merged, reference, rtol=1e-6, atol=1e-6)
    return merged, sizes, slot, rows, s_rows


def test_prices_are_the_first_order_change_of_a_linear_output():
    """With out = <G, merged> and the real merge (average, then norms restored): a merged-away
    token's price is its mass times the derivative of out by that mass; a target's is the exact
    change from merging it with its nearest other target."""
    g = torch.Generator().manual_seed(0)
    B, prefix, D = 2, 1, 5
    z = torch.randn(B, prefix + 7, D, generator=g, dtype=torch.float64)
    phi = torch.nn.functional.normalize(torch.randn(B, 7, 4, generator=g), dim=-1)
    order = torch.stack([torch.randperm(7, generator=g) for _ in range(B)])
    targets, others = order[:, :3], order[:, 3:]
    near = torch.stack([torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(4)]) for _ in range(B)])
    mass = torch.rand(B, 4, 2, generator=g, dtype=torch.float64)
    merged, sizes, slot, rows, s_rows = _merge(z, targets, others, mass, near, prefix)
    G = torch.randn(merged.shape, generator=g, dtype=torch.float64)
    rec = {"z": z, "targets": targets, "others": others, "mass": mass, "slot": slot, "merged": merged,
           "sizes": sizes, "prefix": prefix, "phi": phi, "rows": rows, "s_rows": s_rows}
    price = merge_prices(rec, G)
    d = 1e-5
    for b in range(B):
        for i in range(4):  # central difference in the token's mass, scaled by the mass
            up, down = mass.clone(), mass.clone()
            up[b, i] *= 1 + d
            down[b, i] *= 1 - d
            change = _merge(z, targets, others, up, near, prefix)[0] - _merge(z, targets, others, down, near, prefix)[0]
            assert price[b, others[b, i]] == pytest.approx(float((G[b] * change[b]).sum()) / (2 * d), rel=1e-6)
        pt = phi[b, targets[b]]
        cos = pt @ pt.T
        cos.fill_diagonal_(-4)
        for r in range(3):
            u = int(cos[r].argmax())
            out = merged[b].clone()
            s_r, s_u = sizes[b, prefix + r], sizes[b, prefix + u]
            m_r, m_u = merged[b, prefix + r], merged[b, prefix + u]
            both = (s_r * m_r + s_u * m_u) / (s_r + s_u)
            both = both * (s_r * m_r.norm() + s_u * m_u.norm()) / (s_r + s_u) / both.norm()
            out[prefix + r] = out[prefix + u] = both
            assert price[b, targets[b, r]] == pytest.approx(float((G[b] * (out - merged[b])).sum()), rel=1e-9)


def test_fit_replaces_the_keep_terms_and_nothing_else(tiny):
    model = copy.deepcopy(tiny).train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(4, seed=9)
    with torch.no_grad():
        out_before = model.eval()(x)
    model.train()
    report = fit_keep_terms(model, [_images(8, 1), _images(8, 2)])
    masks = {n: m for n, m in model.named_modules() if isinstance(m, LtmMask)}
    assert report["images"] == 16 and set(report["blocks"]) == set(masks)
    for name, block in report["blocks"].items():
        assert block["tokens"] > 0 and 0.0 <= block["r2"] <= 1.0, (name, block)
        assert masks[name].kappa.weight.abs().sum() > 0
    assert recorder() is None and not recording_merges()  # the recording ended with the fit
    after = model.state_dict()
    assert list(after) == list(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{n}.kappa.weight" for n in masks}
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), out_before)  # other tokens are kept now
    again = copy.deepcopy(tiny)
    fit_keep_terms(again, [_images(8, 1), _images(8, 2)])
    for k, v in keep_terms(again).items():  # same images and seed: the same fit
        assert torch.equal(v, keep_terms(model)[k])


def test_fit_refuses_a_model_without_ltm_masks(tmp_path):
    tome = convert(load_model("vit_tiny_patch16_224", pretrained=False, **TINY), 0.5, method="tome")
    with pytest.raises(LtmError, match="--fit-keep"):
        fit_keep_terms(tome, [_images(2)])
    with pytest.raises(LtmError, match="--fit-keep"):  # before any work, not after the first evaluation
        Trainer(tome, _data(), FinetuneConfig(batch_size=8, fit_keep=8, progress=False), tmp_path / "run")


def _data(n: int = 16) -> DataBundle:
    x, y = _images(n, 3), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(4))
    return DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:8], y[:8]), classes=[str(i) for i in range(10)],
                      skipped=0)


@pytest.mark.parametrize("after, kept", [(0.95, True), (0.85, False)])
def test_trainer_keeps_the_fit_only_if_validation_agrees_as_well(tiny, tmp_path, monkeypatch, after, kept):
    scores = iter([0.90, after, 0.5])

    def evaluate(self, model=None):
        return {"agreement": next(scores), "kd": 0.1, "val_images": 8}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    model = copy.deepcopy(tiny)
    cfg = FinetuneConfig(batch_size=8, max_steps=1, progress=False, fit_keep=8, mask_lr=0.0, save_every=0, ema=0.99)
    tr = Trainer(model, _data(), cfg, tmp_path / "run")
    tr.fit()
    for name, term in keep_terms(tr.ema.model).items():  # the average starts from the fitted terms
        torch.testing.assert_close(term, keep_terms(model)[name])
    record = next(h for h in tr.state.history if h["type"] == "keep_fit")
    assert record["images"] == 8 and record["kept"] is kept and len(record["r2"]) == 3
    assert any(h["type"] == "eval" and h["when"] == "keep_fit" for h in tr.state.history)
    fitted = any(m.kappa.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LtmMask))
    assert fitted is kept
    assert tr.best["agreement"] == after if kept else tr.best["agreement"] == 0.90
    with pytest.raises(LtmError, match="--fit-keep must be >= 0"):
        FinetuneConfig(fit_keep=-1).validate()


DIST_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_keep_fit import _data
from ltm_convert.io import load
from ltm_convert.finetune import FinetuneConfig, Trainer
from ltm_convert.finetune.keep_fit import keep_terms
work = sys.argv[1]
cfg = FinetuneConfig(batch_size=8, max_steps=1, progress=False, fit_keep=8, mask_lr=0.0, save_every=0,
                     eval_before=False, device="cpu")
tr = Trainer(load({model!r}), _data(), cfg, work)
tr.fit()
record = next(h for h in tr.state.history if h["type"] == "keep_fit")
torch.save({{"terms": keep_terms(tr.student), "images": record["images"]}}, os.path.join(work, f"rank{{tr.dist.rank}}.pt"))
tr.close()
"""


def test_two_processes_fit_one_keep_term_from_both_shards(tiny, tmp_path):
    """Under torchrun each process prices its own shard; the statistics are summed, so every
    process ends with the same keep terms, fitted on all the images."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ltm_convert.io import save

    model = save(copy.deepcopy(tiny), tmp_path / "tiny.pt")
    script = tmp_path / "run.py"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).parent), model=str(model)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "work")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    a, b = (torch.load(tmp_path / "work" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["images"] == b["images"] == 8
    assert a["terms"] and all(v.abs().sum() > 0 for v in a["terms"].values())
    for k, v in a["terms"].items():
        torch.testing.assert_close(b["terms"][k], v, rtol=0, atol=0)


def test_more_views_than_images_go_round_again(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    cfg = FinetuneConfig(batch_size=8, max_steps=1, progress=False, fit_keep=20, mask_lr=0.0, save_every=0,
                         eval_before=False)
    tr = Trainer(model, _data(16), cfg, tmp_path / "run")
    tr.fit()
    record = next(h for h in tr.state.history if h["type"] == "keep_fit")
    assert record["images"] == 20 and "kept" not in record  # no validation before: kept unchecked
    assert any(m.kappa.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LtmMask))
