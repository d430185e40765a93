"""Agreement with the original: the one definition every measurement uses.

``ltm bench``, the calibrated schedule, fine-tune validation (and so the keep fit, which is kept
only when validation agrees at least as well) and the benchmarks all ask the same question: how
close is the converted model's output to the original's on the same image? They answer it here,
so a number means the same thing wherever it is printed.

What is compared: the model's main output (:func:`ltm_convert.model_inputs.main_output`: logits,
the pooled feature, the token sequence, a dense head's map, or the last of several feature maps, the
one every merge reaches), as one vector per image (a map flattened). A token sequence (B, N, D)
is reduced to its token mean: that is defined for every model (token 0 is a patch in models
without a class token), it is the feature fine-tuning distils (``finetune.losses.kd_features``),
and it does not let a few high-norm tokens dominate, as flattening the sequence would. It scores
the sequence as a whole, not each token: how well every single token is reproduced (dense use)
is a different, stricter question that this number does not answer.

How: the cosine of the two vectors, per image, in float64. Merging changes a feature's direction
far more than its norm, the cosine is scale-free across models, and 1.0 means "the original's
output". :func:`top1_agreement` is a second, clearly different quantity, reported next to it for
classifiers only: whether the two models' top-1 classes match. It is never called "agreement".
"""
from __future__ import annotations

import torch
from torch import nn


def pool_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D) by the token mean; (B, D) unchanged; anything else flattened per sample."""
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 2:
        return x
    return x.flatten(1)


def compared_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The (B, D) float vector :func:`agreement` compares: the main output, tokens averaged.
    Runs under the caller's grad mode (the keep fit differentiates through it)."""
    from ltm_convert.model_inputs import main_output, run_model

    return pool_tokens(main_output(run_model(model, images)).float())


def agreement(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image agreement (B,) in [-1, 1], float64: the cosine of ``output`` with the original's
    ``reference`` (main outputs of the same images; token sequences are averaged first)."""
    out, ref = pool_tokens(output.detach()).double(), pool_tokens(reference.detach()).double()
    return torch.nn.functional.cosine_similarity(out, ref, dim=-1).clamp(-1.0, 1.0)


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image (B,) 1.0 where the converted model's top-1 class is the original's, else 0.0."""
    return (logits.argmax(-1) == reference.argmax(-1)).double()
