"""The generator's varied anatomy (phantoms --anatomy varied, issue 26): deterministic, on the image's grid, organ
volumes in the published ranges, organs that keep their shape, a crescent spleen along the wall, kidneys with an
unlabelled sinus and renal vessels, a caudate lobe, distractors that are never labelled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from test_intensity import assert_volumes_in_cited_ranges

from training import phantoms
from training.phantoms import LABELLED_RANDOMISED, LABELLED_REAL, WIDE_REAL, generate_case


def test_varied_anatomy_is_deterministic_for_a_seed_and_on_the_image_grid():
    image, label = generate_case(31, WIDE_REAL, "small")
    image2, label2 = generate_case(31, WIDE_REAL, "small")
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(image2))
    assert np.array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(label2))
    assert image.GetSize() == label.GetSize() and image.GetSpacing() == label.GetSpacing()
    assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()


def test_varied_anatomy_moves_organs_but_keeps_the_scan():
    """Same seed: the same grid as the classic anatomy, other organ positions."""
    img_c, lab_c = generate_case(8, LABELLED_RANDOMISED, "small", acquisition=None)
    img_v, lab_v = generate_case(8, LABELLED_REAL, "small", acquisition=None)
    assert img_c.GetSize() == img_v.GetSize() and img_c.GetOrigin() == img_v.GetOrigin()
    liver_c, liver_v = (sitk.GetArrayViewFromImage(lab) == 1 for lab in (lab_c, lab_v))
    overlap = 2 * np.count_nonzero(liver_c & liver_v) / (liver_c.sum() + liver_v.sum())
    assert overlap < 0.97  # moved or resized


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_varied_organ_volumes_lie_in_the_cited_ranges(seed):
    domain = LABELLED_REAL if seed % 2 else WIDE_REAL
    _, label = generate_case(seed, domain, "small", acquisition=None)
    assert_volumes_in_cited_ranges(label, f"seed {seed} ({domain.name})")


def _ellipsoid_ml(e: phantoms.Ellipsoid, scale) -> float:
    return 4 / 3 * math.pi * float(np.prod(e.half)) * float(np.prod(scale)) / 1000.0


def _varied(seed: int, domain=LABELLED_REAL):
    params, rng = phantoms._sample(seed, domain, "small", None)
    anatomy = phantoms._vary_anatomy(phantoms._sample_anatomy(rng), seed)
    frame = phantoms._Frame.of(params)
    return params, anatomy, frame, phantoms._tissue_map(params, anatomy)


def _inside(shape, frame, tissue):
    """(box, mask of the shape's voxels in that box)."""
    box = frame.box(*shape.aabb())
    return box, np.broadcast_to(shape.radius(frame.coords(box)) < 1, tissue[box].shape)


@pytest.mark.parametrize("seed", range(12))
def test_moved_organs_are_not_swallowed_by_their_neighbours(seed):
    """Kidneys and gallbladder keep most of their own shape's volume after the later organs are painted; the spleen,
    carved into a crescent and lying beside the kidney when it is low, keeps more than 0.45 (0.47-0.97 over these
    seeds, by hand; 0.39 before it was laid along the wall)."""
    params, anatomy, _, tissue = _varied(seed)
    label = phantoms.ORGAN_OF[tissue]
    voxel_ml = float(np.prod(params.grid.spacing_xyz)) / 1000.0
    for name, value in (("right_kidney", 2), ("left_kidney", 13), ("spleen", 3), ("gallbladder", 9)):
        expected = _ellipsoid_ml(anatomy.ellipsoids[name], params.scale_xyz)
        painted = np.count_nonzero(label == value) * voxel_ml
        share = 0.45 if name == "spleen" else 0.6
        assert painted > share * expected, f"{name}: {painted:.0f} mL painted of {expected:.0f}"


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_spleen_is_a_crescent_along_the_cavity_wall(seed):
    """The carved (hilar) face is never spleen, it takes a real bite out of the ellipsoid, and the spleen's outer
    face lies within 10 mm of the cavity wall, its long axis along the wall."""
    _, anatomy, frame, tissue = _varied(seed)
    spleen, cut = anatomy.ellipsoids["spleen"], anatomy.carve["spleen"]
    box, whole = _inside(spleen, frame, tissue)
    bite = whole & np.broadcast_to(cut.radius(frame.coords(box)) < 1, whole.shape)
    assert 0.02 < bite.sum() / whole.sum() < 0.5
    assert not (tissue[box][bite] == phantoms.SPLEEN).any()
    a, b = phantoms.CAVITY_HALF
    outer = spleen.centre[:2] + spleen.rot[:2, 0] * spleen.half[0]  # the convex face, along the thin axis
    r = math.hypot(outer[0] / a, (outer[1] - phantoms.CAVITY_Y) / b)
    assert 1 - 10 / b < r < 1 + 10 / b, f"outer face at {r:.2f} of the cavity radius"
    centre_r = math.hypot(spleen.centre[0] / a, (spleen.centre[1] - phantoms.CAVITY_Y) / b)
    assert centre_r < r  # the thin axis points out through the wall, so the long axis runs along it


@pytest.mark.parametrize("seed", [1, 4])
def test_kidneys_have_an_unlabelled_sinus_and_renal_vessels(seed):
    """Each kidney's sinus is fat or vessel, never kidney; the renal veins and arteries are enhanced blood with label
    0, and each reaches its kidney's sinus."""
    _, anatomy, frame, tissue = _varied(seed)
    for name, cortex, medulla in (("right_kidney", phantoms.RK_CORTEX, phantoms.RK_MEDULLA),
                                  ("left_kidney", phantoms.LK_CORTEX, phantoms.LK_MEDULLA)):
        box, sinus = _inside(anatomy.carve[name], frame, tissue)
        assert sinus.sum() > 20
        inside = tissue[box][sinus]
        assert not np.isin(inside, [cortex, medulla]).any()
        assert np.isin(inside, [phantoms.CAVITY_FAT, phantoms.BLOOD]).mean() > 0.8
    assert len(anatomy.renal_vessels) == 4
    blood = tissue == phantoms.BLOOD
    assert blood.any() and phantoms.ORGAN_OF[phantoms.BLOOD] == 0
    sinus_centres = [anatomy.carve[n].centre for n in ("right_kidney", "left_kidney")]
    for vessel in anatomy.renal_vessels:
        assert min(np.linalg.norm(vessel.points[0] - c) for c in sinus_centres) < 1e-6
        box = frame.box(*vessel.aabb())
        inside = np.broadcast_to(vessel.signed_distance(frame.coords(box), frame, box) < 0, tissue[box].shape)
        if inside.sum() > 10:  # in this scan's range
            assert np.mean(tissue[box][inside] == phantoms.BLOOD) > 0.3


def test_the_caudate_lobe_is_liver_beside_the_ivc():
    found = 0
    for seed in range(6):
        _, anatomy, frame, tissue = _varied(seed)
        if anatomy.caudate is None:
            continue
        box, lobe = _inside(anatomy.caudate, frame, tissue)
        if lobe.sum() < 20:  # outside this scan's range
            continue
        assert np.mean(tissue[box][lobe] == phantoms.LIVER) > 0.5
        ivc = anatomy.tubes["ivc"].points
        assert np.min(np.linalg.norm(ivc - anatomy.caudate.centre, axis=1)) < 45
        found += 1
    assert found >= 3


def test_classic_anatomy_has_no_varied_shapes():
    params, rng = phantoms._sample(3, LABELLED_RANDOMISED, "small", None)
    classic = phantoms._sample_anatomy(rng)
    assert not classic.carve and classic.caudate is None and not classic.renal_vessels


def test_distractors_are_painted_and_never_labelled():
    """The bladder (fluid) and the femoral heads (bone) are in the tissue map, with label 0 there."""
    checked = 0
    for seed in range(40):  # wide-domain scans whose range reaches the femoral heads
        params, rng = phantoms._sample(seed, WIDE_REAL, "small", None)
        frame = phantoms._Frame.of(params)
        if frame.z_range()[0] > -270:
            continue
        classic = phantoms._sample_anatomy(rng)
        varied = phantoms._vary_anatomy(classic, seed)
        assert len(varied.distractors) == 3 and not classic.distractors
        tissue = phantoms._tissue_map(params, varied)
        for shape, code in varied.distractors:
            box = frame.box(*shape.aabb())
            inside = np.broadcast_to(shape.radius(frame.coords(box)) < 1, tissue[box].shape)
            assert inside.any()
            assert np.mean(tissue[box][inside] == code) > 0.5, (seed, code)
            assert not phantoms.ORGAN_OF[tissue[box][inside]].any()
            checked += 1
        if checked >= 6:
            break
    assert checked >= 6  # two scans, three distractors each
    assert phantoms.ORGAN_OF[phantoms.BOWEL_CONTENT] == 0 and phantoms.ORGAN_OF[phantoms.BONE] == 0


def test_anatomy_is_checked():
    with pytest.raises(ValueError, match="anatomy must be one of"):
        phantoms.DomainConfig(**{**phantoms.asdict(phantoms.LABELLED_DOMAIN), "anatomy": "wobbly"})
