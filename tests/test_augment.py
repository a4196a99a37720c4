"""Augmentations move image, label and weight map together.   pytest tests/test_augment.py"""

import numpy as np
import pytest
from scipy import ndimage

from training.augment import AugmentConfig, Augmenter

ALL = AugmentConfig(p_hflip=1, p_vflip=1, p_rotate=1, p_elastic=1, p_grid=1, p_optical=1)


def _pattern(size=64):
    """Three non-symmetric blocks; the image is the label value scaled, so alignment is checkable."""
    label = np.zeros((size, size), np.uint8)
    label[8:20, 10:40] = 1
    label[30:56, 12:22] = 2
    label[36:44, 40:60] = 3
    image = (label.astype(np.float32) / 3.0)[None]  # (1, H, W)
    return image, label


def _agreement(image, label) -> float:
    """Share of pixels away from label edges (linear interpolation blends there) whose value names the label."""
    interior = ndimage.maximum_filter(label, 3) == ndimage.minimum_filter(label, 3)
    return float((label == np.round(image[0] * 3))[interior].mean())


@pytest.mark.parametrize("seed", range(5))
def test_transformed_pattern_and_its_mask_still_coincide(seed):
    image, label = _pattern()
    out_img, out_lab, out_w = Augmenter(ALL, seed=seed)(image, label, (label > 0).astype(np.float32))
    assert out_img.shape == (1, 64, 64) and out_lab.shape == (64, 64)
    assert set(np.unique(out_lab)) <= {0, 1, 2, 3}  # nearest: no interpolated label values
    assert not np.array_equal(out_lab, label)  # something moved
    assert _agreement(out_img, out_lab) > 0.99
    assert _agreement(out_img, np.roll(out_lab, 2, axis=1)) < 0.99  # the check sees a 2-pixel slip
    for v in (1, 2, 3):
        inside = out_img[0][out_lab == v]
        assert np.median(inside) == pytest.approx(v / 3.0, abs=0.05)  # levels are 1/3 apart
    np.testing.assert_array_equal(out_w > 0.5, out_lab > 0)  # the weight map moved with the label


def test_flips_alone_are_exact():
    image, label = _pattern()
    cfg = AugmentConfig(p_hflip=1, p_vflip=1, p_rotate=0, p_elastic=0, p_grid=0, p_optical=0)
    out_img, out_lab, _ = Augmenter(cfg, seed=0)(image, label)
    np.testing.assert_array_equal(out_lab, label[::-1, ::-1])
    np.testing.assert_array_equal(out_img, image[:, ::-1, ::-1])


def test_multichannel_image_keeps_its_channels():
    image, label = _pattern()
    image3 = np.concatenate([image, image * 0.5, image * 0.25])
    out_img, out_lab, _ = Augmenter(ALL, seed=1)(image3, label)
    assert out_img.shape == (3, 64, 64)
    np.testing.assert_allclose(out_img[1], out_img[0] * 0.5, atol=1e-5)


def test_probability_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="p_rotate"):
        AugmentConfig(p_rotate=1.5)
