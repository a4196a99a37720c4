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
    torch.manual_seed(0)
    main, _ = UNet(UNetConfig(width=4)).eval()(torch.randn(1, 1, 32, 32))
    assert main.min() < 0 or not torch.allclose(main.sum(1), torch.ones(1, 32, 32))


def test_input_not_a_multiple_of_16_is_rejected_with_advice():
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(UNetConfig(width=4))(torch.zeros(1, 1, 40, 32))


def test_without_deep_supervision_returns_main_logits_twice():
    model = UNet(UNetConfig(width=4, deep_supervision=False)).eval()
    main, aux = model(torch.zeros(1, 1, 32, 32))
    assert aux is main
