"""The geometry chain end to end: a threshold stand-in model through the pipeline must give the same labels
as the same thresholds applied directly on the original grid, whatever the header says.

    pytest tests/test_pipeline.py -x -q
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from onnx_standin import CLASSES, THRESHOLDS, make_standin_model, standin_classes
from scipy import ndimage

from flare_infer import geometry, pipeline
from flare_infer.geometry import Grid, GridMismatchError
from flare_infer.labels import NUM_CLASSES
from flare_infer.postprocess import apply_postprocess
from flare_infer.predictor import SliceConfig, StoredProbabilities, gather_batch, labels_and_confidence, predict_slices
from flare_infer.session import load_model
from flare_infer.spec import ModelSpec

REAL_CT = Path(__file__).resolve().parents[2] / "shared/data/real-ct/example_ct.nii.gz"
SPEC = ModelSpec()

# Analytic anatomy in LPS millimetres around the field of view's centre: (value HU, centre, radii).
# Liver on the patient's right (-x), spleen on the left (+x), kidney left and inferior: nothing is symmetric.
BODY = (0.0, (0.0, 0.0, 0.0), (95.0, 70.0, 1.0e4))
ORGANS_HU = (
    (300.0, (-40.0, 0.0, 10.0), (40.0, 35.0, 30.0)),  # "liver"
    (600.0, (50.0, 15.0, 12.0), (25.0, 25.0, 25.0)),  # "spleen"
    (900.0, (45.0, 35.0, -25.0), (18.0, 15.0, 20.0)),  # "kidney"
)
PHANTOM_CLASSES = (0, 4, 1, 3, 13)  # air, body, liver, spleen, left kidney: one band per tissue
FIELD_CENTRE_XYZ = np.array([12.0, -40.0, 310.0])  # off-centre origin


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


GEOMETRIES = {  # name: (size_xyz, spacing_xyz, direction 3x3, pixel type)
    "identity_int16": ((96, 72, 30), (2.0, 2.2, 4.0), np.eye(3), np.int16),
    "flipped_ras_int32": ((96, 72, 30), (2.0, 2.2, 4.0), np.diag([-1.0, -1.0, 1.0]), np.int32),
    "permuted_sagittal_float32": (
        (30, 72, 96),
        (4.0, 2.2, 2.0),
        np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], float),
        np.float32,
    ),
    "oblique_float64": ((100, 80, 34), (2.0, 2.0, 3.5), _rotation(12.0, 8.0), np.float64),
    "anisotropic_flipped_uint8": ((200, 150, 12), (1.0, 1.0, 10.0), np.diag([1.0, -1.0, -1.0]), np.uint8),
}


def phantom_ct(size_xyz, spacing_xyz, direction, dtype=np.int16) -> sitk.Image:
    """The analytic anatomy sampled at every voxel centre of the given grid (uint8 stores (HU + 1000) / 10)."""
    size_xyz, spacing_xyz = np.asarray(size_xyz), np.asarray(spacing_xyz, float)
    origin = FIELD_CENTRE_XYZ - direction @ (spacing_xyz * (size_xyz - 1) / 2)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size_xyz[::-1]), indexing="ij")  # (Z, Y, X) index grids
    idx_xyz = np.stack([i, j, k], axis=-1) * spacing_xyz  # (Z, Y, X, 3) mm along the image axes
    rel_xyz = idx_xyz @ direction.T + origin - FIELD_CENTRE_XYZ  # physical LPS mm relative to the centre
    hu = np.full(rel_xyz.shape[:3], -1000.0)
    for value, centre, radii in (BODY, *ORGANS_HU):
        inside = (((rel_xyz - centre) / radii) ** 2).sum(axis=-1) <= 1.0
        hu[inside] = value
    vol = (hu + 1000.0) / 10.0 if dtype == np.uint8 else hu
    image = sitk.GetImageFromArray(vol.astype(dtype))
    image.SetSpacing(tuple(spacing_xyz.tolist()))
    image.SetOrigin(tuple(origin.tolist()))
    image.SetDirection(tuple(direction.ravel().tolist()))
    return image


def normalised_like_pipeline(image: sitk.Image, prepared: pipeline.Prepared) -> np.ndarray:
    """The original voxels mapped with the pipeline's intensity window (computed here independently)."""
    resampled = sitk.GetArrayViewFromImage(prepared.resampled).astype(np.float64)
    lo = resampled.mean() - SPEC.normalization.n_std * resampled.std()
    hi = resampled.mean() + SPEC.normalization.n_std * resampled.std()
    return np.clip((sitk.GetArrayFromImage(image).astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def interior(labels_zyx: np.ndarray, spacing_xyz, radius_mm: float = 1.7) -> np.ndarray:
    """Voxels whose neighbourhood of radius_mm (rounded up to whole voxels) holds one label: away from edges.

    1.7 mm is half the diagonal of a 1.5 x 1.5 x 2.5 mm voxel: the furthest a restored voxel centre lies from the
    resampled voxel it takes its label from; linear interpolation there mixes only voxels within that
    radius, so inside, it mixes values of one band only and must give the band's label.
    """
    radius_zyx = [math.ceil(radius_mm / s) for s in reversed(spacing_xyz)]
    footprint = np.ones([2 * r + 1 for r in radius_zyx], bool)
    lo = ndimage.minimum_filter(labels_zyx, footprint=footprint, mode="nearest")
    hi = ndimage.maximum_filter(labels_zyx, footprint=footprint, mode="nearest")
    return lo == hi


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def assert_matches_reference(mask: sitk.Image, reference_zyx: np.ndarray, image: sitk.Image, classes) -> None:
    """Output on the input's exact grid, and Dice >= 0.95 per class against the reference away from edges."""
    assert Grid.of(mask) == Grid.of(image), Grid.of(image).differences(Grid.of(mask))
    assert mask.GetPixelID() == sitk.sitkUInt8
    inside = interior(reference_zyx, image.GetSpacing())
    pred, ref = sitk.GetArrayViewFromImage(mask)[inside], reference_zyx[inside]
    present = [c for c in classes if c != 0 and (ref == c).sum() > 50]
    assert len(present) >= 2, f"reference too poor to test anything: classes {present}"
    scores = {c: dice(pred == c, ref == c) for c in present}
    assert min(scores.values()) >= 0.95, f"Dice per class away from edges: {scores}"


# Misalignment: the largest distance (mm) between a class's centre of mass in the pipeline's mask and in the
# reference. Measured on the honest pipeline: <= 0.18 mm for every geometry here; a 1.5 mm shift of the resampled
# voxels against their header moves them 1.4-2.0 mm (in-plane, and along z where slices are <= 4 mm).
MAX_CENTROID_ERROR_MM = 0.75
# The classes measured: the lowest and the highest band. A middle band also appears as a thin shell where linear
# resampling blends its two neighbours (body -> kidney passes through the liver and spleen bands): a partial-volume
# effect of the threshold stand-in that moves those centroids by up to 3 mm with no misalignment at all.
ALIGNMENT_CLASSES = (PHANTOM_CLASSES[1], PHANTOM_CLASSES[-1])


def centroid_mm(labels_zyx: np.ndarray, image: sitk.Image, label: int) -> np.ndarray:
    """Physical (LPS mm) centre of mass of `label`'s voxels on `image`'s grid."""
    centre_xyz = np.argwhere(labels_zyx == label).mean(axis=0)[::-1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return direction @ (np.array(image.GetSpacing()) * centre_xyz) + np.array(image.GetOrigin())


def assert_aligned(mask: sitk.Image, reference_zyx: np.ndarray, image: sitk.Image) -> None:
    """Every measured class sits where the reference has it, to MAX_CENTROID_ERROR_MM: Dice away from edges cannot
    see a shift smaller than the edge band it leaves out."""
    labels_zyx = sitk.GetArrayViewFromImage(mask)
    errors = {c: float(np.linalg.norm(centroid_mm(labels_zyx, image, c) - centroid_mm(reference_zyx, image, c)))
              for c in ALIGNMENT_CLASSES}  # fmt: skip
    assert max(errors.values()) <= MAX_CENTROID_ERROR_MM, f"centroid errors (mm) per class: {errors}"


def band_thresholds(image: sitk.Image, prepared: pipeline.Prepared) -> tuple[float, ...]:
    """Midpoints between the phantom's normalised tissue values: one band per tissue."""
    tissues = np.unique(normalised_like_pipeline(image, prepared))
    assert len(tissues) == len(PHANTOM_CLASSES), f"tissues not separable after normalisation: {tissues}"
    return tuple(((tissues[1:] + tissues[:-1]) / 2).tolist())


def run_standin(image: sitk.Image, tmp_path: Path, thresholds, classes, input_channels: int = 1) -> sitk.Image:
    model = load_model(make_standin_model(tmp_path, "m", input_channels, thresholds, classes), device="cpu")
    return pipeline.predict_case(image, model.predict, model.spec, batch_size=8)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_standin_through_pipeline_matches_thresholds_in_original_space(name, tmp_path):
    image = phantom_ct(*GEOMETRIES[name][:3], dtype=GEOMETRIES[name][3])
    prepared = pipeline.prepare(image, SPEC)
    thresholds = band_thresholds(image, prepared)
    mask = run_standin(image, tmp_path, thresholds, PHANTOM_CLASSES, input_channels=3)
    reference = standin_classes(normalised_like_pipeline(image, prepared), thresholds, PHANTOM_CLASSES)
    assert_matches_reference(mask, reference, image, PHANTOM_CLASSES)
    assert_aligned(mask, reference, image)


@pytest.mark.parametrize("shift_xyz_mm", [(1.5, 0.0, 0.0), (0.0, 1.5, 0.0), (0.0, 0.0, 1.5)])
def test_resampled_voxels_misaligned_from_their_header_fail_the_alignment_check(shift_xyz_mm, tmp_path, monkeypatch):
    """1.5 mm (a fraction of a voxel, which the Dice check away from edges passes) is caught along every axis."""
    image = phantom_ct(*GEOMETRIES["oblique_float64"][:3])  # 2 x 2 x 3.5 mm, oblique
    prepared = pipeline.prepare(image, SPEC)
    thresholds = band_thresholds(image, prepared)
    reference = standin_classes(normalised_like_pipeline(image, prepared), thresholds, PHANTOM_CLASSES)
    honest_resample = geometry.canonical_resample_ct

    def misaligned_resample(*args, **kwargs):
        resampled = honest_resample(*args, **kwargs)
        resampled.SetOrigin(tuple(np.add(resampled.GetOrigin(), shift_xyz_mm)))  # same voxels, header moved
        return resampled

    monkeypatch.setattr(geometry, "canonical_resample_ct", misaligned_resample)
    mask = run_standin(image, tmp_path, thresholds, PHANTOM_CLASSES, input_channels=3)
    assert_matches_reference(mask, reference, image, PHANTOM_CLASSES)  # the old check alone: passes
    with pytest.raises(AssertionError, match="centroid errors"):
        assert_aligned(mask, reference, image)


def test_flipped_pipeline_fails_the_reference_check(tmp_path, monkeypatch):
    image = phantom_ct(*GEOMETRIES["oblique_float64"][:3])
    prepared = pipeline.prepare(image, SPEC)
    thresholds = band_thresholds(image, prepared)
    reference = standin_classes(normalised_like_pipeline(image, prepared), thresholds, PHANTOM_CLASSES)
    honest_predict_volume = pipeline.predict_volume

    def flipped_predict_volume(*args, **kwargs):
        labels_zyx, probabilities = honest_predict_volume(*args, **kwargs)
        flipped = StoredProbabilities(probabilities.row[:, :, ::-1], probabilities.values)
        return labels_zyx[:, :, ::-1], flipped  # left-right swapped before restore

    monkeypatch.setattr(pipeline, "predict_volume", flipped_predict_volume)
    mask = run_standin(image, tmp_path, thresholds, PHANTOM_CLASSES)
    with pytest.raises(AssertionError, match="Dice per class"):
        assert_matches_reference(mask, reference, image, PHANTOM_CLASSES)


@pytest.mark.skipif(not REAL_CT.is_file(), reason=f"real CT not found at {REAL_CT} (only in the shared workspace)")
def test_standin_on_real_ct_matches_thresholds_in_original_space(tmp_path):
    image = sitk.ReadImage(str(REAL_CT))  # int32, RAS header
    mask = run_standin(image, tmp_path, THRESHOLDS, CLASSES)
    reference = standin_classes(normalised_like_pipeline(image, pipeline.prepare(image, SPEC)), THRESHOLDS, CLASSES)
    assert_matches_reference(mask, reference, image, CLASSES)


@pytest.mark.parametrize("name", ["identity_int16", "flipped_ras_int32", "permuted_sagittal_float32"])
def test_canonical_volume_has_right_organs_at_low_x_and_inferior_at_low_z(name):
    image = phantom_ct(*GEOMETRIES[name][:3], dtype=GEOMETRIES[name][3])
    prepared = pipeline.prepare(image, SPEC)
    hu_zyx = sitk.GetArrayViewFromImage(prepared.resampled)
    liver_zyx = np.argwhere(np.abs(hu_zyx - 300) < 1).mean(axis=0)
    spleen_zyx = np.argwhere(np.abs(hu_zyx - 600) < 1).mean(axis=0)
    kidney_zyx = np.argwhere(np.abs(hu_zyx - 900) < 1).mean(axis=0)
    assert liver_zyx[2] < spleen_zyx[2], "patient right (liver) must be at low axis-2 index"
    assert kidney_zyx[0] < spleen_zyx[0], "inferior (kidney) must be at low axis-0 index"
    assert spleen_zyx[1] < kidney_zyx[1], "anterior (spleen) must be at low axis-1 index"
    assert prepared.vol_zyx.dtype == np.float32 and prepared.vol_zyx.min() >= 0 and prepared.vol_zyx.max() <= 1
    assert prepared.resampled.GetSpacing() == SPEC.spacing_xyz_mm


def test_label_on_prepared_puts_labels_where_the_image_has_them():
    image = phantom_ct(*GEOMETRIES["oblique_float64"][:3])
    label = sitk.Cast(sitk.BinaryThreshold(image, 250, 350, 3, 0), sitk.sitkUInt8)  # the "liver" as label 3
    prepared = pipeline.prepare(image, SPEC)
    label_zyx = pipeline.label_on_prepared(label, prepared)
    hu_zyx = sitk.GetArrayViewFromImage(prepared.resampled)
    assert label_zyx.shape == prepared.vol_zyx.shape and label_zyx.dtype == np.uint8
    assert dice(label_zyx == 3, np.abs(hu_zyx - 300) < 1) > 0.9


def test_label_on_another_grid_is_refused():
    image = phantom_ct(*GEOMETRIES["identity_int16"][:3])
    label = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(image)
    label.SetOrigin(tuple(np.add(image.GetOrigin(), (0.0, 0.0, 5.0))))
    with pytest.raises(GridMismatchError, match="origin_xyz"):
        pipeline.label_on_prepared(label, pipeline.prepare(image, SPEC))


def test_restore_raises_when_the_grid_differs(monkeypatch):
    image = phantom_ct(*GEOMETRIES["identity_int16"][:3])
    prepared = pipeline.prepare(image, SPEC)
    labels_zyx = np.zeros(prepared.vol_zyx.shape, np.uint8)
    assert Grid.of(pipeline.restore(labels_zyx, prepared, method="nearest")) == Grid.of(image)
    honest = geometry.labels_to_image_grid

    def shifted(*args):
        out = honest(*args)
        out.SetOrigin(tuple(np.add(out.GetOrigin(), (0.0, 0.001, 0.0))))
        return out

    monkeypatch.setattr(geometry, "labels_to_image_grid", shifted)
    with pytest.raises(GridMismatchError, match="origin"):
        pipeline.restore(labels_zyx, prepared, method="nearest")


@pytest.mark.parametrize("name", GEOMETRIES)
def test_fast_restore_equals_itk_nearest_resampling(name):
    size_xyz, spacing_xyz, direction, _ = GEOMETRIES[name]
    # spacings off round ratios to 1.5/2.5 mm: at exact ties (equidistant voxels) either label is nearest
    image = phantom_ct(size_xyz, tuple(s * 1.0373 for s in spacing_xyz), direction)
    prepared = pipeline.prepare(image, SPEC)
    labels_zyx = (prepared.vol_zyx * 13).astype(np.uint8)  # many label edges
    fast = pipeline.restore(labels_zyx, prepared, method="nearest")
    itk = geometry.labels_to_grid(geometry.image_from_zyx(labels_zyx, prepared.resampled), image)
    same = sitk.GetArrayViewFromImage(fast) == sitk.GetArrayViewFromImage(itk)
    assert same.all(), f"{same.mean():.6f} of voxels agree"


@pytest.mark.parametrize("name", GEOMETRIES)
def test_fast_canonical_resampling_equals_dicomorient_then_itk_linear(name):
    size_xyz, spacing_xyz, direction, dtype = GEOMETRIES[name]
    image = phantom_ct(size_xyz, tuple(s * 1.0373 for s in spacing_xyz), direction, dtype)
    canonical = geometry.to_canonical(image)
    assert Grid.of(canonical).differences(geometry.canonical_grid(image), atol=1e-9) == []
    fast = geometry.canonical_resample_ct(image, SPEC.spacing_xyz_mm)
    itk = geometry.resample_ct(canonical, SPEC.spacing_xyz_mm)
    assert Grid.of(fast).differences(Grid.of(itk), atol=1e-9) == []
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(fast), sitk.GetArrayViewFromImage(itk), atol=0.05)


@pytest.mark.parametrize("slice_factor", [1.0, 0.99])  # the model's slice spacing; 1 % off it: as many slices
@pytest.mark.parametrize("name", ["identity_int16", "flipped_ras_int32", "permuted_sagittal_float32"])
def test_fast_canonical_resampling_equals_itk_where_the_input_has_about_the_models_slice_spacing(name, slice_factor):
    size_xyz, spacing_xyz, direction, dtype = GEOMETRIES[name]
    slice_axis = int(np.abs(np.asarray(direction)[2]).argmax())  # the input axis along z (LPS)
    spacing = [s * 1.0373 for s in spacing_xyz]
    spacing[slice_axis] = SPEC.spacing_xyz_mm[2] * slice_factor
    image = phantom_ct(size_xyz, tuple(spacing), direction, dtype)
    fast = geometry.canonical_resample_ct(image, SPEC.spacing_xyz_mm)
    itk = geometry.resample_ct(geometry.to_canonical(image), SPEC.spacing_xyz_mm)
    assert Grid.of(fast).differences(Grid.of(itk), atol=1e-9) == []
    assert fast.GetSize()[2] == image.GetSize()[slice_axis]
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(fast), sitk.GetArrayViewFromImage(itk), atol=0.05)


def test_canonical_orientation_is_dicomorient_lps():
    image = phantom_ct(*GEOMETRIES["permuted_sagittal_float32"][:3])
    canonical = geometry.to_canonical(image)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(canonical.GetDirection()) == "LPS"


def _argmax_threads(monkeypatch, network_s: float, reduce_s: float) -> list[bool]:
    """For each argmax call of predict_slices: whether it ran in the calling thread, with a network and a
    reduction (the boundary store) that take the given seconds per batch."""
    import threading
    import time

    from flare_infer import predictor

    in_caller, caller, argmax, add = [], threading.get_ident(), predictor.argmax_planes, predictor._BoundaryStore.add

    def recorded_argmax(scores):
        in_caller.append(threading.get_ident() == caller)
        return argmax(scores)

    def slow_add(self, *args):
        time.sleep(reduce_s)
        add(self, *args)

    def network(batch):
        time.sleep(network_s)
        return np.repeat(batch[:, :1], NUM_CLASSES, axis=1) * np.arange(NUM_CLASSES, dtype=np.float32)[:, None, None]

    with monkeypatch.context() as patch:
        patch.setattr(predictor, "argmax_planes", recorded_argmax)
        patch.setattr(predictor._BoundaryStore, "add", slow_add)
        vol = np.random.default_rng(0).random((24, 16, 16)).astype(np.float32)
        predict_slices(network, vol, SliceConfig(batch_size=4, outputs=("labels", "probabilities")))
    return in_caller


def test_the_calling_thread_shares_the_argmax_only_while_the_worker_is_behind(monkeypatch):
    behind = _argmax_threads(monkeypatch, network_s=0.0, reduce_s=0.05)  # a near-free network: the worker is busy
    assert sum(behind) >= 4  # most batches after the first: half of their argmax here
    ahead = _argmax_threads(monkeypatch, network_s=0.05, reduce_s=0.0)  # a slow network: the worker waits
    assert not any(ahead)


def test_gather_batch_repeats_edge_slices():
    vol_zyx = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    batch = gather_batch(vol_zyx, np.array([0, 3]), input_channels=5)  # (2, 5, 2, 3)
    assert batch[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [1, 2, 3, 3, 3]]


def test_predict_slices_pads_to_16_and_pads_the_last_batch_when_fixed():
    shapes = []

    def record(batch):
        shapes.append(batch.shape)
        scores = np.zeros((batch.shape[0], 14, *batch.shape[2:]), np.float32)
        scores[:, 5] = batch[:, 1]  # class 5 where the centre slice is bright
        return scores

    vol_zyx = np.zeros((5, 20, 33), np.float32)
    vol_zyx[2, 3, 4] = 1.0
    labels, confidence = predict_slices(record, vol_zyx, SliceConfig(input_channels=3, batch_size=2, fixed_batch=True))
    assert shapes == [(2, 3, 32, 48)] * 3
    assert labels.shape == (5, 20, 33) and labels[2, 3, 4] == 5 and labels.sum() == 5
    assert confidence.dtype == np.float16 and 0 < confidence.min() and confidence.max() <= 1


def test_predict_slices_rejects_wrong_score_shape():
    with pytest.raises(ValueError, match=r"\(N=2, 14, H, W\)"):
        predict_slices(lambda b: np.zeros((2, 13, 16, 16), np.float32), np.zeros((2, 9, 9), np.float32), SliceConfig())


def test_confidence_is_max_softmax_probability():
    scores = np.array([2.0, 1.0, 0.0] + [-np.inf] * 11, np.float32).reshape(1, 14, 1, 1)
    labels, confidence = labels_and_confidence(scores, "logits")
    expected = np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 1.0)
    assert labels.item() == 0 and confidence.item() == pytest.approx(expected, abs=1e-3)


def test_lcc_postprocess_keeps_the_largest_component_per_organ():
    labels_zyx = np.zeros((6, 10, 10), np.uint8)
    labels_zyx[1:4, 1:5, 1:5] = 1  # large liver
    labels_zyx[5, 8, 8] = 1  # a stray liver voxel
    labels_zyx[1:3, 6:9, 6:9] = 3  # spleen, one component: kept whole
    cleaned = apply_postprocess(labels_zyx, "lcc")
    assert (cleaned == 1).sum() == 48 and cleaned[5, 8, 8] == 0 and (cleaned == 3).sum() == 18
    assert apply_postprocess(labels_zyx, "none") is labels_zyx
