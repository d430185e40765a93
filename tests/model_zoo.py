"""Small random-weight models of every supported family, for structure tests (fast on 2 cores)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
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

# rotary-position models (rewriters/rotary.py), built small by rope_model (tests/test_rotary.py)
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
ROTARY_SMALL = dict(depth=3, img_size=96, embed_dim=64, num_heads=2, num_classes=5)

# relative-position-bias models (rewriters/relative_bias.py), built small by relb_model (tests/test_relative_bias.py)
RELB_TINY = dict(depth=3, img_size=96, embed_dim=96, num_heads=2, num_classes=7)
RELB_TIMM = {
    "beit": ("beit_base_patch16_224", {}),  # per-block tables, average pooling
    "beit-token": ("beit_base_patch16_224", dict(global_pool="token")),  # the crash of issue 23
    "beit-shared": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
    "beitv2": ("beitv2_base_patch16_224", {}),
    "relpos": ("vit_relpos_small_patch16_224", {}),  # RelPosMlp, no class token, average pooling
    "relpos-rpn": ("vit_relpos_small_patch16_rpn_224", {}),  # RelPosBias table, post-norm block
    "srelpos": ("vit_srelpos_small_patch16_224", {}),  # one table shared by all blocks
    "relpos-cls": ("vit_relpos_medium_patch16_cls_224", {}),  # class token, token pooling
    "relpos-clsgap": ("vit_relpos_base_patch16_clsgap_224", {}),  # class token, average pooling
}
RELB_HF = ["BeitModel", "BeitModel-cls", "Data2VecVisionModel", "Data2VecVisionModel-cls", "BeitForImageClassification"]

# class-attention models (rewriters/class_attention.py; tests/test_cait.py): 64 patch tokens, 2 class-attention blocks
CLASS_ATTENTION_TIMM = {"cait": ("cait_xxs24_224", dict(depth=2, img_size=64, patch_size=8))}

# NaFlex models (rewriters/naflex.py; tests/test_naflex.py): patches of 8 px (converted at 64 px: 64 patches),
# plain images and NaFlex batches
NAFLEX_SMALL = dict(depth=2, embed_dim=64, num_heads=2, patch_size=8, num_classes=5)
NAFLEX_TIMM = {"gap": ("naflexvit_base_patch16_gap", NAFLEX_SMALL),  # 4 registers, average pooling
               "par-gap": ("naflexvit_base_patch16_par_gap", NAFLEX_SMALL),  # aspect-preserving position embedding
               "siglip": ("naflexvit_base_patch16_siglip", NAFLEX_SMALL)}  # no prefix, attention-pool (MAP) head
NAFLEX_HF = ["Siglip2VisionModel", "Siglip2ForImageClassification"]  # tests/test_siglip2.py


def naflex_hf_model(kind: str) -> nn.Module:
    """A tiny random-weight HF SigLIP2 NaFlex model (NAFLEX_HF): 8 px patches, a 64-patch position table."""
    import transformers as T

    config = T.Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                   num_patches=64, patch_size=8)
    torch.manual_seed(0)
    if kind == "Siglip2ForImageClassification":
        return T.Siglip2ForImageClassification(T.Siglip2Config(vision_config=config.to_dict(), num_labels=5)).eval()
    return T.Siglip2VisionModel(config).eval()

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
# TinyViT (ffn-grid too; a depth-wise local convolution between attention and MLP): tests/test_tinyvit.py,
# at 128 px (stages of 16x16, 8x8 and 4x4 tokens with windows 4, 4, 4, 2)
TINY_VIT_TIMM = {"tiny-vit": ("tiny_vit_5m_224", dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 2, 1],
                                                       num_heads=[1, 2, 3, 4], window_sizes=[4, 4, 4, 2]))}
TINY_VIT_SIZE = 128


def cait_model(**kw) -> nn.Module:
    """A tiny CaiT (CLASS_ATTENTION_TIMM, 4 classes; ``kw`` overrides), made by ``load_model`` (it
    records its source, so it saves); layer scale 1 so every block changes its output (timm: 1e-4)."""
    from ltm_convert.sources import load_model

    name, zoo = CLASS_ATTENTION_TIMM["cait"]
    torch.manual_seed(0)
    model = load_model(name, pretrained=False, **{**zoo, "num_classes": 4, **kw}).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gamma" in n:
                p.fill_(1.0)
    return model


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


# video models (tests/test_video.py): clips (B, T, C, H, W) of 4 frames at 32 px, tubelets of 2 frames x 8 x 8 px
VIDEO_HF = ["VideoMAEModel", "VideoMAEForVideoClassification", "VivitModel", "VivitForVideoClassification"]
VJEPA2_HF = ["VJEPA2Model", "VJEPA2ForVideoClassification"]  # tests/test_vjepa2.py (rotary positions from indices)


def video_model(cls_name: str, **options) -> nn.Module:
    """A tiny random-weight HF video model (VIDEO_HF, VJEPA2_HF, or a refused one: Timesformer*)."""
    import transformers as T

    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    if "Classification" in cls_name:
        small["num_labels"] = 5
    if cls_name.startswith("VideoMAE"):
        config = T.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, **small, **options)
    elif cls_name.startswith("Vivit"):
        config = T.VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], **small, **options)
    elif cls_name.startswith("Timesformer"):
        config = T.TimesformerConfig(image_size=32, patch_size=8, num_frames=4, **small, **options)
    else:
        config = T.VJEPA2Config(crop_size=32, frames_per_clip=4, tubelet_size=2, patch_size=8, hidden_size=64,
                                num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0, pred_hidden_size=32,
                                pred_num_hidden_layers=1, pred_num_attention_heads=2, **options)
    torch.manual_seed(0)
    return getattr(T, cls_name)(config).eval()


def clips_for(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random clips (B, T, C, H, W) in the shape the model's config asks for."""
    from ltm_convert.model_inputs import input_shape

    return torch.randn(batch, *input_shape(model), generator=torch.Generator().manual_seed(seed))


