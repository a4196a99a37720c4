"""Restoring onto the input's grid: `linear` (class probabilities interpolated, then argmax) and `nearest`.

    pytest tests/test_restore.py -x -q

The reference for `linear` is the straightforward computation: every class's probability volume, uncropped with
background certain outside the body's box, resampled by SimpleITK (linear, in physical space) onto the input,
then argmax. The slab-by-slab, cells-and-candidates path must give the same labels voxel for voxel (allowed to
differ only where the reference's two best classes tie within 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer import geometry, pipeline, restore
from flare_infer.geometry import Grid, GridMismatchError
from flare_infer.labels import NUM_CLASSES
from flare_infer.predictor import SliceConfig, StoredProbabilities, predict_slices, stored_rows, top_two
from flare_infer.spec import ModelSpec

SPEC = ModelSpec(spacing_xyz_mm=(3.0, 3.0, 4.0))
TIE = 1e-5


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


GEOMETRIES = {  # name: (size_xyz, spacing_xyz, direction); off-round spacings, off-centre origins
    "identity": ((70, 60, 24), (1.13, 1.07, 2.1), np.eye(3)),
    "flipped_ras": ((70, 60, 24), (1.13, 1.07, 2.1), np.diag([-1.0, -1.0, 1.0])),
    "permuted_sagittal": ((24, 60, 70), (2.1, 1.07, 1.13), np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], float)),
    "oblique": ((66, 58, 22), (1.21, 1.17, 2.3), _rotation(12.0, 8.0)),
    "slices_10mm": ((64, 56, 6), (1.3, 1.3, 10.0), np.diag([1.0, -1.0, -1.0])),
}


def blank_image(size_xyz, spacing_xyz, direction, value: float = -1000.0) -> sitk.Image:
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkInt16)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    extent = np.asarray(direction, float) @ (np.asarray(spacing_xyz) * (np.asarray(size_xyz) - 1))
    image.SetOrigin((np.array([12.0, -40.0, 310.0]) - extent / 2).tolist())
    if value:
        image += value
    return image


def body_image(size_xyz, spacing_xyz, direction) -> sitk.Image:
    """Air around an elliptic cylinder of soft tissue (0 HU) along the patient's z, on any grid."""
    image = blank_image(size_xyz, spacing_xyz, direction, value=0.0)
    p = physical_points_zyx(Grid.of(image))
    inside = (p[..., 0] - 12.0) ** 2 / 70.0**2 + (p[..., 1] + 40.0) ** 2 / 50.0**2 <= 1
    hu = np.where(inside, 40.0 + 200.0 * np.sin(p[..., 0] / 9.0) * np.cos(p[..., 1] / 7.0), -1000.0)
    out = sitk.GetImageFromArray(hu.astype(np.int16))
    out.CopyInformation(image)
    return out


def physical_points_zyx(grid: Grid, box=None) -> np.ndarray:
    """(Z, Y, X, 3) physical coordinates (x, y, z mm) of the voxel centres of `grid` (or of its `box`)."""
    box = box or tuple(slice(0, n) for n in grid.size_xyz[::-1])
    k, j, i = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    index_xyz = np.stack([i, j, k], axis=-1).astype(float)
    d = np.asarray(grid.direction, float).reshape(3, 3)
    return np.asarray(grid.origin_xyz) + (index_xyz * np.asarray(grid.spacing_xyz)) @ d.T


def prepared_with_box(image: sitk.Image, box_zyx=None) -> pipeline.Prepared:
    """Prepared with the real resampled grid and a chosen body box (the body finder is not under test here)."""
    resampled = geometry.canonical_resample_ct(image, SPEC.spacing_xyz_mm)
    shape = tuple(resampled.GetSize())[::-1]
    box = box_zyx or tuple(slice(0, n) for n in shape)
    vol = np.zeros([b.stop - b.start for b in box], np.float32)
    return pipeline.Prepared(image=image, resampled=resampled, vol_zyx=vol, box_zyx=box)


