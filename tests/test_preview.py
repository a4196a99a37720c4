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


def _overlay_pixels(png, colour: str, tol: float = 0.03) -> int:
    """Pixels of `colour` drawn half-transparent over the CT: rgb = a * colour + (1 - a) * grey, 0.2 < a < 0.8.

    Removing each pixel's mean leaves a * (colour - its mean) whatever the grey, so the overlay is found by the
    direction of that difference; the legend's solid patches (a = 1), their anti-aliased edges on the white
    figure (grey = 1) and the grey CT (a = 0) are not counted, nor is anything in the legend's strip (the bottom
    tenth of the figure in save_preview's layout).
    """
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    rgb = mpimg.imread(png)[..., :3].astype(np.float64)
    rgb = rgb[: int(0.9 * rgb.shape[0])]
    ref = np.array(to_rgb(colour))
    centred = ref - ref.mean()
    chroma = rgb - rgb.mean(-1, keepdims=True)
    alpha = (chroma @ centred) / (centred @ centred)  # least-squares a per pixel
    residual = np.abs(chroma - alpha[..., None] * centred).max(-1)
    translucent = (alpha > 0.2) & (alpha < 0.8) & (residual < tol)
    grey = (rgb.mean(-1) - alpha * ref.mean()) / np.where(translucent, 1 - alpha, 1.0)  # what lies beneath
    return int((translucent & (grey < 0.9)).sum())


def test_preview_draws_the_organ_colours(case, tmp_path):
    image, label = case
    empty = sitk.Image(label.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label)
    with_mask = save_preview(image, label, tmp_path / "a.png")
    empty_mask = save_preview(image, empty, tmp_path / "b.png")  # the same legend, nothing to overlay
    ct_only = save_preview(image, None, tmp_path / "c.png")
    # The organs in the three slices are drawn in their colours; an empty mask or the CT alone draws none.
    for organ in (1, 3, 13):  # liver, spleen, left kidney: large, in every phantom
        assert _overlay_pixels(with_mask, ORGAN_COLOURS[organ]) > 200, organ
        assert _overlay_pixels(empty_mask, ORGAN_COLOURS[organ]) == 0, organ
        assert _overlay_pixels(ct_only, ORGAN_COLOURS[organ]) == 0, organ


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