def rope_model(kind: str) -> nn.Module:
    """A tiny rotary model: a ROTARY_TIMM kind, or "hf-dinov3" / "hf-dinov3-noreg" (HF DINOv3, 4 registers or none)."""
    torch.manual_seed(0)
    if kind in ROTARY_TIMM:
        import timm

        name, extra = ROTARY_TIMM[kind]
        model = timm.create_model(name, pretrained=False, **{**ROTARY_SMALL, **extra}).eval()
        with torch.no_grad():  # random init leaves LayerScale near zero: make the blocks matter
            for n, p in model.named_parameters():
                if n.endswith(".gamma"):
                    p.uniform_(0.5, 1.5)
        return model
    import transformers as T

    config = T.DINOv3ViTConfig(image_size=96, patch_size=16, hidden_size=64, num_attention_heads=2,
                               intermediate_size=256, num_hidden_layers=3,
                               num_register_tokens=0 if kind.endswith("noreg") else 4)
    return T.DINOv3ViTModel(config).eval()


def randomise_relative_bias(model: nn.Module) -> nn.Module:
    """Random init zeroes BEiT's tables and shrinks its layer scale: make both matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif ".rel_pos." in name or name.startswith("shared_rel_pos."):  # timm's RelPosMlp starts near flat
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("gamma_1", "gamma_2", "lambda_1", "lambda_2", ".gamma")):
                p.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def relb_model(kind: str) -> nn.Module:
    """A tiny relative-position-bias model: a RELB_TIMM kind or a RELB_HF class ("-cls": token pooling)."""
    torch.manual_seed(0)
    if kind in RELB_TIMM:
        import timm

        name, extra = RELB_TIMM[kind]
        return randomise_relative_bias(timm.create_model(name, pretrained=False, **RELB_TINY, **extra))
    import transformers as T

    cls_name, _, pool = kind.partition("-")
    config_cls = T.Data2VecVisionConfig if cls_name.startswith("Data2Vec") else T.BeitConfig
    config = config_cls(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=96,
                        patch_size=16, use_mean_pooling=pool != "cls", use_relative_position_bias=True,
                        layer_scale_init_value=0.1, num_labels=5)
    return randomise_relative_bias(getattr(T, cls_name)(config))


def maskless_vit(attention: str = "maskless") -> nn.Module:
    """A tiny timm ViT (3 blocks, 64 patch tokens) whose attention ``forward(self, x)`` takes no mask
    and computes its own softmax, as custom timm-style models do. ``attention="mask"``: the same
    weights with timm's own block and attention, which takes one (``attn_mask``); ``"sigmoid"``:
    attention weights by a sigmoid (no softmax a bias could be added before)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=64, patch_size=8,
                              embed_dim=64, num_heads=2, num_classes=5).eval()
    cls = {"mask": None, "maskless": MasklessAttention, "sigmoid": SigmoidAttention}[attention]
    if cls is not None:
        for block in model.blocks:
            block.__class__, block.attn.__class__ = MasklessBlock, cls
    return model


class MasklessAttention(TimmAttention):
    """timm's attention with a ``forward(self, x)`` that takes no mask and computes its own softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (self.q_norm(q) * self.scale) @ self.k_norm(k).transpose(-2, -1)
        x = (self.attn_drop(attn.softmax(dim=-1)) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class SigmoidAttention(TimmAttention):
    """Attention whose weights are sigmoids of the logits (no softmax), taking no mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.sigmoid((q * self.scale) @ k.transpose(-2, -1) - 4.0)  # (a bias of -log N, here fixed)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))


