"""U-Net: parameter count, output shapes, logits.   pytest tests/test_model.py"""

import pytest
import torch

from training.model import UNet, UNetConfig

PAPER_PARAMS = 6.98e6


def test_default_width_has_paper_parameter_count_within_5_percent():
    n = UNet(UNetConfig()).num_parameters()
    assert abs(n - PAPER_PARAMS) / PAPER_PARAMS < 0.05, n


@pytest.mark.parametrize("h,w", [(16, 16), (64, 48), (96, 160)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_main_and_deep_supervision_shapes_follow_input_size(h, w, in_channels):
    model = UNet(UNetConfig(in_channels=in_channels, width=4)).eval()
    with torch.no_grad():
        main, aux = model(torch.randn(2, in_channels, h, w))
    assert main.shape == (2, 14, h, w)
    assert aux.shape == (2, 14, h // 2, w // 2)


def test_outputs_are_logits_not_probabilities():
    """Both outputs are the 1x1 heads' affine outputs W f + b: with the heads' weights scaled by 50 and new biases,
    (output - bias) scales by exactly 50. Any squashing after a head (softmax, log-softmax, sigmoid, clamp, tanh)
    breaks that, and would make the values bounded or normalised per pixel."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4)).eval()
    heads = (model.head, model.aux_head)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        outputs = model(x)
        biases = [head.bias.clone() for head in heads]
        for head in heads:
            head.weight.mul_(50.0)
            head.bias.uniform_(-50.0, 50.0)
        scaled = model(x)
    for out, out_scaled, bias, head in zip(outputs, scaled, biases, heads, strict=True):
        weight_term = out - bias[None, :, None, None]  # W f
        torch.testing.assert_close(out_scaled - head.bias[None, :, None, None], 50.0 * weight_term, rtol=1e-4,
                                   atol=1e-3)  # fmt: skip
        ones = torch.ones(1, *out_scaled.shape[2:])
        assert out_scaled.min() < -1.0 and out_scaled.max() > 1.0  # unbounded, both signs
        assert not torch.allclose(out_scaled.sum(1), ones, atol=1e-2)  # not probabilities
        assert not torch.allclose(out_scaled.exp().sum(1), ones, atol=1e-2)  # not log-probabilities


def test_input_not_a_multiple_of_16_is_rejected_with_advice():
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(UNetConfig(width=4))(torch.zeros(1, 1, 40, 32))


def test_without_deep_supervision_returns_main_logits_twice():
    model = UNet(UNetConfig(width=4, deep_supervision=False)).eval()
    main, aux = model(torch.zeros(1, 1, 32, 32))
    assert aux is main
