"""The paper's Eq. 1 (labelled slices) and Eq. 2 (pseudo-labelled slices), plus deep supervision.

    pytest tests/test_losses.py

Interface (stable; the student builds on it):

    eq1_loss(logits, target, *, beta=0.65, weight=None) -> scalar
    eq2_loss(logits, pseudo_target, *, beta=0.65, weight=None) -> scalar
    deep_supervision_loss(loss_fn, main, aux, target, aux_weight=0.1, **kw) -> scalar

`logits` (N, C, H, W) are raw network outputs (softmax is applied here, in float32 even under
autocast); `target` (N, H, W) integer class indices; `weight` an optional (N, H, W) 0/1 (or
[0, 1]) mask: a voxel with weight 0 contributes nothing to any term (Dice sums, CE, L1).

Eq. 1:  L = beta * sum_c (1 - Dice_c) + (1 - beta) * CE
  - Dice_c is the soft Dice of class c over the whole batch (sums over N, H, W), with
    Dice_c = (2 sum p y + eps) / (sum p + sum y + eps), eps = 1e-5: a class absent from both
    target and prediction scores 1 (no loss, no NaN); absent from the target but predicted, ~0.
  - CE is the MEAN over (weighted) voxels of -sum_c y log p, not the paper's plain sum: a sum
    grows with batch and patch size (40 x 256 x 256 = 2.6 M voxels) and would swamp the Dice term,
    which lies in [0, 14]; the mean keeps both terms O(1) so beta = 0.65 actually balances them.
Eq. 2:  L = Eq. 1 + sum_c |p - onehot(y~)|, the L1 term likewise summed over classes and
  averaged over (weighted) voxels (so it lies in [0, 2]) for the same reason.
Deep supervision: the target (and `weight`) are downsampled nearest to the aux logits' size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5


def _prepare(logits: Tensor, target: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float32 log-probs, probs, one-hot target (N, C, H, W) and weight (N, 1, H, W)."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (N, C, H, W) and target (N, H, W); found {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    num_classes = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    if weight is None:
        w = torch.ones_like(logp[:, :1])
    else:
        if weight.shape != target.shape:
            raise ValueError(
                f"weight must be (N, H, W) like the target {tuple(target.shape)}; found {tuple(weight.shape)}"
            )
        w = weight.float().unsqueeze(1)  # (N, 1, H, W)
    return logp, logp.exp(), onehot, w


def _dice_ce(logp: Tensor, p: Tensor, onehot: Tensor, w: Tensor, beta: float) -> Tensor:
    dims = (0, 2, 3)
    inter = (p * onehot * w).sum(dims)  # (C,)
    denom = (p * w).sum(dims) + (onehot * w).sum(dims)
    dice = (2 * inter + EPS) / (denom + EPS)
    n_vox = w.sum().clamp_min(1.0)  # clamp: an all-zero weight gives 0 CE, not NaN
    ce = -(onehot * logp * w).sum() / n_vox
    return beta * (1 - dice).sum() + (1 - beta) * ce


def eq1_loss(logits: Tensor, target: Tensor, *, beta: float = 0.65, weight: Tensor | None = None) -> Tensor:
    """Paper Eq. 1: beta * sum_c (1 - soft Dice_c) + (1 - beta) * mean-over-voxels cross-entropy."""
    logp, p, onehot, w = _prepare(logits, target, weight)
    return _dice_ce(logp, p, onehot, w, beta)


def eq2_loss(logits: Tensor, pseudo_target: Tensor, *, beta: float = 0.65, weight: Tensor | None = None) -> Tensor:
    """Paper Eq. 2: Eq. 1 + sum_c |p - onehot(y~)| averaged over (weighted) voxels."""
    logp, p, onehot, w = _prepare(logits, pseudo_target, weight)
    l1 = ((p - onehot).abs() * w).sum() / w.sum().clamp_min(1.0)
    return _dice_ce(logp, p, onehot, w, beta) + l1


def deep_supervision_loss(
    loss_fn: Callable[..., Tensor],
    main: Tensor,
    aux: Tensor,
    target: Tensor,
    aux_weight: float = 0.1,
    **kw,
) -> Tensor:
    """loss_fn(main, target) + aux_weight * loss_fn(aux, target and weight downsampled nearest)."""
    loss = loss_fn(main, target, **kw)
    if aux_weight == 0 or aux is main:
        return loss
    size = aux.shape[-2:]
    aux_kw = dict(kw)
    if kw.get("weight") is not None:
        aux_kw["weight"] = _nearest(kw["weight"], size)
    return loss + aux_weight * loss_fn(aux, _nearest(target, size).long(), **aux_kw)


def _nearest(t: Tensor, size: torch.Size) -> Tensor:
    """(N, H, W) -> (N, h, w), nearest (labels are never interpolated)."""
    return F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(t.dtype)
