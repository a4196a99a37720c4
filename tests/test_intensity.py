"""The randomised look of the generator (training/intensity.py) and the training-time intensity randomisation
(training/augment.IntensityRandomiser): issue 26."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.labels import ORGANS
from training import intensity as look
from training.augment import AugmentConfig, Augmenter, IntensityRandomiser
from training.phantoms import (
    LABELLED_DOMAIN,
    LABELLED_RANDOMISED,
    WIDE_DOMAIN,
    WIDE_RANDOMISED,
    generate_case,
)


def _arrays(image: sitk.Image, label: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def test_randomised_look_is_deterministic_for_a_seed():
    first = _arrays(*generate_case(21, WIDE_RANDOMISED, "small"))
    again = _arrays(*generate_case(21, WIDE_RANDOMISED, "small"))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    other = _arrays(*generate_case(22, WIDE_RANDOMISED, "small"))
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


@pytest.mark.parametrize(("classic", "randomised"), [(LABELLED_DOMAIN, LABELLED_RANDOMISED),
                                                     (WIDE_DOMAIN, WIDE_RANDOMISED)])
def test_randomised_look_keeps_the_patient_and_the_scan(classic, randomised):
    """Same seed: the same labels on the same grid; only the image's values differ."""
    img_c, lab_c = generate_case(5, classic, "small")
    img_r, lab_r = generate_case(5, randomised, "small")
    for a, b in ((img_c, img_r), (lab_c, lab_r), (img_r, lab_r)):
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(lab_c), sitk.GetArrayViewFromImage(lab_r))
    hu_c, hu_r = sitk.GetArrayViewFromImage(img_c), sitk.GetArrayViewFromImage(img_r)
    assert np.mean(np.abs(hu_c.astype(np.float32) - hu_r)) > 5.0


def test_draw_means_mixes_synthseg_random_and_widened_priors():
    n = 64
    prior, plain = np.full(n, 100.0, np.float32), np.full(n, 50.0, np.float32)
    groups = {name: np.zeros(n, bool) for name in ("soft", "fat", "bone")}
    groups["soft"][20:40], groups["fat"][1:3], groups["bone"][10:12] = True, True, True
    prior[1:3], plain[1:3] = -100.0, -100.0
    cfg = look.RANDOMISED
    kinds = []
    for seed in range(300):
        means, random = look.draw_means(np.random.default_rng(seed), cfg, prior, plain, groups)
        kinds.append(random)
        kept = ~(groups["soft"] | groups["fat"] | groups["bone"])
        assert np.array_equal(means[kept], prior[kept])  # air, gas, lung, table: physics kept
        if random:
            assert np.all((means[20:40] >= cfg.random_soft_hu[0]) & (means[20:40] <= cfg.random_soft_hu[1]))
            assert np.all((means[1:3] >= cfg.random_fat_hu[0]) & (means[1:3] <= cfg.random_fat_hu[1]))
            assert np.all((means[10:12] >= cfg.random_bone_hu[0]) & (means[10:12] <= cfg.random_bone_hu[1]))
            assert means[20:40].std() > 30  # each tissue its own draw
        else:  # plain + gain * enhancement, gain in contrast_gain, plus a shift of std prior_shift_hu
            lo = 50 + cfg.contrast_gain[0] * 50 - 5 * cfg.prior_shift_hu
            hi = 50 + cfg.contrast_gain[1] * 50 + 5 * cfg.prior_shift_hu
            assert np.all((means[20:40] > lo) & (means[20:40] < hi))
            assert np.array_equal(means[10:12], prior[10:12])  # bone keeps its prior in this mode
    assert 0.4 < np.mean(kinds) < 0.6  # p_random = 0.5


@pytest.mark.parametrize("peak_per_mm", [0.1, 0.25])
def test_band_noise_spectrum_peaks_where_asked(peak_per_mm):
    spacing = (5.0, 0.6, 0.6)  # a spacing far from 1 mm: the filter must convert mm to voxels
    noise = look.band_noise(np.random.default_rng(0), (8, 256, 256), spacing, peak_per_mm, 12.0)
    assert noise.std() == pytest.approx(12.0, rel=1e-3)
    power = np.mean(np.abs(np.fft.fft2(noise)) ** 2, axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(256, 0.6), np.fft.fftfreq(256, 0.6), indexing="ij")
    radius = np.hypot(fy, fx)
    bins = np.linspace(0, 0.8, 81)
    which = np.digitize(radius.ravel(), bins)
    radial = np.array([power.ravel()[which == i].mean() for i in range(1, len(bins))])
    peak = bins[np.argmax(radial)] + 0.005
    assert peak == pytest.approx(peak_per_mm, rel=0.25)


