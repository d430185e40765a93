"""Training checkpoints: plain tensors / dicts written atomically, read with weights_only=True.

Holds everything exact resumption needs: model, optimizer, scheduler, grad scaler, EMA, IB state,
RNG states (torch CPU/CUDA as tensors, python and numpy as tensors + JSON), and the data position
(epoch, step in epoch, global step). A fingerprint of the model (parameter names and shapes plus
the LTM schedule) guards against resuming another model's run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ltm_convert.errors import LtmError

FORMAT = 1


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    config = getattr(model, "ltm_config", None)
    keep = getattr(config, "keep", None)
    if keep:
        h.update(json.dumps(keep, sort_keys=True).encode())
    return h.hexdigest()[:32]


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_meta": json.dumps([py[0], py[2]]),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, gauss = json.loads(state["python_meta"])
    random.setstate((version, tuple(int(v) for v in state["python_state"].tolist()), gauss))
    name, pos, has_gauss, cached = json.loads(state["numpy_meta"])
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Written beside ``path``, fsynced, then renamed over it (safe_write: the temp files of a killed
    run are removed by the next save)."""
    from ltm_convert.safe_write import replace_atomically

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())

    replace_atomically(Path(path), write)


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    data = read_checkpoint(path)
    check_fingerprint(data, model, path)
    return data


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents, read weights-only (no model needed yet)."""
    from ltm_convert.sources.checkpoints import load_weights_only

    path = Path(path)
    if not path.is_file():
        raise LtmError(f"no checkpoint at {path}; start without --resume")
    data = load_weights_only(path, what="training checkpoint")
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise LtmError(f"{path} is not an ltm_convert training checkpoint")
    return data


def check_fingerprint(data: dict[str, Any], model: nn.Module, path: Path) -> None:
    if data.get("fingerprint") != fingerprint(model):
        raise LtmError(f"{path} was written for another model (its parameters or token schedule differ); "
                       "resume with the model it was trained from, or start a new run")


# --------------------------------------------------------------------------------------------
# a trainer's run


def saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """The options a checkpoint's run was started with ({} when it holds none readable)."""
    try:
        saved = json.loads(data.get("config") or "{}")
    except (TypeError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load_training_state(data: dict[str, Any], model: nn.Module, optimizer: Any, scaler: Any) -> None:
    """Put a checkpoint's weights, optimiser state and grad-scaler state back."""
    model.load_state_dict(data["model"])
    try:
        optimizer.load_state_dict(data["optimizer"])
    except (ValueError, KeyError) as exc:
        raise LtmError(f"--resume: the checkpoint's optimiser state does not fit this run ({exc}); start a new run") from None
    scaler.load_state_dict(data["scaler"])


def check_same(saved: dict[str, Any], current: dict[str, Any], flag: Any = None) -> None:
    """Refuse to resume with another value of an option that decides what the run computes
    (``saved``: the checkpoint's config; ``flag`` names an option as on the command line)."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    for key, new in current.items():
        old = saved.get(key)
        if key in saved and plain(old) != plain(new):
            name = flag(key) if flag is not None else "--" + key.replace("_", "-")
            raise LtmError(f"--resume: the checkpoint was trained with {name} {old}, this run asks for {new}; resume "
                           "with the same value, or start a new run (another --workdir)")


def truncate_log(path: Path, step: int) -> None:
    """Drop the JSON-lines log records written after the checkpoint of ``step`` (they are redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))



def save_run(trainer: Any, rng: dict[str, Any] | None = None) -> None:
    """Write everything the next step reads; ``rng`` is the RNG state that step starts from
    (taken before its forward when the save happens inside a step)."""
    import json
    from dataclasses import asdict

    st = trainer.state
    if trainer.dist.main:
        save_checkpoint(trainer.ckpt_path, {
            "fingerprint": fingerprint(trainer.student),
            "model": trainer.student.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "ema": trainer.ema.model.state_dict() if trainer.ema else None,
            "ib": trainer.ib.state_dict() if trainer.ib is not None else None,
            "rng": rng if rng is not None else rng_state(),
            "position": {"epoch": st.epoch, "step_in_epoch": st.step_in_epoch, "global_step": st.global_step},
            "best": json.dumps(trainer.best),
            "config": json.dumps(asdict(trainer.cfg)),
        })
    trainer.saved_step = st.global_step
    from ltm_convert.finetune import distributed as D

    D.barrier()


