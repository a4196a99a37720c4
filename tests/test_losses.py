"""Eq. 1, Eq. 2 and deep supervision on hand-computed cases.   pytest tests/test_losses.py"""

import math

import pytest
import torch

from training.losses import deep_supervision_loss, eq1_loss, eq2_loss


def _perfect_logits(target, num_classes=14, scale=50.0):
    return torch.nn.functional.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * scale


def _target():
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[:, 2:6, 2:6] = 1
    t[1, 0, :4] = 5
    return t


def test_perfect_prediction_gives_zero_loss_even_with_absent_classes():
    t = _target()
    loss = eq1_loss(_perfect_logits(t), t)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_absent_class_predicted_everywhere_costs_one_dice_term_and_no_nan():
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 14, 4, 4)
    logits[:, 0] = 50.0
    assert eq1_loss(logits, t).item() == pytest.approx(0.0, abs=1e-4)
    logits[:, 0], logits[:, 3] = 0.0, 50.0  # class 3 everywhere, target all background
    loss = eq1_loss(logits, t, beta=1.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(2.0, abs=1e-3)  # background Dice 0, class 3 Dice 0


def test_uniform_prediction_matches_hand_computation():
    t = _target()
    n = t.numel()
    beta = 0.65
    dice_sum = 0.0
    for c in range(14):
        n_c = (t == c).sum().item()
        dice = (2 * n_c / 14 + 1e-5) / (n / 14 + n_c + 1e-5)
        dice_sum += 1 - dice
    expected = beta * dice_sum + (1 - beta) * math.log(14)
    assert eq1_loss(torch.zeros(2, 14, 8, 8), t, beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_eq2_adds_l1_of_uniform_prediction():
    t = _target()
    logits = torch.zeros(2, 14, 8, 8)
    l1 = (1 - 1 / 14) + 13 / 14  # per voxel: the true class and the 13 others
    assert (eq2_loss(logits, t) - eq1_loss(logits, t)).item() == pytest.approx(l1, rel=1e-5)


def test_weight_mask_ignores_exactly_the_masked_voxels():
    torch.manual_seed(0)
    t = torch.randint(0, 14, (2, 8, 8))
    logits = torch.randn(2, 14, 8, 8)
    weight = (torch.rand(2, 8, 8) > 0.4).float()
    keep = weight.bool()
    # The same loss on the kept voxels alone, laid out as one (1, C, 1, K) image.
    sub_logits = logits.permute(1, 0, 2, 3)[:, keep][None, :, None, :]
    sub_t = t[keep][None, None, :]
    expected = eq2_loss(sub_logits, sub_t)
    assert eq2_loss(logits, t, weight=weight).item() == pytest.approx(expected.item(), rel=1e-5)
    # Changing masked voxels changes nothing.
    logits2, t2 = logits.clone(), t.clone()
    logits2.permute(0, 2, 3, 1)[~keep] = torch.randn(int((~keep).sum()), 14)
    t2[~keep] = 0
    assert eq2_loss(logits2, t2, weight=weight).item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_adds_weighted_loss_on_nearest_downsampled_target():
    torch.manual_seed(0)
    t = _target()
    main = _perfect_logits(t)
    aux = torch.zeros(2, 14, 4, 4)
    expected = 0.1 * eq1_loss(aux, t[:, ::2, ::2]).item()
    assert deep_supervision_loss(eq1_loss, main, aux, t).item() == pytest.approx(expected, abs=1e-4)


def test_loss_is_finite_under_bf16_logits():
    t = _target()
    loss = eq1_loss(torch.randn(2, 14, 8, 8).bfloat16(), t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
