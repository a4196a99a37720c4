"""The overlay preview: a PNG of three orthogonal slices with the labels drawn in.

    pytest tests/test_preview.py -x -q
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.preview import ORGAN_COLOURS, _slices_zyx, save_preview
from training.phantoms import LABELLED_DOMAIN, generate_case

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case() -> tuple[sitk.Image, sitk.Image]:
    return generate_case(5, LABELLED_DOMAIN, "small", geometry="permuted")


def test_preview_writes_a_png_with_and_without_mask(case, tmp_path):
    image, label = case
    with_mask = save_preview(image, label, tmp_path / "sub" / "a.png", title="case")
    ct_only = save_preview(image, None, tmp_path / "b.png")
    for path in (with_mask, ct_only):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_preview_draws_the_organ_colours(case, tmp_path):
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    image, label = case
    with_mask = mpimg.imread(save_preview(image, label, tmp_path / "a.png"))[..., :3]
    ct_only = mpimg.imread(save_preview(image, None, tmp_path / "b.png"))[..., :3]
    # The legend and overlay put the liver's red in the picture; the CT alone is grey.
    red = np.array(to_rgb(ORGAN_COLOURS[1]))
    assert (np.abs(with_mask - red).max(-1) < 0.02).sum() > 20
    assert (np.abs(ct_only - red).max(-1) < 0.02).sum() == 0


def test_preview_rejects_a_mask_on_another_grid(case, tmp_path):
    image, label = case
    shifted = sitk.Image(label)
    shifted.SetOrigin([o + 5 for o in label.GetOrigin()])
    with pytest.raises(ValueError, match="differs from the image"):
        save_preview(image, shifted, tmp_path / "x.png")


def test_slices_pick_the_plane_with_most_organs():
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[2, 3, 4] = 1
    lab[7, 3:6, 4:9] = 2
    lab[7, 8, 10] = 3
    z, _, _ = _slices_zyx(lab.shape, lab)
    assert z == 7
    assert _slices_zyx(lab.shape, None) == (5, 6, 7)


def test_preview_cli(case, tmp_path):
    image, label = case
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "p.png"
    run = subprocess.run([sys.executable, "-m", "flare_infer.preview", str(tmp_path / "ct.nii.gz"),
                          str(tmp_path / "mask.nii.gz"), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_preview_without_matplotlib_says_what_to_install(case, tmp_path, monkeypatch):
    image, label = case
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        save_preview(image, label, tmp_path / "x.png")
