"""Small random-weight models of every supported family, for structure tests (fast on 2 cores)."""
from __future__ import annotations

import torch
from torch import nn

TIMM_FAMILIES = {
    # id: (timm name, kwargs)
    "vit-token": ("vit_small_patch16_224", dict(depth=3, img_size=96)),
    "vit-avg": ("vit_small_patch16_224", dict(depth=3, img_size=96, global_pool="avg", class_token=False)),
    "vit-avg-cls": ("vit_small_patch16_224", dict(depth=3, img_size=96, global_pool="avg", fc_norm=True)),
    "vit-qknorm": ("vit_small_patch16_224", dict(depth=3, img_size=96, qk_norm=True)),
    "siglip-map": ("vit_base_patch16_siglip_224", dict(depth=2, img_size=96, embed_dim=192, num_heads=3)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(depth=3, img_size=96)),
    "deit3-layerscale": ("deit3_small_patch16_224", dict(depth=3, img_size=96)),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=98)),
    "dinov2": ("vit_small_patch14_dinov2", dict(depth=3, img_size=98)),
}

HF_FAMILIES = ["ViTModel", "ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
               "Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
               "CLIPVisionModel", "SiglipVisionModel"]

# rotary-position models (rewriters/rotary.py), built small by tests/test_rotary.py
ROTARY_TIMM = {
    "dinov3": ("vit_small_patch16_dinov3", {}),  # 4 registers, average pool, dynamic_img_size, centred coords
    "dinov3-token-noreg": ("vit_small_patch16_dinov3", dict(num_reg_tokens=0, global_pool="token")),
    "eva02": ("eva02_small_patch14_224", dict(img_size=84)),  # absolute pos embed + rope on a ref grid
    "pe-core": ("vit_pe_core_tiny_patch16_384", {}),  # attention-pool head, 'xy' grid with offset
    "rope": ("vit_base_patch16_rope_224", {}),
    "rope-reg-abs": ("vit_base_patch16_rope_224", dict(num_reg_tokens=2, use_abs_pos_emb=True)),
    "rope-mixed": ("vit_base_patch16_rope_mixed_224", {}),  # learned frequencies per block and head
}
ROTARY_HF = ["DINOv3ViTModel"]

# class-attention models (rewriters/class_attention.py; tests/test_cait.py): 64 patch tokens, 2 class-attention blocks
CLASS_ATTENTION_TIMM = {"cait": ("cait_xxs24_224", dict(depth=2, img_size=64, patch_size=8))}

# models whose blocks run on unfolded 2-D patch grids (ltm_convert/grid.py)
GRID_TIMM = {"mobilevit-xxs": ("mobilevit_xxs", {}), "mobilevit-s": ("mobilevit_s", {})}
GRID_HF = ["MobileViTModel", "MobileViTForImageClassification"]


# models whose blocks merge inside their FFN on a 2-D grid (ltm_convert/ffn_grid.py); small depths
_SMALL_SWIN = dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))
FFN_GRID_TIMM = {
    "swin": ("swin_tiny_patch4_window7_224", _SMALL_SWIN),
    "swinv2": ("swinv2_tiny_window8_256", _SMALL_SWIN),
    "efficientvit-b1": ("efficientvit_b1", {}),
}
FFN_GRID_HF = ["SwinModel", "SwinForImageClassification", "Swinv2Model"]
FFN_GRID_SIZES = {"swinv2": 256}


def ffn_grid_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in FFN_GRID_TIMM:
        import timm

        name, kwargs = FFN_GRID_TIMM[kind]
        model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
        if kind == "swinv2":  # timm zero-initialises v2's post-norms: the branches would output 0
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith(("norm1.weight", "norm2.weight")):
                        p.fill_(1.0)
        return model
    import transformers as T

    extra = {"num_labels": 5} if "Classification" in kind else {}
    config_cls = T.Swinv2Config if kind.startswith("Swinv2") else T.SwinConfig
    config = config_cls(image_size=224, embed_dim=48, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4], **extra)
    return getattr(T, kind)(config).eval()


def grid_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in GRID_TIMM:
        import timm

        name, kwargs = GRID_TIMM[kind]
        return timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    import transformers as T

    extra = {"num_labels": 5} if "Classification" in kind else {}
    model = getattr(T, kind)(T.MobileViTConfig(image_size=256, **extra)).eval()
    with torch.no_grad():  # HF zero-initialises the classifier; give the logits something to show
        for n, p in model.named_parameters():
            if n.startswith("classifier"):
                p.normal_(0, 0.02)
    return model


def timm_model(family: str) -> nn.Module:
    import timm

    name, kwargs = TIMM_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    # random init leaves LayerScale near zero; make it matter so parity tests see it
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.uniform_(0.5, 1.5)
    return model


