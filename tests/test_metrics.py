"""One definition of "agreement with the original" (ltm_convert.metrics): ``ltm bench``, the
calibrated schedule's loss, fine-tune validation and the keep fit's output all give the same
number for the same models and images, also for a model whose output is a token sequence."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ltm_convert.api import convert, unmerged_copy
from ltm_convert.metrics import agreement, compared_output, pool_tokens, top1_agreement
from ltm_convert.sources import load_model

TOKENS = dict(depth=2, img_size=64, patch_size=8, num_classes=0, global_pool="")  # returns (B, 65, D)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = load_model("vit_tiny_patch16_224", pretrained=False, **TOKENS).eval()
    converted = convert(original, 0.6, inplace=False).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return original, converted, images


def test_the_definition():
    ref = torch.randn(3, 5, 8)
    out = ref.clone()
    out[0] = -out[0]  # the opposite direction
    out[1] = 3 * out[1]  # the same direction, another norm
    per_image = agreement(out, ref)
    assert per_image.dtype == torch.float64 and per_image.shape == (3,)
    torch.testing.assert_close(per_image, torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    tokens_mean = torch.nn.functional.cosine_similarity(pool_tokens(out), ref.mean(1), dim=-1).double()
    torch.testing.assert_close(agreement(out, ref), tokens_mean)
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert top1_agreement(logits, torch.tensor([[0.0, 1.0], [0.0, 1.0]])).tolist() == [1.0, 0.0]


def test_bench_calibrate_validation_and_keep_fit_measure_the_same(models):
    from ltm_convert.calibrate import AgreementLoss
    from ltm_convert.finetune.validation import FeatureTap, validate
    from ltm_convert.tools.bench import agreement as bench_agreement

    original, converted, images = models
    with torch.no_grad():
        out = converted(images)
        assert out.dim() == 3  # a token sequence: where the five old definitions differed
        expected = agreement(compared_output(converted, images), compared_output(original, images))
    assert float(expected.mean()) < 0.9999  # merging at 0.6 moved the outputs: the test can tell

    bench = bench_agreement(original, converted, images)
    assert bench["cosine_mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert bench["cosine_min"] == pytest.approx(float(expected.min()), abs=1e-6)

    class Switch(nn.Module):  # the calibrated schedule's "apply": full keep = the original
        def __init__(self) -> None:
            super().__init__()
            self.original, self.converted, self.full = original, converted, True

        def forward(self, x):
            return (self.original if self.full else self.converted)(x)

    switch = Switch()
    loss = AgreementLoss(switch, lambda keep: setattr(switch, "full", keep == {"all": 1}), {"all": 1}, images)
    assert 1 - loss({"all": 0}) == pytest.approx(float(expected.mean()), abs=1e-6)

    teacher = unmerged_copy(converted).eval()
    result = validate(converted, FeatureTap(converted), teacher, FeatureTap(teacher),
                      [(images, torch.zeros(len(images), dtype=torch.long))], device=torch.device("cpu"),
                      autocast=torch.no_grad, logits=False, use_ce=False, temperature=1.0)
    assert result["agreement"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert "top1_agreement" not in result  # not a classifier


def test_classifier_validation_reports_cosine_agreement_and_top1_apart():
    """For logits the agreement is still the cosine (what the keep fit and bench use); top-1
    agreement is reported next to it under its own name."""
    from ltm_convert.finetune.validation import FeatureTap, validate

    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=5)
    converted = convert(model, 0.5).eval()
    teacher = unmerged_copy(converted).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = validate(converted, FeatureTap(converted), teacher, FeatureTap(teacher),
                      [(images, torch.zeros(6, dtype=torch.long))], device=torch.device("cpu"),
                      autocast=torch.no_grad, logits=True, use_ce=False, temperature=1.0)
    with torch.no_grad():
        s, t = converted(images), teacher(images)
    assert result["agreement"] == pytest.approx(float(agreement(s, t).mean()), abs=1e-6)
    assert result["top1_agreement"] == pytest.approx(float(top1_agreement(s, t).mean()), abs=1e-9)
