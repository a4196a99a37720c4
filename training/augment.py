"""The paper's augmentations of labelled slices (albumentations 2.x), image and masks moved together.

    pytest tests/test_augment.py

Interface (stable):

    AugmentConfig(p_hflip=0.5, p_vflip=0.5, p_rotate=0.5, rotate_limit=90.0, p_elastic=0.2, p_grid=0.2, p_optical=0.2)
    Augmenter(cfg, seed=None)(image_chw float32, label_hw uint8, weight_hw float32 | None)
        -> (image_chw, label_hw, weight_hw | None)

The label and the optional per-pixel `weight` map (the student's confidence mask) are passed as
albumentations masks, so they get the same geometric transform with nearest interpolation; the
image is interpolated linearly. Borders filled with 0 (the normalised minimum, background label,
weight 0: voxels moved in from outside the slice do not count).
The paper gives the transforms but not their probabilities; the defaults here are ours: flips and
rotation at 0.5, the three distortions at 0.2 (they are the slow ones, ~2-5 ms per 256 x 256 slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_rotate: float = 0.5
    rotate_limit: float = 90.0  # degrees, +/-
    p_elastic: float = 0.2
    p_grid: float = 0.2
    p_optical: float = 0.2
    p_intensity: float = 0.0  # SynthSeg-style intensity randomisation (IntensityRandomiser), per slice

    def __post_init__(self) -> None:
        for name in ("p_hflip", "p_vflip", "p_rotate", "p_elastic", "p_grid", "p_optical", "p_intensity"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1]; found {p}")

    @classmethod
    def from_cli(cls, p_flip: float, p_rotate: float, p_distort: float, randomise: float = 0.0) -> AugmentConfig:
        """The CLIs' knobs: each flip at p_flip, rotation at p_rotate, each distortion at p_distort, the intensity
        randomisation at `randomise` (--randomise)."""
        return cls(p_hflip=p_flip, p_vflip=p_flip, p_rotate=p_rotate, p_elastic=p_distort, p_grid=p_distort,
                   p_optical=p_distort, p_intensity=randomise)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return any((self.p_hflip, self.p_vflip, self.p_rotate, self.p_elastic, self.p_grid, self.p_optical,
                    self.p_intensity))


def build_transform(cfg: AugmentConfig, seed: int | None = None) -> A.Compose:
    fill = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    nearest = {"mask_interpolation": cv2.INTER_NEAREST}
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.p_hflip),
            A.VerticalFlip(p=cfg.p_vflip),
            A.Rotate(limit=cfg.rotate_limit, p=cfg.p_rotate, **fill, **nearest),
            A.ElasticTransform(p=cfg.p_elastic, **fill, **nearest),
            A.GridDistortion(p=cfg.p_grid, **fill, **nearest),
            A.OpticalDistortion(p=cfg.p_optical, **fill, **nearest),
        ],
        additional_targets={"weight": "mask"},
        seed=seed,
    )


class Augmenter:
    """Callable applying one random draw of the transforms to an image (C, H, W) and its masks (H, W)."""

    def __init__(self, cfg: AugmentConfig = AugmentConfig(), seed: int | None = None) -> None:  # noqa: B008
        self.cfg = cfg
        self.transform = build_transform(cfg, seed)
        self.intensity = IntensityRandomiser(cfg.p_intensity, seed)

    def reseed(self, seed: int) -> None:
        """Called once per DataLoader worker so workers do not repeat each other's draws."""
        self.transform.set_random_seed(seed)
        self.intensity.reseed(seed)

    def __call__(
        self, image_chw: np.ndarray, label_hw: np.ndarray, weight_hw: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        kw = {"image": np.ascontiguousarray(image_chw.transpose(1, 2, 0)), "mask": label_hw}  # HWC for albumentations
        if weight_hw is not None:
            kw["weight"] = weight_hw
        out = self.transform(**kw)
        image = out["image"]
        image = image[:, :, None] if image.ndim == 2 else image  # cv2 drops a single channel axis
        image = np.ascontiguousarray(image.transpose(2, 0, 1))
        return (
            self.intensity(image, out["mask"]),
            np.ascontiguousarray(out["mask"]),
            None if weight_hw is None else np.ascontiguousarray(out["weight"]),
        )


class IntensityRandomiser:
    """SynthSeg-style training-time intensity randomisation of a normalised slice (issue 26; SynthSeg, Billot et al.,
    and class-wise augmentation, SLAug: ../shared/SIM2REAL.md sections 1 and 4).

    With probability `p` per slice, in this order: every organ label's voxels shifted by their own N(0, 0.06)
    (about 65 HU in a 1100 HU window: organs do not keep their training HU), a gamma with log g ~ N(0, 0.3), a
    smooth multiplicative bias field (std up to 0.1), then each at 0.3: a Gaussian blur (sigma 0.3-1.2 px), a
    lower resolution (down by 1.2-2.5x and back), noise (std up to 0.03). Background (label 0) keeps its values
    before the gamma, so fat, air and bone stay where a fixed window puts them. The result is clipped to [0, 1],
    the normalised range. The draws come from the randomiser's own generator (`reseed`, as the albumentations
    transform's), so a resumed run draws the same.
    """

    def __init__(self, p: float, seed: int | None = None) -> None:
        self.p = p
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image_chw: np.ndarray, label_hw: np.ndarray) -> np.ndarray:
        rng = self.rng
        if self.p <= 0 or rng.random() >= self.p:
            return image_chw
        image = image_chw.astype(np.float32, copy=True)
        organs = np.unique(label_hw)
        organs = organs[organs > 0]
        shift = np.zeros(int(label_hw.max()) + 1, np.float32)
        shift[organs] = rng.normal(0.0, 0.06, organs.size)
        image += shift[label_hw][None]  # the centre slice's labels, for every channel
        np.clip(image, 0.0, 1.0, out=image)
        image **= np.float32(np.exp(rng.normal(0.0, 0.3)))
        image *= self._bias(image.shape[1:], rng.uniform(0.0, 0.1))[None]
        if rng.random() < 0.3:
            sigma = rng.uniform(0.3, 1.2)
            image = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in image])
        if rng.random() < 0.3:
            image = self._low_resolution(image, rng.uniform(1.2, 2.5))
        if rng.random() < 0.3:
            image += rng.normal(0.0, rng.uniform(0.0, 0.03), image.shape).astype(np.float32)
        return np.clip(image, 0.0, 1.0, out=image)

    def _bias(self, shape_hw: tuple[int, int], std: float) -> np.ndarray:
        coarse = np.exp(self.rng.normal(0.0, std, (4, 4))).astype(np.float32)
        return cv2.resize(coarse, (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_CUBIC)

    @staticmethod
    def _low_resolution(image_chw: np.ndarray, factor: float) -> np.ndarray:
        h, w = image_chw.shape[1:]
        small = (max(1, round(w / factor)), max(1, round(h / factor)))
        return np.stack([cv2.resize(cv2.resize(c, small, interpolation=cv2.INTER_AREA), (w, h),
                                    interpolation=cv2.INTER_LINEAR) for c in image_chw])
