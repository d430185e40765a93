"""The fine-tuning loop: distillation from the frozen original + CE + IB, one process or DDP.

Exactness: the data order is a function of (seed, epoch); checkpoints are taken at step
boundaries and hold every piece of state the next step reads (weights, optimizer, scheduler,
scaler, EMA, IB statistics, RNG, data position), so a run resumed from a checkpoint reaches the
same weights as one that never stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ltm_convert.config import is_ltm_name
from ltm_convert.errors import LtmError, TrainingDiverged
from ltm_convert.finetune import checkpoint as ckpt
from ltm_convert.finetune import distributed as D
from ltm_convert.finetune.config import FinetuneConfig
from ltm_convert.finetune.data import DataBundle, ResumableSampler, shard
from ltm_convert.finetune.losses import IBLoss, distill
from ltm_convert.finetune.optim import (  # noqa: F401 - re-exported: loop is where callers look
    Ema,
    amp_settings,
    cosine_with_warmup,
    merge_hard,
    merges_tokens,
    param_groups,
)
from ltm_convert.finetune.validation import (  # noqa: F401 - re-exported: loop is where callers look
    FeatureTap,
    has_logits,
    head_module,
    make_teacher,
    validate,
    validates_better,
)


def progress_bar(enabled: bool):
    """A started rich progress bar (description, bar, steps done, time left), or None when off."""
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 transient=False)
    p.start()
    return p


def finite_json(value: Any) -> Any:
    """A log record with NaN / inf numbers written as strings, so every line is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


