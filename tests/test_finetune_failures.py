"""Fine-tuning where it used to fail badly: a model converted at ratio 1.0 (documented as valid), and
a run that diverges (NaN): the error says whether --resume can help, and the best validated weights
so far are written to -o instead of nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, ok, run_cli
from test_finetune import fresh, quiet, synthetic, tiny  # noqa: F401 - tiny is a fixture

from ltm_convert.api import convert
from ltm_convert.errors import LtmError, TrainingDiverged
from ltm_convert.finetune import Trainer
from ltm_convert.io import load, save
from ltm_convert.sources import load_model

COMMON = ["-b", "4", "--no-progress", "--max-steps", "2"]


def _images(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (40, 30), (40 * i, 90 + 20 * (c == "b"), 30)).save(root / c / f"{i}.png")
    return root


def _saved(path: Path, ratio: float) -> Path:
    torch.manual_seed(0)  # two blocks: merges in the last block of a class-token model never reach its head
    model = load_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2,
                       num_classes=2)
    return save(convert(model, ratio), path)


def test_ratio_one_model_fine_tunes_with_train_all_and_refuses_mask_in_one_line(tmp_path):
    """Nothing merges at ratio 1.0, so no mask parameter can get a gradient: --train mask says so
    (and what to do) before any step, --train all fine-tunes the weights and writes the model."""
    model = _saved(tmp_path / "r1.pt", 1.0)
    data = str(_images(tmp_path / "imgs"))
    line = assert_one_line_error(run_cli("finetune", str(model), "--data", data, "-o", "m.pt", *COMMON, cwd=tmp_path))
    assert "--train all" in line and "merges no token" in line
    assert not (tmp_path / "m.pt").exists()

    ok(run_cli("finetune", str(model), "--data", data, "-o", "all.pt", "--train", "all", "--lr", "1e-3",
               "--no-keep-best", *COMMON, cwd=tmp_path))
    before, after = load(model).state_dict(), load(tmp_path / "all.pt").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.split(".")[-1].startswith("ltm_"))


def test_a_loss_nothing_trained_changes_is_one_line_not_a_backward_error(tiny, tmp_path):  # noqa: F811
    """A model whose merging is switched off is refused up front with --train mask; one switched off
    after the trainer was built (so nothing trained reaches the loss) stops at its first step with one
    line, not torch's "element 0 of tensors does not require grad"."""
    from ltm_convert.api import disable_merging

    off = fresh(tiny)
    disable_merging(off)
    with pytest.raises(LtmError, match="merges no token"):
        Trainer(off, synthetic(16), quiet(max_steps=1), tmp_path / "off")
    student = fresh(tiny)
    trainer = Trainer(student, synthetic(16), quiet(max_steps=1), tmp_path / "late")
    disable_merging(student)
    with pytest.raises(LtmError, match="changes the loss"):
        trainer.fit()


def test_divergence_writes_the_best_validated_weights_to_output(tmp_path):
    """--mask-lr 1e30 diverges within a few steps: exit 2 with one line that names the file written,
    and -o holds the best validated weights (the unchanged start), finite and loadable."""
    model = _saved(tmp_path / "m.pt", 0.6)
    data = str(_images(tmp_path / "imgs"))
    proc = run_cli("finetune", str(model), "--data", data, "-o", "out.pt", "-b", "2", "--no-progress",
                   "--mask-lr", "1e30", "--save-every", "1", "--epochs", "3", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert "NaN" in line and "were written to out.pt" in line and "step 0" in line
    start, written = load(model).state_dict(), load(tmp_path / "out.pt").state_dict()
    assert all(torch.equal(start[k], written[k]) for k in start)


def test_a_nan_that_resume_would_repeat_says_start_a_new_run(tiny, tmp_path):  # noqa: F811
    """The batch of step 3 is poisoned; the weights were fine on step 2's batch, so the checkpoint is
    where step 3 starts. --resume with lower rates computes the same NaN again, and the message says
    so instead of advising a lower --lr with --resume."""
    def poisoned(trainer: Trainer):
        real = trainer.train_step

        def step(images, labels):
            if trainer.state.global_step == 2:
                images = torch.full_like(images, float("nan"))
            return real(images, labels)
        trainer.train_step = step
        return trainer

    first = poisoned(Trainer(fresh(tiny), synthetic(24), quiet(epochs=1), tmp_path))
    with pytest.raises(TrainingDiverged) as e:
        first.fit()
    assert "--resume would repeat it" in str(e.value) and "without --resume" in str(e.value)
    again = poisoned(Trainer(fresh(tiny), synthetic(24), quiet(epochs=1, mask_lr=1e-9), tmp_path))
    again.resume()
    with pytest.raises(TrainingDiverged) as e2:
        again.fit()
    assert "at step 3" in str(e.value) and "at step 3" in str(e2.value)


def test_fit_keep_is_bounded_by_the_data(tiny, tmp_path):  # noqa: F811
    with pytest.raises(LtmError, match=r"at most 128") as e:
        Trainer(fresh(tiny), synthetic(16), quiet(fit_keep=10 ** 9), tmp_path)
    assert "16 training images" in str(e.value)
    Trainer(fresh(tiny), synthetic(16), quiet(fit_keep=128), tmp_path)  # the bound itself is accepted