def test_liver_texture_is_not_white_noise():
    """Neighbouring liver voxels correlate (smooth parenchyma, vessels, band noise), unlike white noise."""
    image, label = generate_case(3, LABELLED_RANDOMISED, "small")
    hu, lab = _arrays(image, label)
    liver = (lab == 1) & np.roll(lab == 1, 1, axis=2)
    a, b = hu.astype(np.float64)[liver], np.roll(hu, 1, axis=2).astype(np.float64)[liver]
    assert np.corrcoef(a, b)[0, 1] > 0.3


# Published adult volumes (mL): Geraghty et al., Abdom Imaging 2004 (149 adults, female / male means: liver
# 1411 / 1710, spleen 180 / 238, kidney 157 / 193, pancreas 64 / 87); adrenals about 4.2 mL each; fasting
# gallbladder 20-70 mL (../shared/SIM2REAL.md section 3). The ranges below span those means with the spread of
# adults (about +/- 40 %), as docs/PHANTOMS.md cites.
VOLUME_RANGES_ML = {
    "liver": (1000, 2600), "spleen": (100, 450), "right kidney": (80, 300), "left kidney": (80, 300),
    "pancreas": (30, 140), "right adrenal gland": (2, 16), "left adrenal gland": (2, 16), "gallbladder": (15, 80),
}


def assert_volumes_in_cited_ranges(label: sitk.Image, case: str) -> None:
    lab = sitk.GetArrayViewFromImage(label)
    ml = float(np.prod(label.GetSpacing())) / 1000.0
    for organ in ORGANS:
        if organ.name in VOLUME_RANGES_ML:
            lo, hi = VOLUME_RANGES_ML[organ.name]
            volume = np.count_nonzero(lab == organ.value) * ml
            assert lo <= volume <= hi, f"{case}: {organ.name} {volume:.0f} mL outside [{lo}, {hi}]"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_phantom_organ_volumes_lie_in_the_cited_ranges(seed):
    _, label = generate_case(seed, LABELLED_RANDOMISED, "small", acquisition=None)
    assert_volumes_in_cited_ranges(label, f"seed {seed}")


# ----------------------------------------------------------------------------------------------
# Training-time randomisation
# ----------------------------------------------------------------------------------------------
def _slice() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((64, 64), np.uint8)
    label[8:28, 8:28], label[36:56, 36:56] = 1, 3
    return np.full((1, 64, 64), 0.5, np.float32), label


def test_randomiser_off_returns_the_slice_untouched():
    image, label = _slice()
    assert IntensityRandomiser(0.0, seed=1)(image, label) is image


def test_randomiser_gives_each_organ_its_own_intensity():
    """Two organs of equal intensity come out apart in most draws (the per-label shift), in [0, 1]."""
    image, label = _slice()
    randomiser = IntensityRandomiser(1.0, seed=3)
    apart = 0
    for _ in range(60):
        out = randomiser(image, label)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        a, b = out[0][14:22, 14:22].mean(), out[0][42:50, 42:50].mean()
        apart += abs(a - b) > 0.02
    assert apart >= 45


def test_randomiser_draws_again_after_reseed():
    """A resumed run redraws the same: reseeding to the same seed repeats the randomisation."""
    image, label = _slice()
    first, second = Augmenter(AugmentConfig.from_cli(0, 0, 0, 1.0), seed=1), Augmenter(
        AugmentConfig.from_cli(0, 0, 0, 1.0), seed=2)
    first.reseed(7)
    second.reseed(7)
    out1, out2 = first(image, label)[0], second(image, label)[0]
    assert np.array_equal(out1, out2)
    assert not np.array_equal(out1, image)


def test_randomise_enables_the_augmenter_and_is_a_probability():
    assert AugmentConfig.from_cli(0, 0, 0, 0.5).enabled
    assert not AugmentConfig.from_cli(0, 0, 0, 0.0).enabled
    with pytest.raises(ValueError, match="p_intensity"):
        AugmentConfig.from_cli(0, 0, 0, 1.5)


@pytest.mark.parametrize("phase", ["teacher", "student"])
def test_training_clis_hand_randomise_to_the_augmentation(phase, monkeypatch, tmp_path):
    """`--randomise P` reaches the run's AugmentConfig (p_intensity), in both phases; absent, it is off."""
    import importlib

    from typer.testing import CliRunner

    module = importlib.import_module(f"training.{phase}")
    seen = []

    def fake_run(*args, **kwargs):
        seen.append(next(a for a in args if hasattr(a, "augment")).augment)
        return tmp_path / "best.pt"

    monkeypatch.setattr(module, "run", fake_run)
    base = {"teacher": ["--data", str(tmp_path), "--out", str(tmp_path / "run")],
            "student": ["--data", str(tmp_path), "--unlabelled", str(tmp_path), "--teacher", str(tmp_path / "t.pt"),
                        "--out", str(tmp_path / "run")]}[phase]
    for extra, expected in (([], 0.0), (["--randomise", "0.3"], 0.3)):
        result = CliRunner().invoke(module.app, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1].p_intensity == pytest.approx(expected)