KEEP_FIT_PASSES = 8  # --fit-keep may ask for at most this many passes over the training images
KEEP_FIT_SEED = 7919  # the keep fit's image order: its own stream, not the training sampler's
KEEP_FIT_EPOCH = 1_000_000  # augmentation epochs of the keep fit's passes: crops no training epoch sees


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, student: nn.Module, data: DataBundle, cfg: FinetuneConfig, workdir: Path,
                 teacher: nn.Module | None = None) -> None:
        cfg.validate()
        self.cfg, self.data, self.workdir = cfg, data, Path(workdir)
        self.dist = D.setup(cfg.device)
        dev = self.dist.device
        torch.manual_seed(cfg.seed)
        self.student = student.to(dev)
        self.teacher = (teacher or make_teacher(student)).to(dev).eval()
        self.logits = has_logits(self.student)
        self.labelled = data.num_classes >= 2
        out_dim = None
        if self.logits:
            head = head_module(self.student)
            out_dim = getattr(head, "out_features", None)
        self.use_ce = cfg.ce_weight > 0 and self.labelled and self.logits and out_dim == data.num_classes
        if cfg.ce_weight > 0 and self.labelled and self.logits and out_dim != data.num_classes and self.dist.main:
            import warnings

            warnings.warn(f"the model's head has {out_dim} classes and the data {data.num_classes}: cross-entropy is "
                          "off, the head is trained by distillation only (convert a model whose head fits the data, "
                          "e.g. --num-classes)", UserWarning, stacklevel=2)
        self.use_ib = cfg.ib_weight > 0 and self.labelled
        self.ib = IBLoss(data.num_classes, clusters=cfg.ib_clusters, beta=cfg.ib_beta, seed=cfg.seed,
                         compression=cfg.ib_compression).to(dev) \
            if self.use_ib else None
        self.tap_s, self.tap_t = FeatureTap(self.student), FeatureTap(self.teacher)
        from ltm_convert.merge.ltm_mask import LtmMask

        if cfg.fit_keep and not any(isinstance(m, LtmMask) for m in self.student.modules()):
            raise LtmError("--fit-keep fits the keep term of LTM masks, and this model has none "
                           "(convert it with the ltm method, or leave --fit-keep out)")

        if cfg.train == "mask" and not merges_tokens(self.student):
            raise LtmError("this model merges no token (converted at ratio 1.0?), so its LTM masks get no gradient and "
                           "--train mask has nothing to learn; fine-tune its weights with --train all, or convert it "
                           "at a ratio < 1")
        limit = KEEP_FIT_PASSES * len(data.train)
        if cfg.fit_keep > limit:
            raise LtmError(f"--fit-keep {cfg.fit_keep} asks for more than {KEEP_FIT_PASSES} passes over the "
                           f"{len(data.train)} training images; use at most {limit} (each pass past the first sees "
                           "the same images with new crops)")

        world = self.dist.world
        if cfg.batch_size % world:
            raise LtmError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
        self.per_rank = cfg.batch_size // world
        self.sampler = ResumableSampler(data.train, num_replicas=world, rank=self.dist.rank, seed=cfg.seed,
                                        batch_size=self.per_rank)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise LtmError(f"{len(data.train)} training images give no full batch of {cfg.batch_size}; lower --batch-size")
        total = int(math.ceil(cfg.epochs * self.steps_per_epoch))
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.ib_start = int(cfg.ib_warmup * total)

        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg), betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total, int(cfg.warmup * total), cfg.min_lr_ratio))
        self.amp, self.amp_dtype = amp_settings(cfg, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.ema = Ema(self.student, cfg.ema) if cfg.ema else None
        self.model: nn.Module = self.student
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=True)
        self.state = RunState()
        self.ckpt_path = self.workdir / "checkpoint.pt"
        self.log_path = self.workdir / "log.jsonl"
        self.save_due = False
        self.saved_step: int | None = None
        self.best_path = self.workdir / "best.pt"
        self.best: dict[str, Any] | None = None  # {"step", "agreement", "kd"} of the best validated weights

    # -- bookkeeping ----------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.dist.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

    def save(self, rng: dict[str, Any] | None = None) -> None:
        """Checkpoint the run at the current step boundary (see checkpoint.save_run)."""
        ckpt.save_run(self, rng)

    def resume(self, path: Path | None = None) -> bool:
        """Continue exactly from a checkpoint; changed optimisation flags take effect (with a warning)."""
        return ckpt.resume_run(self, Path(path) if path else self.ckpt_path)

    # -- steps ----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def losses(self, images: torch.Tensor, labels: torch.Tensor, *, update_ib: bool = True,
               step: int | None = None) -> dict[str, torch.Tensor]:
        step = self.state.global_step if step is None else step
        with torch.no_grad(), self._autocast():
            t_out, t_feat = self.tap_t(self.teacher, images)
        with self._autocast():
            s_out, s_feat = self.tap_s(self.model, images)
        parts = {"kd": distill(s_out.float(), t_out.float(), logits=self.logits, temperature=self.cfg.temperature)}
        loss = self.cfg.kd_weight * parts["kd"]
        if self.use_ce:
            parts["ce"] = F.cross_entropy(s_out.float(), labels)
            loss = loss + self.cfg.ce_weight * parts["ce"]
        if self.ib is not None:
            if not self.ib.ready:
                self.ib.update(s_feat, t_feat, labels)
            ib, ib_parts = self.ib(s_feat.float(), t_feat.float(), labels)
            parts["ib"] = ib
            parts.update(ib_parts)
            if step >= self.ib_start:
                loss = loss + self.cfg.ib_weight * ib
            self._ib_batch = (s_feat.detach(), t_feat.detach(), labels)
            if update_ib:
                self.apply_ib_update()
        parts["loss"] = loss
        return parts

    def set_train_mode(self) -> None:
        """Training mode for what is trained: with ``--train mask`` the base model stays in eval
        mode, so BatchNorm statistics (MobileViT) and dropout outside ``ltm_*`` do not change."""
        if self.cfg.train == "mask":
            self.model.eval()
            for name, module in self.model.named_modules():
                if is_ltm_name(name):
                    module.train()
        else:
            self.model.train()
        if self.cfg.training_merge == "hard":
            merge_hard(self.model)

    def apply_ib_update(self) -> None:
        batch, self._ib_batch = getattr(self, "_ib_batch", None), None
        if batch is not None and self.ib is not None:
            self.ib.update(*batch)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step. A checkpoint that is due is written here, after this step's loss
        came out finite and before the weights change: a checkpoint only ever holds weights
        that produced a finite loss."""
        self.set_train_mode()
        rng = ckpt.rng_state() if self.save_due else None  # the state this step starts from
        parts = self.losses(images, labels, update_ib=False)
        loss = parts["loss"]
        if D.any_flag(not bool(torch.isfinite(loss.detach())), self.dist.device):
            if self.save_due and self._weights_gave_finite_loss():
                self.save(rng)  # the batch was bad, not the weights: they are the last good checkpoint
            raise self._nan_error("loss")
        if not loss.requires_grad:
            raise LtmError(f"nothing that --train {self.cfg.train} trains changes the loss (no merge reaches the "
                           "output: none happens, or only where the head does not read, e.g. in the last block of a "
                           "class-token model; or --freeze holds what would train); fine-tune with --train all, or "
                           "convert so that earlier blocks merge (a lower ratio)")
        if self.save_due:
            self.save(rng)
            self.save_due = False
        self._last_batch = (images, labels)
        self.apply_ib_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not self.scaler.is_enabled() and D.any_flag(not bool(torch.isfinite(norm)), self.dist.device):
            raise self._nan_error("gradient")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if D.any_flag(not all(bool(torch.isfinite(p).all()) for p in params), self.dist.device):
            raise self._nan_error("weights")
        if self.ema is not None:
            self.ema.update(self.student)
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["grad_norm"] = float(norm)
        return out

    def _weights_gave_finite_loss(self) -> bool:
        """Whether the current weights give a finite loss on the previous batch (which gave one before
        the last step): tells a NaN from bad data from a NaN from diverged weights."""
        batch = getattr(self, "_last_batch", None)
        if batch is None:
            return False
        with torch.no_grad():
            loss = self.losses(*batch, update_ib=False)["loss"]
        self._ib_batch = None
        return not D.any_flag(not bool(torch.isfinite(loss)), self.dist.device)

    def _nan_error(self, what: str) -> TrainingDiverged:
        """One line: where it diverged, what was kept, and whether ``--resume`` with lower rates can help.
        A NaN loss or gradient of the step that starts at the checkpoint does not depend on the learning
        rate: resuming would compute it again, so only a new run with lower rates takes another path."""
        step = self.state.global_step + 1
        head = f"the {what} became NaN/inf at step {step} (epoch {self.state.epoch + 1}); training stopped"
        fix = "lower --lr/--mask-lr or turn off --amp"
        if not self.ckpt_path.is_file():
            return TrainingDiverged(f"{head}; no checkpoint was written yet: {fix} and start again")
        where = f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step})"
        if self.saved_step == self.state.global_step and what in ("loss", "gradient"):
            return TrainingDiverged(f"{head}; {where}, where this step starts, so --resume would repeat it and fail "
                                    f"again whatever the rates: {fix} and start a new run (without --resume, or "
                                    "another --workdir)")
        return TrainingDiverged(f"{head}; {where}: {fix} and --resume (the steps after {self.saved_step} are redone "
                                "at the new rates), or start a new run")

    # -- eval -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Validate ``model`` (the student by default) against the teacher (validation.validate)."""
        model = model or self.student
        tap = self.tap_s if model is self.student else FeatureTap(model)
        ds = shard(self.data.val, self.dist.rank, self.dist.world)
        loader = DataLoader(ds, batch_size=max(1, self.per_rank), shuffle=False, num_workers=self.cfg.num_workers)
        return validate(model, tap, self.teacher, self.tap_t, loader, device=self.dist.device, autocast=self._autocast,
                        logits=self.logits, use_ce=self.use_ce, temperature=self.cfg.temperature)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, on_step: Callable[["Trainer", dict], None] | None = None) -> list[dict[str, Any]]:
        cfg, st = self.cfg, self.state
        if cfg.eval_before and st.global_step == 0:
            result = self.evaluate()
            self._log({"type": "eval", "epoch": 0, "step": 0, "when": "before", **result})
            self._consider_best(result)
        if cfg.fit_keep and st.global_step == 0:
            self.run_keep_fit(result if cfg.eval_before else None)
        n_epochs = int(math.ceil(self.total_steps / self.steps_per_epoch))
        progress = self._progress()
        task = progress.add_task("finetune", total=self.total_steps, completed=st.global_step) if progress else None
        t0, seen = time.perf_counter(), 0
        try:
            while st.global_step < self.total_steps and st.epoch < n_epochs:
                self.sampler.set_position(st.epoch, st.step_in_epoch)
                if hasattr(self.data, "set_epoch"):
                    self.data.set_epoch(st.epoch)
                loader = DataLoader(self.data.train, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                                    num_workers=cfg.num_workers)
                for images, labels in loader:
                    if st.global_step >= self.total_steps:
                        break
                    images, labels = images.to(self.dist.device), labels.to(self.dist.device)
                    rec = self.train_step(images, labels)
                    st.global_step += 1
                    st.step_in_epoch += 1
                    seen += images.shape[0] * self.dist.world
                    rate = seen / max(1e-9, time.perf_counter() - t0)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if progress:
                        progress.update(task, advance=1, description=f"ep {st.epoch + 1}/{n_epochs} loss {rec['loss']:.4f} "
                                        f"lr {lr:.2e} {rate:.1f} img/s")
                    if st.global_step % max(1, cfg.log_every) == 0 or st.global_step == 1:
                        self._log({"type": "train", "epoch": st.epoch + 1, "step": st.global_step, "lr": lr,
                                   "img_s": rate, **rec})
                    if on_step is not None:
                        on_step(self, rec)
                    if cfg.save_every and st.global_step % cfg.save_every == 0:
                        self.save_due = True  # written by the next step once its loss is finite
                finished_epoch = st.step_in_epoch >= self.steps_per_epoch
                if finished_epoch:
                    st.epoch += 1
                    st.step_in_epoch = 0
                result = self.evaluate(self.ema.model if self.ema else None)
                self._log({"type": "eval", "epoch": st.epoch if finished_epoch else st.epoch + 1,
                           "step": st.global_step, "when": "epoch_end" if finished_epoch else "stop", **result})
                if not math.isfinite(result["kd"]):
                    raise self._nan_error("evaluation loss")
                self._consider_best(result)
                self.save_due = False
                self.save()
                self._report_skipped()
        finally:
            if progress:
                progress.stop()
        return st.history

    def run_keep_fit(self, before: dict[str, Any] | None) -> None:
        """Fit the LTM keep terms on ``fit_keep`` training views (keep_fit.py), all processes'
        statistics summed; undone when validation agrees less than ``before`` (with no ``before``,
        ``eval_before`` off, it is kept unchecked)."""
        from torch.utils.data import Subset

        from ltm_convert.finetune.keep_fit import fit_keep_terms, keep_terms, set_keep_terms

        ds = shard(self.data.train, self.dist.rank, self.dist.world)
        n = max(1, math.ceil(self.cfg.fit_keep / self.dist.world))
        # a seeded random order (folders list their images class by class); past the end of the data,
        # the images again with the crops of an epoch that training never uses
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.cfg.seed + KEEP_FIT_SEED))

        def views():
            try:
                for start in range(0, n, len(ds)):
                    if hasattr(self.data, "set_epoch"):
                        self.data.set_epoch(KEEP_FIT_EPOCH + start // len(ds))
                    part = Subset(ds, order[:min(len(ds), n - start)].tolist())
                    for images, _ in DataLoader(part, batch_size=min(32, max(1, self.per_rank)), shuffle=False,
                                                num_workers=self.cfg.num_workers):
                        yield images.to(self.dist.device)
            finally:
                if hasattr(self.data, "set_epoch"):
                    self.data.set_epoch(self.state.epoch)

        saved = keep_terms(self.student)
        report = fit_keep_terms(self.student, views(), seed=self.cfg.seed, reduce=D.all_reduce_sum)
        record: dict[str, Any] = {"type": "keep_fit", "step": 0, "images": n * self.dist.world,
                                  "seconds": report["seconds"], "r2": {k: v["r2"] for k, v in report["blocks"].items()}}
        if before is not None:
            result = self.evaluate()
            self._log({"type": "eval", "epoch": 0, "step": 0, "when": "keep_fit", **result})
            record["kept"] = not validates_better(before, result)
            if record["kept"]:
                self._consider_best(result)
            else:
                set_keep_terms(self.student, saved)
        if self.ema is not None:  # no steps yet: the average starts from the weights training starts from
            self.ema = Ema(self.student, self.cfg.ema)
        self._log(record)
        if self.dist.main:
            what = "" if before is None else (" kept" if record["kept"] else " undone: validation agreed less")
            print(f"keep terms fitted on {record['images']} images in {report['seconds']:.0f} s{what}", flush=True)

    def _report_skipped(self) -> None:
        """Images that could not be read are skipped, never silently: counted at every epoch end."""
        early, late = self.data.skipped, self.data.late_failures()
        if (early or late) and self.dist.main:
            self._log({"type": "data", "step": self.state.global_step, "skipped_images": early + late,
                       "unreadable_at_scan": early, "unreadable_while_training": late})
            print(f"skipped {early + late} unreadable image(s) so far ({early} found when the data was indexed, "
                  f"{late} while training; each was replaced by the next readable one)", flush=True)

    def _progress(self):
        return progress_bar(self.cfg.progress and self.dist.main)

    def _consider_best(self, result: dict[str, Any]) -> None:
        """Keep the weights of the best validation so far (higher agreement, then lower KD loss); a
        tie goes to the later weights: they are what the user trained for, and nothing says worse."""
        if not self.cfg.keep_best or not math.isfinite(result["kd"]):
            return
        best = self.best
        if best is not None and validates_better(best, result):
            return
        self.best = {"step": self.state.global_step, "agreement": result["agreement"], "kd": result["kd"]}
        ckpt.save_best(self)

    def final_model(self) -> nn.Module:
        """The model the run hands back: with ``keep_best``, the best validated weights."""
        model = self.ema.model if self.ema else self.student
        if self.best is None or self.best["step"] == self.state.global_step:
            return model
        ckpt.load_best(self, model)
        last = next((r for r in reversed(self.state.history) if r.get("type") == "eval"), None)
        self._log({"type": "best", "step": self.state.global_step, "best_step": self.best["step"],
                   "agreement": self.best["agreement"], "last_agreement": last["agreement"] if last else None})
        if self.dist.main:
            print(f"keeping the weights of step {self.best['step']} (validation agreement {self.best['agreement']:.4f}; "
                  f"the last step's was {last['agreement'] if last else float('nan'):.4f}); --no-keep-best keeps the last",
                  flush=True)
        return model

    def best_model(self) -> nn.Module | None:
        """The model holding the best validated weights so far, read back from their file (the live
        weights may be NaN after a divergence); None when none were kept."""
        if self.best is None or not self.best_path.is_file():
            return None
        model = self.ema.model if self.ema else self.student
        ckpt.load_best(self, model)
        return model

    def close(self) -> None:
        D.teardown(self.dist)