class MasklessBlock(TimmBlock):
    """timm's block with a ``forward(self, x)`` that calls its attention without a mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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


def check_intermediates_hold_their_tokens(model: nn.Module, call) -> int:
    """``call()`` runs ``model.forward_intermediates`` for every block with NLC output, ``norm=False`` and
    ``intermediates_only=True`` (model: the timm ViT or NaFlexVit); each intermediate must hold its block's
    output spread over all the original patch slots: the distinct rows of every sample are exactly the
    block's patch tokens (every slot holds one of them, none is lost). Returns how many intermediates
    had merged tokens (a test below 1.0 wants some)."""
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            spread = call()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(spread) == len(outputs) == len(model.blocks)
    merged = 0
    for y, tokens in zip(spread, outputs):
        patches = tokens[:, model.num_prefix_tokens:]
        assert y.shape[1] >= patches.shape[1]
        merged += patches.shape[1] < y.shape[1]
        for b in range(y.shape[0]):
            assert torch.equal(torch.unique(y[b], dim=0), torch.unique(patches[b], dim=0))
    return merged


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


# models whose own code lays block outputs out on the 2-D patch grid (HF backbones' feature maps, DPT /
# Depth Anything / ViTPose heads): they convert dense, their heads get full-grid maps (tests/test_dense.py).
# kind -> the FLOPs ratio a test converts it to (their decoders hold part of the FLOPs, so some reach less)
DENSE_HF = {"Dinov2Backbone": 0.5, "Dinov2WithRegistersBackbone": 0.5, "DPTForDepthEstimation": 0.6,
            "DepthAnythingForDepthEstimation": 0.7, "DPTForSemanticSegmentation": 0.7, "BeitBackbone": 0.6,
            "DINOv3ViTBackbone": 0.6, "Tipsv2VisionBackbone": 0.6, "VitPoseForPoseEstimation": 0.7}


def dense_model(kind: str) -> nn.Module:
    """A tiny random DENSE_HF model (64 patch tokens, 48 for ViTPose); its decoder's weights are drawn
    at unit gain, so its output varies over the image (HF's init leaves DPT's depth map flat)."""
    import transformers as T

    vit = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
               patch_size=8)
    decoder = dict(neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8)
    torch.manual_seed(0)
    if kind in ("Dinov2Backbone", "Dinov2WithRegistersBackbone"):
        config_cls = T.Dinov2WithRegistersConfig if "Registers" in kind else T.Dinov2Config
        extra = {"num_register_tokens": 4} if "Registers" in kind else {}
        model = getattr(T, kind)(config_cls(**vit, out_features=["stage2", "stage4"], **extra))
    elif kind.startswith("DPT"):
        config = T.DPTConfig(**{**vit, "hidden_size": 96, "num_hidden_layers": 6}, backbone_out_indices=[2, 3, 4, 5],
                             is_hybrid=False, num_labels=3, **decoder)
        model = getattr(T, kind)(config)
    elif kind == "DepthAnythingForDepthEstimation":
        backbone = T.Dinov2Config(**{**vit, "image_size": 112, "patch_size": 14}, out_indices=[1, 2, 3, 4],
                                  apply_layernorm=True, reshape_hidden_states=False)
        model = T.DepthAnythingForDepthEstimation(T.DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=64, patch_size=14, head_hidden_size=8, **decoder))
    elif kind == "BeitBackbone":
        model = T.BeitBackbone(T.BeitConfig(**vit, out_indices=[2, 4], use_relative_position_bias=True))
    elif kind == "DINOv3ViTBackbone":
        model = T.DINOv3ViTBackbone(T.DINOv3ViTConfig(**{**vit, "patch_size": 16, "image_size": 128}, out_indices=[2, 4],
                                                      num_register_tokens=2))
    elif kind == "Tipsv2VisionBackbone":
        model = T.Tipsv2VisionBackbone(T.Tipsv2VisionConfig(**vit, out_indices=[2, 4]))
    else:  # ViTPose: a plain ViT whose last block's output the pose head reads as a 8 x 6 grid
        backbone = T.VitPoseBackboneConfig(**{**vit, "image_size": [64, 48], "patch_size": [8, 8]}, out_indices=[4])
        model = T.VitPoseForPoseEstimation(T.VitPoseConfig(backbone_config=backbone))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and not name.startswith(("dpt.", "backbone.", "embeddings.", "encoder.")):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()