def smooth_probabilities(points: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """float16 (..., 14) softmax of smooth logits of position (4 classes meet), plus noise (general cells)."""
    logits = np.full((*points.shape[:-1], NUM_CLASSES), -8.0, np.float32)
    x, y, z = points[..., 0] - 12.0, points[..., 1] + 40.0, points[..., 2] - 310.0
    logits[..., 0] = 0.0
    logits[..., 1] = (12.0 - np.hypot(x + 8.0, y)) / 3.0
    logits[..., 3] = (10.0 - np.hypot(x - 10.0, z)) / 3.0
    logits[..., 13] = (y - 5.0) / 4.0 - 1.0
    logits += noise * rng.standard_normal(logits.shape).astype(np.float32)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float16)


def argmax16(probs: np.ndarray) -> np.ndarray:
    return probs.astype(np.float32).argmax(axis=-1).astype(np.uint8)


def itk_reference(probs_zyxc: np.ndarray, prepared: pipeline.Prepared) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the gap between the two best classes: each class uncropped (background certain outside the
    box) and resampled by SimpleITK, linear, onto the input; argmax."""
    best = second = labels = None
    for k in range(NUM_CLASSES):
        full = np.full(prepared.full_shape_zyx, 1.0 if k == 0 else 0.0, np.float32)
        full[prepared.box_zyx] = probs_zyxc[..., k]
        image = sitk.GetImageFromArray(full)
        image.CopyInformation(prepared.resampled)
        outside = 1.0 if k == 0 else 0.0
        p = sitk.GetArrayFromImage(
            sitk.Resample(image, prepared.image, sitk.Transform(), sitk.sitkLinear, outside, sitk.sitkFloat64)
        )
        if best is None:
            best, second, labels = p, np.full(p.shape, -np.inf), np.zeros(p.shape, np.uint8)
            continue
        higher = p > best
        second = np.where(higher, best, np.maximum(second, p))
        labels[higher] = k
        best = np.where(higher, p, best)
    return labels, best - second


def restore_linear(probs: np.ndarray, prepared: pipeline.Prepared) -> sitk.Image:
    return pipeline.restore(argmax16(probs), prepared, StoredProbabilities.dense(probs), method="linear")


# ------------------------------------------------------------------------------------------------------ accuracy
def test_linear_puts_a_smooth_boundary_within_a_quarter_voxel_where_nearest_cannot():
    image = blank_image((120, 110, 36), (0.8, 0.8, 1.0), np.diag([-1.0, -1.0, 1.0]))
    prepared = prepared_with_box(image)
    normal = np.array([1.0, 0.6, 0.3]) / np.linalg.norm([1.0, 0.6, 0.3])
    centre = np.array([12.0, -40.0, 310.0])

    def distance(points):  # signed distance (mm) to an oblique plane: the organ is on its positive side
        return (points - centre) @ normal

    ramp = np.clip(0.5 + distance(physical_points_zyx(Grid.of(prepared.resampled))) / 20.0, 0.0, 1.0)
    probs = np.zeros((*ramp.shape, NUM_CLASSES), np.float16)
    probs[..., 1], probs[..., 0] = ramp, 1.0 - ramp  # linear across the boundary: interpolation is exact there
    truth_d = distance(physical_points_zyx(Grid.of(image)))
    # away from the field of view's edge (within half a coarse voxel of it the grid's edge values are clamped)
    p = physical_points_zyx(Grid.of(image)) - np.asarray(image.GetOrigin())
    extent = np.abs(np.asarray(image.GetDirection()).reshape(3, 3) @ (np.asarray(image.GetSpacing()) * 119))
    interior = np.all((np.abs(p) > 5.0) & (np.abs(p) < np.maximum(extent, [1, 1, 35]) - 5.0), axis=-1)
    quarter_voxel = 0.25 * min(SPEC.spacing_xyz_mm)
    far = interior & (np.abs(truth_d) > quarter_voxel)
    truth = (truth_d > 0).astype(np.uint8)
    linear = sitk.GetArrayFromImage(restore_linear(probs, prepared))
    nearest = sitk.GetArrayFromImage(pipeline.restore(argmax16(probs), prepared, method="nearest"))
    assert far.sum() > 100_000
    assert (linear[far] == truth[far]).all(), f"{(linear[far] != truth[far]).sum()} voxels wrong beyond 0.75 mm"
    wrong_nearest = far & (nearest != truth)
    assert wrong_nearest.sum() > 1000 and np.abs(truth_d[wrong_nearest]).max() > 1.0  # staircase up to ~2 mm


# -------------------------------------------------------------------------------------- equal to the reference
@pytest.mark.parametrize(
    "name, noise", [(name, 0.6) for name in GEOMETRIES] + [("identity", 2.0), ("oblique", 2.0)]
)  # noise 2: three or more candidates in many cells, also at the box's edge
def test_slab_and_shortcut_path_equals_full_volume_interpolation(name, noise):
    size, spacing, direction = GEOMETRIES[name]
    image = blank_image(size, spacing, direction)
    shape = tuple(geometry.canonical_resample_ct(image, SPEC.spacing_xyz_mm).GetSize())[::-1]
    box = (slice(0, shape[0]), slice(2, shape[1] - 1), slice(1, shape[2] - 3))  # touches the edge on one axis
    prepared = prepared_with_box(image, box)
    points = physical_points_zyx(Grid.of(prepared.resampled), box)
    probs = smooth_probabilities(points, np.random.default_rng(0), noise=noise)
    labels = argmax16(probs)
    cells = restore.cell_labels(labels)
    where = np.flatnonzero(cells == restore.MIXED)
    stored = StoredProbabilities.dense(probs)
    rows = restore.CornerRows.of(stored, labels, (slice(None),) * 3, labels.shape)
    corner_rows = rows(where)
    table = restore.RowTable.of(stored.table())
    settled = restore.two_label_cells(table, corner_rows)[2]
    general = restore.candidates(table.values[corner_rows])[2]
    # every path runs: uniform cells, two-candidate cells, cells of three or more; two labels settled from the
    # labels' own probabilities, and the others from all 14
    assert (cells != restore.MIXED).sum() > 100 and (~general).sum() > 100 and general.sum() > 10
    assert settled.sum() > 100 and (~settled & ~general).sum() > 10
    got = sitk.GetArrayFromImage(restore_linear(probs, prepared))
    expected, gap = itk_reference(probs, prepared)
    differ = got != expected
    assert not (differ & (gap > TIE)).any(), f"{(differ & (gap > TIE)).sum()} of {got.size} voxels differ"


def test_the_stores_labels_and_second_largest_values_are_those_of_the_table_rows():
    values = np.random.default_rng(0).integers(0, 4, (5000, NUM_CLASSES)).astype(np.float32) / 3  # many ties
    label, second = top_two(np.ascontiguousarray(values.T))
    table = restore.RowTable.of(values)
    assert (values == values.max(axis=1, keepdims=True)).sum(axis=1).max() > 1
    np.testing.assert_array_equal(label, table.label)
    np.testing.assert_array_equal(second, table.second)


def test_the_restores_table_from_the_stores_top_two_is_the_table_computed_afresh():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (6, NUM_CLASSES, 16, 16)).astype(np.float32)
    labels, stored = predict_slices(lambda batch: logits[batch[:, 0, 0, 0].astype(int)],
                                    np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 16, 16)),
                                    SliceConfig(batch_size=4, outputs=("labels", "probabilities")))  # fmt: skip
    removed = labels.copy()
    removed[2:4] = 0  # as post-processing removing components there
    restore.drop_removed(stored, labels, removed)
    assert stored.top_two is not None and len(stored.values) > 100
    given, afresh = restore.RowTable.of_stored(stored), restore.RowTable.of(stored.table())
    np.testing.assert_array_equal(given.label, afresh.label)
    np.testing.assert_array_equal(given.second, afresh.second)
    # the store's table is its values, changed in place by drop_removed, and the certain rows, without a copy
    np.testing.assert_array_equal(stored.table(), np.concatenate([stored.values, np.eye(NUM_CLASSES)]))
    assert np.shares_memory(stored.table(), stored.values)


# ------------------------------------------------------------------------------------------------- exact grids
def smooth_batch(batch: np.ndarray) -> np.ndarray:
    """A numpy stand-in network: smooth logits of the centre channel's intensity (background, liver, spleen)."""
    x = batch[:, batch.shape[1] // 2]
    scores = np.full((batch.shape[0], NUM_CLASSES, *batch.shape[2:]), -20.0, np.float32)
    scores[:, 0] = 8.0 * (0.3 - x)
    scores[:, 1] = 0.0
    scores[:, 3] = 8.0 * (x - 0.62)
    return scores


@pytest.mark.parametrize("name", GEOMETRIES)
def test_oblique_flipped_and_permuted_inputs_keep_their_exact_grid(name):
    image = body_image(*GEOMETRIES[name])
    masks = {
        m: pipeline.predict_case(image, smooth_batch, SPEC, batch_size=8, restore_method=m)
        for m in ("linear", "nearest")
    }
    for mask in masks.values():
        assert Grid.of(mask) == Grid.of(image)
    agree = sitk.GetArrayViewFromImage(masks["linear"]) == sitk.GetArrayViewFromImage(masks["nearest"])
    assert agree.mean() > 0.9  # the same labels, placed differently only near boundaries


@pytest.mark.parametrize(
    "size, spacing",
    [((90, 80, 1), (1.1, 1.1, 2.5)), ((1024, 1024, 1), (0.4, 0.4, 2.0)), ((80, 70, 5), (1.4, 1.4, 10.0))],
    ids=["one_slice", "1024x1024", "slices_10mm_coarser_than_the_model"],
)
def test_unusual_ct_shapes_work_under_linear_with_the_exact_grid(size, spacing):
    image = body_image(size, spacing, np.diag([1.0, -1.0, 1.0]))
    prepared = pipeline.prepare(image, SPEC)
    labels, probs = pipeline.predict_volume(
        prepared, smooth_batch, SPEC, batch_size=8, outputs=("labels", "probabilities")
    )
    mask = pipeline.restore(labels, prepared, probs, method="linear")
    assert Grid.of(mask) == Grid.of(image)
    expected, gap = itk_reference(probs.to_dense(labels), prepared)
    got = sitk.GetArrayFromImage(mask)
    assert len(np.unique(got)) >= 2
    assert not ((got != expected) & (gap > TIE)).any()


def test_an_empty_body_box_gives_all_background():
    image = blank_image((60, 50, 8), (1.1, 1.1, 3.0), np.diag([-1.0, -1.0, 1.0]))  # all air: no body
    prepared = pipeline.prepare(image, SPEC)
    assert prepared.vol_zyx.size == 0
    for method in ("linear", "nearest"):
        mask = pipeline.predict_case(image, smooth_batch, SPEC, batch_size=8, restore_method=method)
        assert Grid.of(mask) == Grid.of(image) and not sitk.GetArrayViewFromImage(mask).any()


# ---------------------------------------------------------------------------------------------- the grid check
@pytest.mark.parametrize("wrong", ["half_voxel_shift", "flipped_axis", "swapped_axes"])
@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_a_wrong_voxel_map_is_refused(monkeypatch, wrong, method):
    image = body_image((70, 60, 24), (1.13, 1.07, 2.1), np.diag([-1.0, -1.0, 1.0]))
    prepared = pipeline.prepare(image, SPEC)
    labels, probs = pipeline.predict_volume(
        prepared, smooth_batch, SPEC, batch_size=8, outputs=("labels", "probabilities")
    )
    honest = geometry.voxel_map

    def wrong_map(*args):
        v = honest(*args)
        if wrong == "half_voxel_shift":
            start = (v.start_mm[0] + 0.5 * v.spacing_mm[0], *v.start_mm[1:])
            return geometry.VoxelMap(v.axes, start, v.step_mm, v.spacing_mm, v.grid_size, v.image_size_xyz)
        if wrong == "flipped_axis":
            step = (-v.step_mm[0], *v.step_mm[1:])
            return geometry.VoxelMap(v.axes, v.start_mm, step, v.spacing_mm, v.grid_size, v.image_size_xyz)
        fields = (v.axes, v.start_mm, v.step_mm, v.spacing_mm, v.grid_size)  # x and y swapped
        return geometry.VoxelMap(*[(f[1], f[0], f[2]) for f in fields], v.image_size_xyz)

    assert Grid.of(pipeline.restore(labels, prepared, probs, method=method)) == Grid.of(image)
    monkeypatch.setattr(geometry, "voxel_map", wrong_map)
    monkeypatch.setattr(restore, "voxel_map", wrong_map)
    with pytest.raises(GridMismatchError, match="does not lie on the input's grid"):
        pipeline.restore(labels, prepared, probs, method=method)


# ------------------------------------------------------------------------------------------ what is computed
def dense_probabilities(batch_fn, vol: np.ndarray) -> np.ndarray:
    """float32 (Z, Y, X, 14) at every voxel, computed as the predictor computes its stored voxels' values."""
    scores = batch_fn(vol[:, None])  # (Z, 14, Y, X)
    by_class = stored_rows(scores, np.arange(vol.size), vol.shape[1:], "logits")  # (14, Z * Y * X)
    return by_class.T.reshape(*vol.shape, NUM_CLASSES)


def test_predict_computes_only_the_outputs_asked_for():
    vol = np.random.default_rng(0).uniform(0, 1, (5, 20, 24)).astype(np.float32)
    vol[:, :10] = 0.0  # one label there: no probabilities stored inside it
    (labels,) = predict_slices(smooth_batch, vol, SliceConfig(outputs=("labels",)))
    labels2, probs = predict_slices(smooth_batch, vol, SliceConfig(outputs=("labels", "probabilities")))
    labels3, confidence = predict_slices(smooth_batch, vol, SliceConfig())  # training's pseudo-labels
    assert isinstance(probs, StoredProbabilities) and probs.shape == vol.shape and probs.values.dtype == np.float32
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(labels, labels3)
    stored = probs.row >= 0
    assert 0 < stored.sum() < stored.size
    np.testing.assert_array_equal(labels2[stored], argmax16(probs.values[probs.row[stored]]))
    np.testing.assert_allclose(probs.values.sum(-1), 1, atol=1e-5)
    full = dense_probabilities(smooth_batch, vol)
    np.testing.assert_allclose(probs.values[probs.row[stored]], full[stored], atol=1e-6)
    np.testing.assert_allclose(confidence.astype(np.float32), full.max(-1), atol=2e-3)
    with pytest.raises(ValueError, match="outputs must be"):
        SliceConfig(outputs=("labels", "logits"))


@pytest.mark.parametrize("failing_batch", [0, 2])  # a middle batch; the last one (reduced after the loop)
def test_an_error_while_reducing_a_batch_reaches_the_caller(monkeypatch, failing_batch):
    from flare_infer import predictor

    calls = []

    def argmax_failing_once(scores):
        calls.append(len(scores))
        if len(calls) == failing_batch + 1:
            raise FloatingPointError("reduction failed")
        return argmax16(scores.transpose(0, 2, 3, 1))

    monkeypatch.setattr(predictor, "argmax_planes", argmax_failing_once)
    vol = np.random.default_rng(0).uniform(0, 1, (7, 8, 8)).astype(np.float32)  # batches of 3: 3 + 3 + 1
    with pytest.raises(FloatingPointError, match="reduction failed"):
        predict_slices(smooth_batch, vol, SliceConfig(batch_size=3, outputs=("labels",)))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_probabilities_are_stored_exactly_where_a_26_neighbour_has_another_label(batch_size):
    vol = np.random.default_rng(1).uniform(0, 1, (10, 12, 9)).astype(np.float32)
    vol[:, :6] = 0.0  # a region of one label: no neighbour of another, nothing stored there
    labels, probs = predict_slices(smooth_batch, vol, SliceConfig(batch_size=batch_size,
                                                                  outputs=("labels", "probabilities")))  # fmt: skip
    padded = np.pad(labels, 1)  # label 0 beyond the volume, as the restore's padded box
    z, y, x = labels.shape
    expected = np.zeros(labels.shape, bool)
    for dz, dy, dx in np.ndindex(3, 3, 3):
        expected |= padded[dz : dz + z, dy : dy + y, dx : dx + x] != labels
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(probs.row >= 0, expected)
    np.testing.assert_array_equal(np.sort(probs.row[expected]), np.arange(expected.sum()))  # one row each


@pytest.mark.parametrize("noise", [0.0, 0.04])
def test_restoring_the_stored_boundary_probabilities_equals_restoring_every_voxels(noise):
    image = body_image((70, 60, 24), (1.13, 1.07, 2.1), np.diag([-1.0, -1.0, 1.0]))
    prepared = pipeline.prepare(image, SPEC)
    noisy = np.random.default_rng(2).normal(0, noise, prepared.vol_zyx.shape).astype(np.float32)  # many mixed cells
    prepared = pipeline.Prepared(prepared.image, prepared.resampled, prepared.vol_zyx + noisy, prepared.box_zyx)
    labels, stored = pipeline.predict_volume(prepared, smooth_batch, SPEC, batch_size=5,
                                             outputs=("labels", "probabilities"))  # fmt: skip
    full = dense_probabilities(smooth_batch, prepared.vol_zyx)
    assert 0.02 < (stored.row >= 0).mean() < 0.9
    np.testing.assert_array_equal(labels, argmax16(full))
    got = sitk.GetArrayFromImage(pipeline.restore(labels, prepared, stored, method="linear"))
    every = sitk.GetArrayFromImage(pipeline.restore(labels, prepared, StoredProbabilities.dense(full), method="linear"))
    np.testing.assert_array_equal(got, every)
    assert len(np.unique(got)) == 3


def test_a_voxel_without_stored_probabilities_is_certain_of_its_label():
    labels = np.array([[[0, 3], [7, 7]]], np.uint8)  # (1, 2, 2)
    row = np.array([[[-1, 0], [-1, -1]]], np.int32)  # only the voxel of label 3 stored
    values = np.full((1, NUM_CLASSES), 0.05, np.float32)
    got = StoredProbabilities(row, values).to_dense(labels).reshape(4, NUM_CLASSES)
    np.testing.assert_array_equal(got[1], values[0])
    for voxel, label in ((0, 0), (2, 7), (3, 7)):
        np.testing.assert_array_equal(got[voxel], np.eye(NUM_CLASSES, dtype=np.float32)[label])


def dense_corner_rows(probs: StoredProbabilities, labels, box_in_region, region_shape) -> np.ndarray:
    """The reference: every voxel of the padded box gets its table row (certain background outside the box), the
    last plane repeated along each axis; a cell's 8 corners are then 8 shifted reads."""
    rows = np.full(region_shape, len(probs.values), np.int32)
    rows[box_in_region] = probs.table_rows(labels)
    return np.pad(rows, [(0, 1)] * 3, mode="edge")


@pytest.mark.parametrize("start, stop", [((1, 2, 1), (6, 8, 8)), ((0, 0, 0), (7, 9, 10))])  # inside; whole region
def test_corner_rows_of_chosen_cells_equal_the_rows_of_the_whole_padded_box(start, stop):
    rng = np.random.default_rng(3)
    region_shape = (7, 9, 10)
    box_in_region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    labels = rng.integers(0, NUM_CLASSES, [b - a for a, b in zip(start, stop, strict=True)]).astype(np.uint8)
    row = np.where(rng.random(labels.shape) < 0.5, -1, 0).astype(np.int32)
    row[row == 0] = np.arange((row == 0).sum(), dtype=np.int32)
    probs = StoredProbabilities(row, rng.random(((row >= 0).sum(), NUM_CLASSES)).astype(np.float32))
    where = np.flatnonzero(rng.random(region_shape) < 0.6)  # cells at every edge of the padded box among them
    got = restore.CornerRows.of(probs, labels, box_in_region, region_shape)(where)
    dense = dense_corner_rows(probs, labels, box_in_region, region_shape)
    z, y, x = np.unravel_index(where, region_shape)
    expected = np.stack([dense[z + dz, y + dy, x + dx] for dz, dy, dx in restore._CORNERS])
    np.testing.assert_array_equal(got, expected)
    assert (got == len(probs.values)).any() and (got > len(probs.values)).any() and (got < len(probs.values)).any()


def test_mixed_cells_are_computed_as_thick_as_their_own_voxels_not_the_clamped_edge_cells():
    # slice spacing = the model's: one input slice per cell along z, but the clamped last cell holds two
    n = 12
    vmap = geometry.VoxelMap((0, 1, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 2.5), (1.0, 1.0, 2.5), (4, 4, n), (4, 4, n))
    along_z = restore.cell_axis(vmap, 2, slice(0, n))
    voxels = restore.cell_voxels(along_z, n, 16)
    assert voxels.valid.shape[1] == 2 and voxels.valid.sum(axis=1).tolist() == [1] * (n - 2) + [2, 0]
    narrow, fits = restore.narrowed(voxels)
    assert narrow.valid.shape[1] == 1 and fits.tolist() == [True] * (n - 2) + [False, True]
    np.testing.assert_array_equal(narrow.offset[fits], voxels.offset[fits, :1])
    np.testing.assert_array_equal(narrow.weight[fits], voxels.weight[fits, :1])


def test_labels_are_the_argmax_of_the_stored_probabilities_at_ties():
    scores = np.full((3, NUM_CLASSES, 16, 16), -30.0, np.float32)
    scores[:, 0] = 0.0
    scores[:, 1] = np.float32(1e-9)  # class 1 wins in the scores, ties with class 0 after the softmax (exp(-1e-9) = 1)
    scores[:, 5, :, 8:] = 40.0  # class 5 on the right half: the column beside it holds boundary voxels
    labels, probs = predict_slices(lambda b: scores[: len(b)], np.zeros((3, 16, 16), np.float32),
                                   SliceConfig(outputs=("labels", "probabilities")))  # fmt: skip
    tie = probs.values[probs.row[1, 5, 7]]
    assert tie[0] == tie[1] and (labels[:, :, 7] == 0).all()  # stored: the stored values' argmax
    assert (probs.row[1, 1:15, 1:6] < 0).all() and (labels[1, 1:15, 1:6] == 1).all()  # inside: the scores' argmax
    assert (labels[:, :, 8:] == 5).all()


def test_components_removed_by_post_processing_do_not_come_back_by_interpolation():
    image = blank_image((70, 60, 24), (1.13, 1.07, 2.1), np.eye(3))
    base = prepared_with_box(image)
    shape = base.vol_zyx.shape
    # the slice index as the "intensity", so that a stand-in network can return this case's scores slice by slice
    prepared = pipeline.Prepared(
        image, base.resampled, np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape).copy(),
        base.box_zyx,
    )  # fmt: skip
    logits = np.full((*shape, NUM_CLASSES), -10.0, np.float32)
    logits[..., 0] = 0
    logits[2:6, 4:12, 4:11, 1] = 5  # the liver's large component
    logits[2:6, 14:20, 14:20, 3] = 5  # the spleen
    without_small = logits.copy()
    logits[2:4, 14:16, 12:14, 1] = 5  # a small liver component touching the spleen: lcc removes it

    def network_of(scores):
        def network(batch):  # (N, 1, H16, W16) -> (N, 14, H16, W16): this case's slices, by their index
            out = np.zeros((batch.shape[0], NUM_CLASSES, *batch.shape[2:]), np.float32)
            out[:, :, : shape[1], : shape[2]] = scores[batch[:, 0, 0, 0].astype(int)].transpose(0, 3, 1, 2)
            return out

        return network

    def mask(scores, postprocess):
        out = pipeline._infer_and_restore(
            prepared, network_of(scores), SPEC, batch_size=4, postprocess=postprocess, fixed_batch=False,
            restore_method="linear", timed=lambda stage: None,
        )  # fmt: skip
        return sitk.GetArrayFromImage(out)

    cleaned, kept = mask(logits, "lcc"), mask(logits, "none")
    # as if the small component had never been predicted, also in the cells it shares with the spleen
    np.testing.assert_array_equal(cleaned, mask(without_small, "none"))
    assert (kept == 1).sum() > (cleaned == 1).sum() + 50 and (cleaned == 1).sum() > 1000


def test_linear_restore_without_probabilities_says_what_to_pass():
    image = blank_image((40, 30, 8), (1.1, 1.1, 3.0), np.eye(3))
    prepared = prepared_with_box(image)
    with pytest.raises(ValueError, match="outputs_for"):
        pipeline.restore(np.zeros(prepared.vol_zyx.shape, np.uint8), prepared)
    with pytest.raises(ValueError, match="restore must be one of"):
        pipeline.restore(np.zeros(prepared.vol_zyx.shape, np.uint8), prepared, method="cubic")