# options that change what is optimised, not how: a run resumed with other values would not be
# the same run, so they must match; everything else (learning rates, schedule, losses) may change
_FIXED = ("train", "batch_size", "seed", "freeze", "amp", "training_merge")


def resume_run(trainer: Any, path: Path) -> bool:
    import json
    import warnings

    from ltm_convert.finetune import distributed as D

    data = load_checkpoint(path, trainer.student)
    saved_cfg = saved_config(data)
    check_same(saved_cfg, {key: getattr(trainer.cfg, key) for key in _FIXED})
    load_training_state(data, trainer.student, trainer.optimizer, trainer.scaler)
    trainer.scheduler.load_state_dict(data["scheduler"])
    changed = _take_new_rates(trainer, saved_cfg)
    if changed and trainer.dist.main:
        warnings.warn("--resume takes this run's optimisation flags: " + ", ".join(changed), UserWarning, stacklevel=3)
    if trainer.ema is not None and data.get("ema") is not None:
        trainer.ema.model.load_state_dict(data["ema"])
    if trainer.ib is not None and data.get("ib") is not None:
        trainer.ib.load_state_dict(data["ib"])
    set_rng_state(data["rng"])
    pos = data["position"]
    st = trainer.state
    st.epoch, st.step_in_epoch, st.global_step = int(pos["epoch"]), int(pos["step_in_epoch"]), int(pos["global_step"])
    trainer.saved_step = st.global_step
    trainer.best = _resumed_best(trainer, data)
    if trainer.dist.main:
        truncate_log(trainer.log_path, st.global_step)
    D.barrier()
    return True


def save_best(trainer: Any) -> None:
    """Write the best validated weights (those ``final_model`` returns) next to the run checkpoint."""
    from ltm_convert.finetune import distributed as D

    if trainer.dist.main:
        model = trainer.ema.model if trainer.ema else trainer.student
        save_checkpoint(trainer.best_path, {"fingerprint": fingerprint(trainer.student), "model": model.state_dict(),
                                            "best": json.dumps(trainer.best)})
    D.barrier()


def load_best(trainer: Any, model: nn.Module) -> None:
    data = load_checkpoint(trainer.best_path, trainer.student)
    if json.loads(data.get("best") or "null") != trainer.best:
        raise LtmError(f"{trainer.best_path} holds other weights than the run's best (step {trainer.best['step']}); "
                       "it was overwritten by another run in the same --workdir: rerun with --no-keep-best or a new --workdir")
    model.load_state_dict(data["model"])


def _resumed_best(trainer: Any, data: dict[str, Any]) -> dict[str, Any] | None:
    """The resumed run's best so far; forgotten (with a warning) if its weights file is gone."""
    import warnings

    best = json.loads(data.get("best") or "null") if isinstance(data.get("best"), str) else None
    if best is not None and not trainer.best_path.is_file():
        if trainer.dist.main:
            warnings.warn(f"--resume: the best weights so far ({trainer.best_path}, step {best['step']}) are gone; "
                          "the best is tracked from here on", UserWarning, stacklevel=3)
        return None
    return best


def _take_new_rates(trainer: Any, saved: dict[str, Any]) -> list[str]:
    """Learning rates and weight decay come from this run's flags, not from the checkpoint (whose
    optimiser state would otherwise bring the old ones back); returns what changed."""
    changed = []
    for key in ("lr", "mask_lr", "weight_decay", "warmup", "epochs", "clip_grad", "ib_weight", "temperature"):
        if key in saved and saved[key] != getattr(trainer.cfg, key):
            changed.append(f"--{key.replace('_', '-')} {saved[key]} -> {getattr(trainer.cfg, key)}")
    rate = {"ltm": trainer.cfg.mask_lr, "decay": trainer.cfg.lr, "no_decay": trainer.cfg.lr}
    decay = {"ltm": 0.0, "decay": trainer.cfg.weight_decay, "no_decay": 0.0}
    base = []
    for group in trainer.optimizer.param_groups:
        name = group.get("name", "ltm")
        group["initial_lr"] = rate.get(name, group.get("initial_lr", group["lr"]))
        group["weight_decay"] = decay.get(name, group["weight_decay"])
        base.append(group["initial_lr"])
    trainer.scheduler.base_lrs = base
    step = trainer.scheduler.last_epoch
    for group, lam, b in zip(trainer.optimizer.param_groups, trainer.scheduler.lr_lambdas, base):
        group["lr"] = b * lam(step)
    return changed
