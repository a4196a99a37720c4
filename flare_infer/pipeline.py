"""The pipeline, and the only place that knows the order of its steps (docs/ARCHITECTURE.md).

    prepare:  image -> canonical orientation (DICOMOrient "LPS") -> linear resampling to the sidecar
              spacing -> find the body -> crop to its box -> normalise to [0, 1] (the sidecar's kind)
    predict_volume: slice batches through any `predict_batch` callable -> labels (+ confidence, or + probabilities)
    restore:  background outside the body box; linear (default): class probabilities interpolated onto the
              input's own grid, argmax (flare_infer.restore); nearest: the nearest label -> uint8, checked
              to have exactly the input's size, spacing, origin and direction

Training builds its cache with `prepare` + `label_on_prepared` and makes pseudo-labels with
`predict_volume`, so training and deployment share one preprocessing. From Python:

    model = flare_infer.session.load_model("weights/student.onnx")
    mask = predict_case(sitk.ReadImage("ct.nii.gz"), model.predict, model.spec, batch_size=16)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_infer import geometry, io
from flare_infer.geometry import GridMismatchError
from flare_infer.postprocess import apply_postprocess
from flare_infer.predictor import PredictBatch, SliceConfig, StoredProbabilities, predict_slices
from flare_infer.preprocess import find_body, normalise
from flare_infer.restore import RESTORE_CHOICES, check_method, drop_removed, probabilities_to_image_grid
from flare_infer.spec import ModelSpec

log = logging.getLogger("flare_infer")

__all__ = [
    "PredictBatch",
    "Prepared",
    "prepare",
    "label_on_prepared",
    "predict_volume",
    "outputs_for",
    "restore",
    "RESTORE_CHOICES",
    "predict_case",
    "predict_file",
    "CaseResult",
]


@dataclass(frozen=True)
class Prepared:
    image: sitk.Image  # the input as read: the grid the mask is restored onto
    resampled: sitk.Image  # canonical orientation, spec spacing (float32, input intensities): the whole field of view
    vol_zyx: np.ndarray  # float32 (Z', Y', X'), normalised to [0, 1]: resampled's voxels in box_zyx
    box_zyx: tuple[slice, slice, slice]  # the body's box on resampled's (Z, Y, X) array; outside it is background
    notes: tuple[str, ...] = ()  # one log line each (no body found, not Hounsfield units, ...)

    @property
    def full_shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.resampled.GetSize())[::-1]

    def uncrop(self, labels_zyx: np.ndarray) -> np.ndarray:
        """uint8 labels on the whole resampled grid: `labels_zyx` (on the box) inside, background outside."""
        full = np.zeros(self.full_shape_zyx, np.uint8)
        full[self.box_zyx] = labels_zyx
        return full


def _check_image(image: sitk.Image) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise io.InputError(
            f"expected a 3D scalar image, found {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    io.check_finite(image)


def prepare(image: sitk.Image, spec: ModelSpec) -> Prepared:
    """Reorient to LPS, resample (linear) to `spec.spacing_xyz_mm`, crop to the body, normalise (`spec`)."""
    _check_image(image)
    # == geometry.resample_ct(geometry.to_canonical(image), ...), without the reoriented copy (tests check it)
    resampled = geometry.canonical_resample_ct(image, spec.spacing_xyz_mm)
    hu_zyx = sitk.GetArrayViewFromImage(resampled)
    body = find_body(hu_zyx, spec.spacing_xyz_mm)
    vol_zyx = normalise(hu_zyx, spec.normalization, body)
    return Prepared(image=image, resampled=resampled, vol_zyx=vol_zyx, box_zyx=body.box_zyx, notes=body.notes)


def label_on_prepared(label: sitk.Image, prepared: Prepared) -> np.ndarray:
    """uint8 labels on `prepared.vol_zyx`'s voxels (nearest neighbour) for a label image of the input.

    The label must lie on the input's grid; header round-off up to 1e-4 (mm or direction cosine) is tolerated.
    Organ voxels outside the body's box (a body finder's failure, or labels in the air) raise: training on
    such a case would teach the model to miss them.
    """
    geometry.check_same_grid(prepared.image, label, what="label image", atol=1e-4)
    label = sitk.Cast(label, sitk.sitkUInt8) if label.GetPixelID() != sitk.sitkUInt8 else label
    label = sitk.Image(label)  # a copy whose header is made exactly the image's, so the two agree in space
    label.CopyInformation(prepared.image)
    full = sitk.GetArrayFromImage(geometry.labels_to_grid(label, prepared.resampled))
    inside = full[prepared.box_zyx]
    lost = int(np.count_nonzero(full)) - int(np.count_nonzero(inside))
    if lost:
        raise ValueError(
            f"{lost} labelled voxels lie outside the body's box {prepared.box_zyx} (of {full.shape}); "
            "the body finder (flare_infer.preprocess.find_body) missed part of the patient"
        )
    return np.ascontiguousarray(inside)


def predict_volume(
    prepared: Prepared,
    predict_batch: PredictBatch,
    spec: ModelSpec,
    *,
    batch_size: int,
    fixed_batch: bool = False,
    outputs: tuple[str, ...] = ("labels", "confidence"),
) -> tuple[np.ndarray, ...]:
    """`outputs` on `prepared.vol_zyx`'s voxels (the body's box), in that order; only those are computed.

    "labels" uint8 (Z, Y, X); "confidence" float16 (Z, Y, X), max class probability (pseudo-labels);
    "probabilities" `StoredProbabilities`, float32 at the voxels with a neighbour of another label: what the linear
    restore interpolates (`outputs_for(restore)`).
    """
    config = SliceConfig(
        input_channels=spec.input_channels,
        batch_size=batch_size,
        output=spec.output,
        fixed_batch=fixed_batch,
        outputs=outputs,
    )
    return predict_slices(predict_batch, prepared.vol_zyx, config)


def outputs_for(method: str) -> tuple[str, ...]:
    """What `predict_volume` must compute for a restore `method`: nothing more."""
    check_method(method)
    return ("labels", "probabilities") if method == "linear" else ("labels",)


def restore(
    labels_zyx: np.ndarray,
    prepared: Prepared,
    probabilities: StoredProbabilities | None = None,
    *,
    method: str = "linear",
) -> sitk.Image:
    """uint8 labels on the input's exact grid; raises `GridMismatchError` if the grid came out different.

    linear: the class probabilities (`StoredProbabilities` on the box, `labels_zyx` their argmax) interpolated
    trilinearly at every input voxel, then argmax (flare_infer.restore). nearest: the nearest label.
    """
    check_method(method)
    if labels_zyx.shape != prepared.vol_zyx.shape:
        raise GridMismatchError(f"labels shape {labels_zyx.shape} differs from the prepared {prepared.vol_zyx.shape}")
    grid = geometry.Grid.of(prepared.resampled)
    if method == "linear":
        if probabilities is None:
            raise ValueError(
                "the linear restore needs the class probabilities: predict_volume(..., outputs=outputs_for('linear')), "
                "or restore(..., method='nearest')"
            )
        mask = probabilities_to_image_grid(labels_zyx, probabilities, prepared.box_zyx, grid, prepared.image)
    else:
        mask = geometry.labels_to_image_grid(prepared.uncrop(np.asarray(labels_zyx, np.uint8)), grid, prepared.image)
    # the functions above check the grid their voxel mapping implies; this checks the header the mask carries
    geometry.check_same_grid(prepared.image, mask, what="output mask")
    return mask


def _infer_and_restore(prepared, predict_batch, spec, *, batch_size, postprocess, fixed_batch, restore_method, timed):
    """predict_volume with what the restore needs, post-processing, restore; `timed(stage)` after infer."""
    want = outputs_for(restore_method)
    found = predict_volume(prepared, predict_batch, spec, batch_size=batch_size, fixed_batch=fixed_batch, outputs=want)
    labels_zyx, probabilities = found if len(found) == 2 else (found[0], None)
    timed("infer")
    cleaned = apply_postprocess(labels_zyx, postprocess)
    if probabilities is not None:  # components removed by post-processing must not come back by interpolation
        drop_removed(probabilities, labels_zyx, cleaned)
    return restore(cleaned, prepared, probabilities, method=restore_method)


def predict_case(
    image: sitk.Image,
    predict_batch: PredictBatch,
    spec: ModelSpec,
    *,
    batch_size: int,
    postprocess: str = "none",
    fixed_batch: bool = False,
    restore_method: str = "linear",
) -> sitk.Image:
    """CT image in memory -> uint8 mask on the same grid (`restore_method`: linear or nearest, see `restore`)."""
    prepared = prepare(image, spec)
    for note in prepared.notes:
        log.warning("WARNING: %s", note)
    return _infer_and_restore(
        prepared, predict_batch, spec, batch_size=batch_size, postprocess=postprocess, fixed_batch=fixed_batch,
        restore_method=restore_method, timed=lambda stage: None,
    )  # fmt: skip


@dataclass
class CaseResult:
    """What one file went through: seconds per stage, and the mask (kept for a preview)."""

    seconds: dict[str, float] = field(default_factory=dict)
    image: sitk.Image | None = None
    mask: sitk.Image | None = None

    def timed(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = now - start
        return now


def predict_file(
    input_path: Path,
    output_path: Path,
    predict_batch: PredictBatch,
    spec: ModelSpec,
    *,
    batch_size: int,
    postprocess: str = "none",
    fixed_batch: bool = False,
    restore_method: str = "linear",
    read: Callable[[Path], sitk.Image] = io.read_ct,
    write: Callable[[sitk.Image, Path], None] = io.write_mask,
) -> CaseResult:
    """Read, prepare, infer, restore, write atomically; the stage times are what the CLI logs.

    `read` is `io.read_ct` or a `io.ReadAhead`'s `read` (the file read in the background beforehand); `write` is
    `io.write_mask` or another atomic writer of the mask to `output_path` (the CLI's DICOM outputs).
    """
    result = CaseResult()
    t = time.perf_counter()
    image = read(input_path)
    t = result.timed("read", t)
    prepared = prepare(image, spec)
    for note in prepared.notes:  # one line each, naming the file: the case still goes on
        log.warning("WARNING %s: %s", Path(input_path).name, note)
    t = result.timed("preprocess", t)
    clock = {"t": t}

    def timed(stage: str) -> None:
        clock["t"] = result.timed(stage, clock["t"])

    mask = _infer_and_restore(
        prepared, predict_batch, spec, batch_size=batch_size, postprocess=postprocess, fixed_batch=fixed_batch,
        restore_method=restore_method, timed=timed,
    )  # fmt: skip
    t = result.timed("restore", clock["t"])
    write(mask, output_path)
    result.timed("write", t)
    result.image, result.mask = image, mask
    return result
