"""How a phantom's tissues look on a real scanner, drawn wide: the "randomised" look of the generator (issue 26).

    python -m training.phantoms data/real --intensity randomised --size small      # a set with this look

The generator's classic look (`training/phantoms.py`, `_intensities`) gives each tissue one HU mean per contrast
phase plus white texture: a network trained on it reads HU and fails on real scans, whose organs sit elsewhere in
HU (the shared real CT: liver about 46, kidneys 12, aorta 41) and whose texture is smooth parenchyma with vessels,
not white noise. This look draws, per case, from its own random stream (the case's seed and `LOOK_STREAM`, so the
patient and the scan are the same case as with the classic look):

- **means**: with probability `p_random` SynthSeg's recipe (Billot et al.; ../shared/SIM2REAL.md section 1), a
  fresh uniform HU for every soft tissue (organs, muscle, bowel, blood: `random_soft_hu`), fat in its own negative
  range and bone in its own bright range, air, gas and lung kept (a fixed window sees them as the scanner does);
  otherwise the per-phase literature means (`phantoms.HU_BY_PHASE`, SIM2REAL section 2) with the enhancement
  scaled by `contrast_gain` (down to 0.2: late or weak boluses like the shared real CT's) and a per-tissue shift;
- **texture**: a smooth random field (correlation `texture_mm`) times a per-tissue amplitude, and inside the liver
  and spleen vessel-like bright or dark bands (iso-lines of another smooth field: a branching network look);
- **partial volume**: the acquisition module's blur (`acquisition.reconstruct`), as for the classic look;
- **noise**: white noise band-passed to a spectrum peak drawn in `noise_peak_per_mm` (0.08-0.3 mm^-1: model-based
  iterative to filtered back-projection, SIM2REAL section 2), std `noise_std_hu` after filtering;
- **bias**: a smooth additive low-frequency field (cupping, beam hardening) of std `bias_hu`.

numpy and scipy only; one case of the `small` size takes about 0.3 s more than the classic look (by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LOOK_STREAM = 0x100C  # this module's stream key beside the case seed: the classic draws are not moved


@dataclass(frozen=True)
class LookConfig:
    """Ranges the randomised look draws from (HU unless named otherwise)."""

    p_random: float = 0.5  # share of cases with SynthSeg-random soft-tissue means
    random_soft_hu: tuple[float, float] = (-60.0, 260.0)
    random_fat_hu: tuple[float, float] = (-160.0, -40.0)
    random_bone_hu: tuple[float, float] = (150.0, 900.0)
    contrast_gain: tuple[float, float] = (0.2, 1.4)  # enhancement (phase - plain) times this, prior cases
    prior_shift_hu: float = 15.0  # per-tissue N(0, s) shift of the prior means
    texture_hu: tuple[float, float] = (2.0, 20.0)  # per-tissue amplitude of the smooth texture field
    texture_mm: tuple[float, float] = (3.0, 12.0)  # its correlation length
    vessel_hu: tuple[float, float] = (-40.0, 80.0)  # vessel contrast inside liver and spleen (0: none)
    noise_std_hu: tuple[float, float] = (3.0, 28.0)
    noise_peak_per_mm: tuple[float, float] = (0.08, 0.3)
    bias_hu: tuple[float, float] = (0.0, 25.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_random <= 1.0:
            raise ValueError(f"LookConfig.p_random is a probability in [0, 1]; found {self.p_random}")
        for name in ("random_soft_hu", "random_fat_hu", "random_bone_hu", "contrast_gain", "texture_hu",
                     "texture_mm", "vessel_hu", "noise_std_hu", "noise_peak_per_mm", "bias_hu"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"LookConfig.{name} must be (low, high) with low <= high; found {(lo, hi)}")


RANDOMISED = LookConfig()


def look_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, LOOK_STREAM])


def draw_means(rng: np.random.Generator, cfg: LookConfig, prior_hu: np.ndarray, plain_hu: np.ndarray,
               groups: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    """Per-tissue HU means (N_TISSUES,) and whether they are SynthSeg-random.

    Args:
        prior_hu: the tissue's literature mean in the case's phase (float32, per tissue code).
        plain_hu: its non-contrast mean (the enhancement is prior - plain).
        groups: boolean masks over tissue codes: "soft", "fat", "bone" (randomised), the others kept.
    """
    means = prior_hu.astype(np.float32).copy()
    if rng.random() < cfg.p_random:
        for group, (lo, hi) in (("soft", cfg.random_soft_hu), ("fat", cfg.random_fat_hu),
                                ("bone", cfg.random_bone_hu)):
            codes = np.flatnonzero(groups[group])
            means[codes] = rng.uniform(lo, hi, codes.size)
        return means, True
    gain = rng.uniform(*cfg.contrast_gain)
    soft = groups["soft"]
    means[soft] = plain_hu[soft] + gain * (prior_hu[soft] - plain_hu[soft])
    means[soft | groups["fat"]] += rng.normal(0, cfg.prior_shift_hu, int((soft | groups["fat"]).sum()))
    return means, False


def smooth_field(rng: np.random.Generator, shape_zyx: tuple[int, ...], sigma_zyx: tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation `sigma_zyx` voxels (float32)."""
    if min(sigma_zyx) > 3:  # long correlation: filter a coarse grid and interpolate it up
        coarse = tuple(int(np.ceil(n / (s / 2))) + 3 for n, s in zip(shape_zyx, sigma_zyx, strict=True))
        field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 2.0, truncate=2.5)
        zoom = [n / c for n, c in zip(shape_zyx, coarse, strict=True)]
        field = ndimage.zoom(field, zoom, order=1, mode="nearest")[tuple(slice(0, n) for n in shape_zyx)]
    else:
        field = ndimage.gaussian_filter(rng.standard_normal(shape_zyx, dtype=np.float32), sigma_zyx, truncate=2.5)
    std = float(field.std())
    return field / np.float32(std if std > 0 else 1.0)


