"""Train a model from scratch with labels only, no teacher (``ltm-convert train``).

    from ltm_convert.finetune.scratch import ScratchConfig, train_from_scratch
    result = train_from_scratch("vit_tiny_patch16_224", "./images", ScratchConfig(epochs=30, ratio=0.8), "runs/ltm")
    result.metrics["final"]["val_top1"], result.model

The LTM paper's own experiment: a merged model trained from scratch against the unmerged one with
the same recipe. Here the recipe is timm's training pieces with the paper repository's settings as
defaults (scratch_config.py); the data pipeline is timm's (scratch_data.py); the model is converted
at the config's ratio and method, or left unconverted with ratio 1.0 (scratch_model.py). One
process, or ``torchrun --nproc_per_node N`` (DistributedDataParallel). Checkpoints hold every piece
of state the next step reads, so a resumed run reaches the same weights as one that never stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ltm_convert.errors import LtmError, TrainingDiverged
from ltm_convert.finetune import checkpoint as ckpt
from ltm_convert.finetune import distributed as D
from ltm_convert.finetune.data import ResumableSampler, shard
from ltm_convert.finetune.loop import finite_json, progress_bar
from ltm_convert.finetune.optim import amp_settings, merge_hard
from ltm_convert.finetune.scratch_config import FIXED_ON_RESUME, ScratchConfig, check_new_run, flag
from ltm_convert.finetune.scratch_data import ScratchData, Transformed, mixup_and_loss, resolve_data, transforms
from ltm_convert.finetune.scratch_model import BuiltModel, build, saveable

__all__ = ["ScratchConfig", "ScratchResult", "ScratchTrainer", "train_from_scratch"]

LOADER_SEED = 104_729  # the DataLoaders' own generators: the global RNGs are never drawn from for data


@dataclass
class ScratchResult:
    model: nn.Module  # the trained weights (a converted model, or the original for ratio 1.0)
    ema_model: nn.Module | None  # the EMA of the weights (None with model_ema off)
    metrics: dict[str, Any]  # what metrics.json holds: per-epoch loss, top-1 (model and EMA), images/s, times
    workdir: Path  # checkpoint.pt, log.jsonl, metrics.json
    output: Path | None  # the saved model (ltm_convert.save), if one was written
    ema_output: Path | None = None


def train_from_scratch(model: Any, data: Any, config: ScratchConfig | None = None,
                       out_dir: str | os.PathLike | None = None, *, output: str | os.PathLike | None = None,
                       ema_output: str | os.PathLike | None = None, resume: bool = False,
                       **options: Any) -> ScratchResult:
    """Train ``model`` on ``data`` with labels only and return a :class:`ScratchResult`.

    ``model``: a timm name, ``hf:...``, ``bundled``, a file saved by ``ltm-convert convert``, or an
    nn.Module (trained in place). Random weights unless ``config.pretrained``; converted at
    ``config.ratio`` with ``config.method``, or the unconverted original with ratio 1.0 / ``original``.
    ``data``: an image folder with train/<class>/ and val/<class>/, 'fashion-mnist', a (train, val)
    pair of torch Datasets of (PIL image or ready tensor, label), or a mapping with 'train' and 'val'.
    ``out_dir``: checkpoint.pt, log.jsonl and metrics.json (default ``<output>.run``, else ./ltm_train);
    ``output`` / ``ema_output``: where ``ltm_convert.save`` writes the trained weights / their EMA.
    ``resume``: continue the run in ``out_dir`` exactly. ``options`` set fields of the config.
    """
    cfg = _config(config, options)
    if out_dir is None:
        out_dir = Path(f"{output}.run") if output is not None else Path("ltm_train")
    workdir = Path(out_dir)
    from ltm_convert.safe_write import check_writable

    for path in (output, ema_output):
        if path is not None:
            check_writable(Path(path))
    check_writable(workdir, replace=False)
    check_new_run(workdir, resume)
    from ltm_convert.device import pick_device

    pick_device(cfg.device)  # a device this machine does not have: refused before any work
    saved = read_run(workdir / "checkpoint.pt", cfg) if resume else None  # a mismatch: refused before the build
    bundle = resolve_data(data, cfg.train_samples, cfg.val_samples, cfg.seed)
    if cfg.num_classes is not None and cfg.num_classes < bundle.num_classes:
        raise LtmError(f"--num-classes {cfg.num_classes} is fewer than the data's {bundle.num_classes} classes; leave it "
                       "out to use the data's")
    built = build(model, cfg, bundle.num_classes)
    trainer = ScratchTrainer(built, bundle, cfg, workdir)
    try:
        if saved is not None:
            trainer.resume(saved)
        trainer.fit()
        result = ScratchResult(model=trainer.student, ema_model=trainer.ema.module if trainer.ema else None,
                               metrics={}, workdir=workdir, output=None)
        if trainer.dist.main:
            from ltm_convert.api import describe
            from ltm_convert.io import save

            final = saveable(result.model, built)
            info = describe(final)
            trainer.extra["flops"] = {"original": info["flops_original"], "model": info["flops_converted"],
                                      "ratio": info["flops_ratio"]}
            trainer.write_metrics()
            if output is not None:
                result.output = save(final, output)
            if ema_output is not None and result.ema_model is not None:
                result.ema_output = save(saveable(result.ema_model, built), ema_output)
        result.metrics = trainer.metrics()
        return result
    finally:
        trainer.close()


def _config(config: ScratchConfig | None, options: dict[str, Any]) -> ScratchConfig:
    import dataclasses

    if config is not None and not isinstance(config, ScratchConfig):
        raise LtmError(f"config must be a ScratchConfig, got {type(config).__name__}")
    cfg = dataclasses.replace(config, model_kwargs=dict(config.model_kwargs)) if config else ScratchConfig()
    for key, value in options.items():
        if not hasattr(cfg, key):
            raise LtmError(f"unknown training option {key!r}; see ltm_convert.finetune.scratch_config.ScratchConfig")
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (timm's ``random_seed``): a run is a function of its seed."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_run(path: Path, cfg: ScratchConfig) -> dict[str, Any]:
    """A run's checkpoint, refused when this run asks for other values of the options that decide what
    it computes (another batch size, recipe or model); a new --epochs stretches the schedule, with a warning."""
    data = ckpt.read_checkpoint(path)
    saved = ckpt.saved_config(data)
    now = cfg.to_json()
    ckpt.check_same(saved, {key: now[key] for key in FIXED_ON_RESUME}, flag)
    if "epochs" in saved and saved["epochs"] != cfg.epochs and int(os.environ.get("RANK", "0")) == 0:
        warnings.warn(f"--resume with --epochs {cfg.epochs} (the run had {saved['epochs']}): the learning-rate "
                      "schedule is stretched to the new length from here on", UserWarning, stacklevel=3)
    return data


@dataclass
class ScratchState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    images: int = 0  # training images seen, over every process
    train_seconds: float = 0.0  # the training loops' wall time (data and steps; no validation)
    wall_seconds: float = 0.0  # everything: training, validation, checkpoints
    # the current epoch so far: summed loss, steps, images, training seconds
    epoch_sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "steps": 0, "images": 0, "seconds": 0.0})
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    last_eval: dict[str, Any] | None = None
    stopped: str = ""


class ScratchTrainer:
    def __init__(self, built: BuiltModel, data: ScratchData, cfg: ScratchConfig, workdir: Path) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from ltm_convert.images import normalisation

        self.cfg, self.built, self.data, self.workdir = cfg, built, data, Path(workdir)
        self.dist = D.setup(cfg.device)
        dev = self.dist.device
        seed_everything(cfg.seed + self.dist.rank)  # Mixup (numpy) and dropout (torch) differ per process, as in timm
        self.student = built.model.to(dev)
        self.num_classes = cfg.num_classes or data.num_classes
        mean, std = normalisation(self.student)
        crop_pct = (getattr(self.student, "pretrained_cfg", None) or {}).get("crop_pct")
        train_tf, val_tf = transforms(cfg, built.input_size, mean, std, crop_pct)
        self.train_ds = Transformed(data.train, train_tf, seed=cfg.seed)
        self.val_ds = Transformed(data.val, val_tf)
        if cfg.batch_size % self.dist.world:
            raise LtmError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({self.dist.world})")
        self.per_rank = cfg.batch_size // self.dist.world
        if cfg.mixup_active() and self.per_rank % 2:
            raise LtmError(f"Mixup / CutMix pair the images of each process's batch: --batch-size {cfg.batch_size} over "
                           f"{self.dist.world} processes gives {self.per_rank}; make it even per process")
        self.sampler = ResumableSampler(self.train_ds, num_replicas=self.dist.world, rank=self.dist.rank, seed=cfg.seed,
                                        batch_size=self.per_rank)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise LtmError(f"{len(self.train_ds)} training images give no full batch of {cfg.batch_size}; lower --batch-size")
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer = create_optimizer_v2(self.student, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="cosine", num_epochs=cfg.epochs,
                                                warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                                min_lr=cfg.min_lr, step_on_epochs=False,
                                                updates_per_epoch=self.steps_per_epoch)
        self.amp, self.amp_dtype = amp_settings(cfg, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=cfg.ema_decay)
        self.mixup, self.loss_fn = mixup_and_loss(cfg, self.num_classes)
        self.model: nn.Module = self.student
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
        self.state = ScratchState()
        self.ckpt_path = self.workdir / "checkpoint.pt"
        self.log_path = self.workdir / "log.jsonl"
        self.metrics_path = self.workdir / "metrics.json"
        self.extra: dict[str, Any] = {}  # added to the metrics (the FLOPs, once training is done)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, rng: dict[str, Any] | None = None) -> None:
        """Checkpoint the run at the current step boundary; ``rng``: the RNG state the next step starts
        from (taken before validation ran). Weights that are not finite are never checkpointed."""
        if not all(bool(torch.isfinite(p).all()) for p in self.student.parameters()):
            raise self._diverged("weights", self.state.global_step)
        if self.dist.main:
            st = self.state
            ckpt.save_checkpoint(self.ckpt_path, {
                "fingerprint": ckpt.fingerprint(self.student),
                "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None,
                "rng": rng if rng is not None else ckpt.rng_state(),
                "position": {"epoch": st.epoch, "step_in_epoch": st.step_in_epoch, "global_step": st.global_step},
                "progress": json.dumps(finite_json({k: v for k, v in vars(st).items()
                                                    if k not in ("epoch", "step_in_epoch", "global_step")})),
                "config": json.dumps(self.cfg.to_json()),
            })
        D.barrier()

    def resume(self, data: dict[str, Any] | None = None) -> None:
        """Continue exactly from this run's checkpoint (``data``: as :func:`read_run` read it)."""
        data = data if data is not None else read_run(self.ckpt_path, self.cfg)
        ckpt.check_fingerprint(data, self.student, self.ckpt_path)
        ckpt.load_training_state(data, self.student, self.optimizer, self.scaler)
        if self.ema is not None and data.get("ema") is not None:
            self.ema.module.load_state_dict(data["ema"])
        ckpt.set_rng_state(data["rng"])
        st = self.state
        pos = data["position"]
        st.epoch, st.step_in_epoch, st.global_step = int(pos["epoch"]), int(pos["step_in_epoch"]), int(pos["global_step"])
        for key, value in json.loads(data.get("progress") or "{}").items():
            if hasattr(st, key):
                setattr(st, key, value)
        st.stopped = ""
        if self.dist.main:
            ckpt.truncate_log(self.log_path, st.global_step)
        D.barrier()

    # -- steps ----------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        from ltm_convert.model_inputs import call_kwargs, main_output

        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        args, kwargs = call_kwargs(inner, images)
        return main_output(model(*args, **kwargs))

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step on a batch: Mixup / CutMix, the loss, the update, the EMA."""
        self.model.train()
        if self.cfg.training_merge == "hard":
            merge_hard(self.model)
        self.scheduler.step_update(self.state.global_step)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with self._autocast():
            out = self._forward(self.model, images)
        loss = self.loss_fn(out.float(), targets)
        if D.any_flag(not bool(torch.isfinite(loss.detach())), self.dist.device):
            raise self._diverged("loss", self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.student, step=self.state.global_step + 1)
        return float(loss.detach())

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        head = f"the {what} became NaN/inf at step {step} (epoch {self.state.epoch + 1}); training stopped"
        if not self.ckpt_path.is_file():
            return TrainingDiverged(f"{head}; no checkpoint was written yet: lower --lr, set --clip-grad or turn off "
                                    "--amp, and start again")
        return TrainingDiverged(f"{head}; the last good checkpoint is {self.ckpt_path}: start a new run with a lower "
                                "--lr, --clip-grad or without --amp (those must match on --resume)")

    # -- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 accuracy and cross-entropy of ``model`` on the validation images, over every process."""
        model.eval()
        ds = shard(self.val_ds, self.dist.rank, self.dist.world)
        loader = DataLoader(ds, batch_size=max(1, self.per_rank), shuffle=False, num_workers=self.cfg.workers,
                            generator=torch.Generator().manual_seed(LOADER_SEED))
        sums = torch.zeros(3, dtype=torch.float64)
        for images, labels in loader:
            images, labels = images.to(self.dist.device), labels.to(self.dist.device)
            with self._autocast():
                out = self._forward(model, images).float()
            loss = torch.nn.functional.cross_entropy(out, labels, reduction="sum")
            sums += torch.tensor([labels.numel(), float((out.argmax(-1) == labels).sum()), float(loss)],
                                 dtype=torch.float64)
        sums = D.all_reduce_sum(sums.to(self.dist.device)).cpu()
        n = max(1.0, float(sums[0]))
        return {"top1": float(sums[1]) / n, "loss": float(sums[2]) / n, "images": int(sums[0])}

    def _validate(self) -> dict[str, Any]:
        result = self.evaluate(self.student)
        record = {"step": self.state.global_step, "val_top1": result["top1"], "val_loss": result["loss"]}
        if self.ema is not None:
            ema = self.evaluate(self.ema.module)
            record.update(ema_val_top1=ema["top1"], ema_val_loss=ema["loss"])
        return record

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        progress = progress_bar(cfg.progress and self.dist.main)
        task = progress.add_task("train", total=self.total_steps, completed=st.global_step) if progress else None
        try:
            while not st.stopped:
                if st.global_step >= self.total_steps:
                    st.stopped = "epochs" if st.global_step >= cfg.epochs * self.steps_per_epoch else "max_steps"
                    break
                self._epoch(progress, task)
        finally:
            if progress:
                progress.stop()
        if st.last_eval is None or st.last_eval["step"] != st.global_step:  # e.g. resumed after the end
            st.last_eval = self._validate()
        self.write_metrics()
        return self.metrics()

    def _epoch(self, progress: Any, task: Any) -> None:
        cfg, st, sums = self.cfg, self.state, self.state.epoch_sums
        wall0 = time.perf_counter()
        self.sampler.set_position(st.epoch, st.step_in_epoch)
        self.train_ds.epoch = st.epoch
        loader = DataLoader(self.train_ds, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                            num_workers=cfg.workers, generator=torch.Generator().manual_seed(LOADER_SEED + st.epoch))
        t0 = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(self.dist.device), labels.to(self.dist.device)
            loss = self.train_step(images, labels)
            st.global_step += 1
            st.step_in_epoch += 1
            now = time.perf_counter()
            sums["seconds"] += now - t0
            st.train_seconds += now - t0
            t0 = now
            sums["loss"] += loss
            sums["steps"] += 1
            sums["images"] += images.shape[0] * self.dist.world
            st.images += images.shape[0] * self.dist.world
            rate = sums["images"] / max(1e-9, sums["seconds"])
            if progress:
                progress.update(task, advance=1, description=f"ep {st.epoch + 1}/{cfg.epochs} loss {loss:.4f} {rate:.1f} img/s")
            if st.global_step % cfg.log_every == 0 or st.global_step == 1:
                self._log({"type": "train", "epoch": st.epoch + 1, "step": st.global_step, "loss": loss,
                           "lr": self.optimizer.param_groups[0]["lr"], "img_s": rate})
            st.stopped = self._stop_reason()
            if st.stopped or st.step_in_epoch >= self.steps_per_epoch:
                break
            if cfg.save_every and st.global_step % cfg.save_every == 0:
                st.wall_seconds += time.perf_counter() - wall0
                wall0 = time.perf_counter()
                self.save()
        rng = ckpt.rng_state()  # what the next step starts from: validation must not count
        finished = st.step_in_epoch >= self.steps_per_epoch
        st.last_eval = self._validate()
        st.wall_seconds += time.perf_counter() - wall0
        if finished:
            st.epochs.append(self._epoch_record())
            st.epoch += 1
            st.step_in_epoch = 0
            st.epoch_sums = {"loss": 0.0, "steps": 0, "images": 0, "seconds": 0.0}
            if st.global_step >= self.total_steps and not st.stopped:
                st.stopped = "epochs" if st.epoch >= cfg.epochs else "max_steps"
        self._log({"type": "eval", "epoch": st.epoch if finished else st.epoch + 1,
                   "when": "epoch_end" if finished else st.stopped, **st.last_eval})
        self.save(rng)
        self.write_metrics()
        if self.dist.main and finished:
            rec = st.epochs[-1]
            ema = f"  ema top-1 {rec['ema_val_top1']:.4f}" if "ema_val_top1" in rec else ""
            print(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}  val top-1 {rec['val_top1']:.4f}{ema}  "
                  f"{rec['img_s']:.1f} img/s", flush=True)

    def _stop_reason(self) -> str:
        st = self.state
        if self.cfg.time_budget is not None:
            spent = torch.tensor([st.train_seconds], dtype=torch.float64, device=self.dist.device)
            if float(D.all_reduce_sum(spent)) / self.dist.world >= self.cfg.time_budget:  # every rank stops together
                return "time_budget"
        if st.global_step >= self.total_steps and st.global_step < self.cfg.epochs * self.steps_per_epoch:
            return "max_steps"
        return ""

    def _epoch_record(self) -> dict[str, Any]:
        st, sums = self.state, self.state.epoch_sums
        return {"epoch": st.epoch + 1, "step": st.global_step, "train_loss": sums["loss"] / max(1, sums["steps"]),
                **{k: v for k, v in st.last_eval.items() if k != "step"},
                "img_s": sums["images"] / max(1e-9, sums["seconds"]), "epoch_train_seconds": sums["seconds"],
                "train_seconds": st.train_seconds, "wall_seconds": st.wall_seconds,
                "lr": self.optimizer.param_groups[0]["lr"]}

    # -- records ----------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

    def metrics(self) -> dict[str, Any]:
        """What metrics.json holds: the run, each finished epoch, and the last validation."""
        st, built = self.state, self.built
        last = st.last_eval or {}
        return finite_json({
            "model": built.name, "method": built.method, "ratio": built.ratio, "converted": built.method != "original",
            "input_size": list(built.input_size), "data": self.data.source, "num_classes": self.num_classes,
            "train_images": len(self.train_ds), "val_images": len(self.val_ds),
            "params": sum(p.numel() for p in self.student.parameters()), "world_size": self.dist.world,
            "steps_per_epoch": self.steps_per_epoch, "epochs": st.epochs,
            "final": {"epoch": st.epoch + (st.step_in_epoch > 0), "step": st.global_step, "stopped": st.stopped,
                      **{k: v for k, v in last.items() if k != "step"},
                      "train_seconds": st.train_seconds, "wall_seconds": st.wall_seconds,
                      "img_s": st.images / max(1e-9, st.train_seconds)},
            "config": self.cfg.to_json(), **self.extra,
        })

    def write_metrics(self) -> None:
        if not self.dist.main:
            return
        from ltm_convert.safe_write import replace_atomically

        text = json.dumps(self.metrics(), indent=2, allow_nan=False)
        replace_atomically(self.metrics_path, lambda tmp: Path(tmp).write_text(text))

    def close(self) -> None:
        D.teardown(self.dist)
