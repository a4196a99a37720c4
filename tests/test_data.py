"""Dataset discovery, the preprocessing cache and the slice dataset.   pytest tests/test_data.py"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.spec import ModelSpec
from training.augment import AugmentConfig, Augmenter
from training.data import (
    CachedCase,
    DatasetError,
    OrganBalancedSampler,
    SliceConfig,
    SliceDataset,
    build_cache,
    cache_root,
    discover_labelled,
    discover_unlabelled,
    make_sampler,
    slice_presence,
)

TINY_SPACING = (3.0, 3.0, 5.0)  # x, y, z mm: the tiny cases' own spacing, so the cache keeps their size


def tiny_case(seed: int, size_xyz=(40, 36, 10)) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like image with three box 'organs' (liver 1, spleen 3, left kidney 13), off-centre origin."""
    rng = np.random.default_rng(seed)
    x, y, z = size_xyz
    label = np.zeros((z, y, x), np.uint8)
    ox, oy = rng.integers(0, 4, 2)
    label[1:-1, 6 + oy : 20 + oy, 4 + ox : 18 + ox] = 1
    label[2:-2, 8 + oy : 16 + oy, 24 + ox : 32 + ox] = 3
    label[3:-3, 22:30, 20:28] = 13
    hu = np.array([-100.0] + [60.0 + 10 * v for v in range(1, 14)])
    image = (hu[label] + rng.normal(0, 10, label.shape)).astype(np.int16)
    out = []
    for arr in (image, label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(TINY_SPACING)
        img.SetOrigin((-60.0, 30.0, 100.0))
        out.append(img)
    return out[0], out[1]


def write_tiny_dataset(root: Path, n: int = 5, layout: str = "flare22") -> Path:
    img_dir, lab_dir = ("images", "labels") if layout == "flare22" else ("imagesTr", "labelsTr")
    (root / img_dir).mkdir(parents=True)
    (root / lab_dir).mkdir(parents=True)
    for i in range(n):
        image, label = tiny_case(i)
        sitk.WriteImage(image, str(root / img_dir / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / lab_dir / f"case_{i:03d}.nii.gz"))
    if layout == "nnunet":
        (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    return root


def tiny_spec() -> ModelSpec:
    return ModelSpec(spacing_xyz_mm=TINY_SPACING)


@pytest.mark.parametrize("layout", ["flare22", "nnunet"])
def test_both_layouts_are_discovered_with_matching_pairs(tmp_path, layout):
    cases = discover_labelled(write_tiny_dataset(tmp_path, 3, layout))
    assert [c.name for c in cases] == ["case_000", "case_001", "case_002"]
    assert all(c.label.name == f"{c.name}.nii.gz" for c in cases)


def test_phantom_layout_under_labelled_is_found(tmp_path):
    write_tiny_dataset(tmp_path / "labelled", 2)
    assert len(discover_labelled(tmp_path)) == 2


def test_image_without_label_is_an_error_naming_it(tmp_path):
    root = write_tiny_dataset(tmp_path, 2)
    (root / "labels" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_001"):
        discover_labelled(root)


def test_label_on_another_grid_is_an_error(tmp_path):
    root = write_tiny_dataset(tmp_path, 1)
    label = sitk.ReadImage(str(root / "labels" / "case_000.nii.gz"))
    label.SetSpacing((3.0, 3.0, 4.0))
    sitk.WriteImage(label, str(root / "labels" / "case_000.nii.gz"))
    with pytest.raises(DatasetError, match="grid"):
        discover_labelled(root)


def test_unknown_layout_is_an_error_listing_what_was_found(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="stuff"):
        discover_labelled(tmp_path)


def test_label_values_outside_0_13_are_refused_when_caching(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", 1)
    path = root / "labels" / "case_000.nii.gz"
    label = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(label)
    arr[0, 0, 0] = 14
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(path))
    with pytest.raises(DatasetError, match="outside 0..13"):
        build_cache(discover_labelled(root), tiny_spec(), tmp_path / "cache", quiet=True)


def test_cache_holds_compact_memmaps_keyed_by_spacing_and_is_reused(tmp_path):
    cases = discover_labelled(write_tiny_dataset(tmp_path / "d", 2))
    cached = build_cache(cases, tiny_spec(), tmp_path / "cache", workers=2, quiet=True)
    image, label = cached[0].image(), cached[0].label()
    assert isinstance(image, np.memmap) and image.dtype == np.float16 and label.dtype == np.uint8
    assert image.shape == label.shape == (10, 36, 40)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert set(np.unique(label)) == {0, 1, 3, 13}
    mtime = cached[0].image_path.stat().st_mtime_ns
    again = build_cache(cases, tiny_spec(), tmp_path / "cache", quiet=True)
    assert again == cached and cached[0].image_path.stat().st_mtime_ns == mtime
    other = ModelSpec(spacing_xyz_mm=(6.0, 6.0, 5.0))
    assert cache_root(other, tmp_path / "cache") != cache_root(tiny_spec(), tmp_path / "cache")
    three_channels = ModelSpec(input_channels=3, spacing_xyz_mm=TINY_SPACING)
    assert cache_root(three_channels, tmp_path / "cache") == cached[0].image_path.parent


def test_unlabelled_folder_is_discovered_without_labels(tmp_path):
    root = write_tiny_dataset(tmp_path, 2)
    cases = discover_unlabelled(root / "images")
    assert [c.name for c in cases] == ["case_000", "case_001"] and all(c.label is None for c in cases)


def _array_case(tmp_path: Path, z=5, h=20, w=24) -> CachedCase:
    image = (np.arange(z)[:, None, None] + np.zeros((1, h, w))).astype(np.float16)  # value = slice index
    label = np.ones((z, h, w), np.uint8)
    weight = np.ones((z, h, w), np.float16)
    for name, arr in (("a.npy", image), ("a.label.npy", label), ("a.weight.npy", weight)):
        np.save(tmp_path / name, arr)
    return CachedCase("a", tmp_path / "a.npy", tmp_path / "a.label.npy", tmp_path / "a.weight.npy")


def test_slices_are_padded_to_the_patch_with_edge_replicated_neighbours(tmp_path):
    ds = SliceDataset([_array_case(tmp_path)], SliceConfig(in_channels=3, patch_size=32))
    assert len(ds) == 5
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32) and item["weight"].shape == (32, 32)
    centre = (item["label"] == 1).numpy()
    assert centre.sum() == 20 * 24  # the whole slice, padded with background
    assert [float(item["image"][c][centre].mean()) for c in range(3)] == [0.0, 0.0, 1.0]  # z-1 clipped to z=0


def test_large_slices_are_randomly_cropped_to_the_patch(tmp_path):
    ds = SliceDataset([_array_case(tmp_path, h=40, w=48)], SliceConfig(patch_size=32))
    assert ds[2]["image"].shape == (1, 32, 32)
    assert float(ds[2]["image"].mean()) == 2.0


def test_augmented_items_keep_shapes_and_label_values(tmp_path):
    aug = Augmenter(AugmentConfig(p_hflip=1, p_vflip=1, p_rotate=1, p_elastic=1, p_grid=1, p_optical=1), seed=0)
    ds = SliceDataset([_array_case(tmp_path)], SliceConfig(patch_size=32), aug)
    item = ds[1]
    assert item["image"].shape == (1, 32, 32) and item["label"].dtype.is_floating_point is False
    assert set(np.unique(item["label"].numpy())) <= {0, 1}


def _presence(n: int = 200) -> np.ndarray:
    """n slices: liver (1) on the first 160, a right adrenal (7) on slices 100..109 (5 %), nothing else."""
    presence = np.zeros((n, 14), bool)
    presence[:, 0] = True
    presence[:160, 1] = True
    presence[100:110, 7] = True
    return presence


def test_oversampling_draws_a_small_organ_as_often_as_a_large_one():
    presence = _presence()
    adrenal = presence[:, 7]
    uniform = np.array(list(OrganBalancedSampler(np.repeat(presence, 50, 0), 0.0)))  # 10000 draws
    balanced = np.array(list(OrganBalancedSampler(np.repeat(presence, 50, 0), 0.5)))
    assert abs(np.repeat(adrenal, 50)[uniform].mean() - 0.05) < 0.01
    # half the draws pick an organ (liver or adrenal, even odds), the other half are uniform: 0.25 + 0.5 * 0.05
    assert abs(np.repeat(adrenal, 50)[balanced].mean() - 0.275) < 0.02


def test_oversampling_ranks_split_one_seeded_list_and_epochs_differ():
    presence = _presence()
    whole = OrganBalancedSampler(presence, 0.5, seed=3)
    ranks = [OrganBalancedSampler(presence, 0.5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(whole) == 200 and [len(r) for r in ranks] == [100, 100]
    listed = list(whole)
    assert list(ranks[0]) == listed[0::2] and list(ranks[1]) == listed[1::2]
    whole.set_epoch(1)
    assert list(whole) != listed and list(OrganBalancedSampler(presence, 0.5, seed=3)) == listed


def test_oversample_zero_keeps_the_papers_shuffle_and_bad_fractions_are_refused(tmp_path):
    ds = SliceDataset([_array_case(tmp_path)], SliceConfig(patch_size=32))
    assert make_sampler(ds, 0.0, seed=0) is None  # the DataLoader's own shuffle
    assert isinstance(make_sampler(ds, 0.3, seed=0), OrganBalancedSampler)
    with pytest.raises(ValueError, match="oversample"):
        OrganBalancedSampler(_presence(), 1.5)


def test_slice_presence_lists_the_classes_of_each_slice(tmp_path):
    case = _array_case(tmp_path)
    label = np.zeros((5, 20, 24), np.uint8)
    label[1, 3, 3], label[3, 0, 0], label[3, 5, 5] = 7, 13, 1
    np.save(case.label_path, label)
    presence = slice_presence(case)
    assert presence.shape == (5, 14)
    assert [np.flatnonzero(row).tolist() for row in presence] == [[0], [0, 7], [0], [0, 1, 13], [0]]