def hf_model(cls_name: str) -> nn.Module:
    import transformers as T

    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                 image_size=64, patch_size=8)
    config_cls = {
        "ViT": T.ViTConfig, "DeiT": T.DeiTConfig, "Dinov2W": T.Dinov2WithRegistersConfig,
        "Dinov2": T.Dinov2Config, "CLIP": T.CLIPVisionConfig, "Siglip": T.SiglipVisionConfig,
    }
    key = next(k for k in ("Dinov2W", "Dinov2", "DeiT", "ViT", "CLIP", "Siglip") if cls_name.startswith(k))
    extra = {"num_labels": 5} if "Classification" in cls_name else {}
    if key == "Dinov2W":
        extra["num_register_tokens"] = 4
    torch.manual_seed(0)
    model = getattr(T, cls_name)(config_cls[key](**small, **extra)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda1" in n:
                p.uniform_(0.5, 1.5)
    return model


def images_for(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from ltm_convert.model_inputs import default_input_size

    h, w = default_input_size(model)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def check_mask_finetune_step(student: nn.Module, size: int, tmp_path) -> None:
    """Three --train mask steps on random labelled images: the loss drops, every ltm_ parameter
    moves, and no other parameter or BatchNorm statistic changes."""
    from torch.utils.data import TensorDataset

    from ltm_convert.api import ltm_parameters
    from ltm_convert.finetune import FinetuneConfig, Trainer
    from ltm_convert.finetune.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, size, size, generator=g), torch.randint(0, 7, (8,), generator=g)
    data = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x[:4], y[:4]), classes=list("abcdefg"), skipped=0)
    cfg = FinetuneConfig(epochs=1, batch_size=4, progress=False, eval_before=False, save_every=1, log_every=1,
                         ib_warmup=0.0, ib_clusters=4, warmup=0.0, freeze=(), mask_lr=3e-3)
    tr = Trainer(student, data, cfg, tmp_path)
    before = {n: p.detach().clone() for n, p in ltm_parameters(student)}
    others = {n: p.detach().clone() for n, p in student.state_dict().items() if n not in before}
    tr.set_train_mode()
    loss0 = float(tr.losses(x[:4], y[:4], update_ib=False)["loss"].detach())
    for _ in range(3):
        tr.train_step(x[:4], y[:4])
    loss1 = float(tr.losses(x[:4], y[:4], update_ib=False)["loss"].detach())
    assert loss1 < loss0
    assert all(not torch.equal(before[n], p) for n, p in ltm_parameters(student)), "every ltm_ parameter moves"
    assert all(torch.equal(others[n], p) for n, p in student.state_dict().items() if n in others)


def check_batch_independence(run, converted: nn.Module, x: torch.Tensor) -> None:
    """Each image's output does not depend on the others in its batch (static per-image merges)."""
    with torch.no_grad():
        together = run(converted, x)
        alone = torch.cat([run(converted, x[i:i + 1]) for i in range(x.shape[0])])
    assert (together - alone).abs().max().item() < 1e-4


def check_ltm_gradients(run, converted: nn.Module, x: torch.Tensor) -> None:
    """A backward pass in train mode reaches every ltm_ parameter; the model's state is restored."""
    from ltm_convert.api import ltm_parameters

    state = {k: v.clone() for k, v in converted.state_dict().items()}  # train mode moves BatchNorm statistics
    converted.train()
    try:
        run(converted, x).square().mean().backward()
        params = ltm_parameters(converted)
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params), \
            [n for n, p in params if p.grad is None or p.grad.abs().sum() == 0]
    finally:
        converted.zero_grad(set_to_none=True)
        converted.eval()
        converted.load_state_dict(state)


def check_closest_reachable(model: nn.Module, ratio: float) -> float:
    """Convert to a ratio the grid may not reach: the error stays under 5%, and beyond 2% the
    user is warned with the ratio reached. Returns the FLOPs ratio reached."""
    import warnings

    from ltm_convert.api import convert, describe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, ratio)
    reached = describe(converted)["flops_ratio"]
    error = abs(reached - ratio) / ratio
    assert error < 0.05, reached
    assert (error > 0.02) == any("not reachable" in str(w.message) for w in caught)
    return reached


def check_grid_schedule(run, model: nn.Module, converted: nn.Module, x: torch.Tensor, ratio: float,
                        compare: bool = True) -> list[dict]:
    """FLOPs within 2% of ratio, every grid merged no further than its input and at least one
    merged, finite outputs of the original's shape (and, if compare, cosine > 0.5 to it)."""
    from ltm_convert.api import describe

    info = describe(converted)
    assert abs(info["flops_ratio"] - ratio) <= 0.02 * ratio, info["flops_ratio"]
    grids = info["grids"]
    assert all(g["tokens_out"] <= g["tokens_in"] for g in grids) and any(g["tokens_out"] < g["tokens_in"] for g in grids)
    with torch.no_grad():
        out, ref = run(converted, x), run(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if compare:
        assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.5
    return grids


def check_save_load(converted: nn.Module, path, x: torch.Tensor, inspect_shows: str | None = None) -> None:
    """save() then load() gives bit-identical outputs and the same grid schedule; with
    inspect_shows, the real CLI's ``inspect`` of the file prints the patch grids including it."""
    import os
    import subprocess
    import sys

    from ltm_convert.api import describe
    from ltm_convert.io import load, save

    path = save(converted, path)
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))
    assert describe(loaded)["grids"] == describe(converted)["grids"]
    if inspect_shows is not None:
        done = subprocess.run([sys.executable, "-m", "ltm_convert.cli", "inspect", str(path)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        assert "patch grids" in done.stdout and inspect_shows in done.stdout, done.stdout