def band_noise(rng: np.random.Generator, shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...],
               peak_per_mm: float, std_hu: float) -> np.ndarray:
    """In-plane band-passed white noise (difference of Gaussians) whose spectrum peaks near `peak_per_mm`."""
    white = rng.standard_normal(shape_zyx, dtype=np.float32)
    # A DoG of sigmas s and 2s peaks near f = 0.19 / s (cycles per unit): s = 0.19 / f, in voxels per axis.
    sigma = [0.0] + [min(0.19 / peak_per_mm / sp, 8.0) for sp in spacing_zyx[1:]]
    fine = ndimage.gaussian_filter(white, [0.0] + [max(s, 0.35) for s in sigma[1:]], truncate=2.5)
    coarse = ndimage.gaussian_filter(white, [0.0] + [2 * max(s, 0.35) for s in sigma[1:]], truncate=2.5)
    fine -= coarse
    std = float(fine.std())
    fine *= np.float32(std_hu / (std if std > 0 else 1.0))
    return fine


def texture(rng: np.random.Generator, tissue: np.ndarray, spacing_zyx: tuple[float, ...], cfg: LookConfig,
            vessel_codes: tuple[int, ...], n_tissues: int) -> np.ndarray:
    """Smooth per-tissue texture (HU, float32 volume): a shared field times each tissue's amplitude, plus
    vessel-like bands in the `vessel_codes` tissues."""
    corr_mm = rng.uniform(*cfg.texture_mm)
    sigma = tuple(max(corr_mm / s, 0.5) for s in spacing_zyx)
    amplitude = rng.uniform(*cfg.texture_hu, n_tissues).astype(np.float32)
    out = smooth_field(rng, tissue.shape, sigma) * amplitude[tissue]
    vessels = np.isin(tissue, vessel_codes)
    if vessels.any():
        # Iso-lines |f| < w of a smooth field: tubes that branch and meet, about 2-5 mm wide.
        f = smooth_field(rng, tissue.shape, tuple(max(9.0 / s, 0.5) for s in spacing_zyx))
        width = rng.uniform(0.08, 0.2)
        out[vessels & (np.abs(f) < width)] += np.float32(rng.uniform(*cfg.vessel_hu))
    return out


def render(tissue: np.ndarray, means: np.ndarray, spacing_zyx: tuple[float, ...], rng: np.random.Generator,
           cfg: LookConfig, *, vessel_codes: tuple[int, ...], reconstruct) -> np.ndarray:
    """HU volume (z, y, x float32) of a tissue map: means + texture, the scanner's blur (`reconstruct`), band
    noise and a bias field."""
    hu = means[tissue]
    hu += texture(rng, tissue, spacing_zyx, cfg, vessel_codes, means.size)
    hu = reconstruct(hu)
    hu += band_noise(rng, tissue.shape, spacing_zyx, rng.uniform(*cfg.noise_peak_per_mm),
                     rng.uniform(*cfg.noise_std_hu))
    bias_std = rng.uniform(*cfg.bias_hu)
    if bias_std > 0:
        coarse = tuple(max(80.0 / s, 1.0) for s in spacing_zyx)  # ~8 cm correlation
        hu += smooth_field(rng, tissue.shape, coarse) * np.float32(bias_std)
    return hu
