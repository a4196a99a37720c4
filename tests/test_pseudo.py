"""Pseudo-labels: the teacher's soft vote through flare_infer's pipeline, confidence masks, resume, torchrun shards.

    pytest tests/test_pseudo.py -x
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_infer import io
from flare_infer.labels import NUM_CLASSES
from flare_infer.pipeline import prepare
from flare_infer.preprocess import pad_slices
from flare_infer.spec import ModelSpec
from training.data import SliceConfig, SliceDataset
from training.loop import save_checkpoint
from training.losses import eq2_loss
from training.model import UNet, UNetConfig
from training.phantoms import WIDE_DOMAIN, generate_case, write_image
from training.pseudo import (
    CONFIDENCE_SCALE,
    PseudoConfig,
    PseudoStore,
    confidence_mask,
    dropped_cases,
    label_all,
    make_pseudo_labels,
    pseudo_cases,
    select_cases,
)
from training.teacher import SoftVote, load_teacher
from training.utils import Runtime

SPEC = ModelSpec(input_channels=1, spacing_xyz_mm=(8.0, 8.0, 12.0))  # coarse: ~25 x 50 x 50 volumes, fast
CPU = Runtime(torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_teacher(out: Path, members: int = 3, width: int = 4) -> Path:
    """teacher.json + fold checkpoints in training.teacher's format; members differ (their seeds)."""
    entries = []
    for k in range(members):
        torch.manual_seed(100 + k)
        model = UNet(UNetConfig(width=width)).eval()
        save_checkpoint(_mkdir(out / f"fold_{k}") / "best.pt", {
            "model": model.state_dict(), "model_config": model.cfg.to_dict(), "spec": SPEC.to_dict(),
            "metrics": [{"epoch": 1, "val_dsc": 0.5 - 0.1 * k}], "epoch": 0, "git_commit": "test",
        })  # fmt: skip
        entries.append({"fold": k, "checkpoint": f"fold_{k}/best.pt", "score": 0.5 - 0.1 * k})
    (out / "teacher.json").write_text(json.dumps({"members": entries, "spec": SPEC.to_dict()}))
    return out / "teacher.json"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_unlabelled(out: Path, n: int) -> Path:
    for i in range(n):
        write_image(generate_case(500 + i, WIDE_DOMAIN, "small")[0], out / f"Case_{i + 1:05d}_0000.nii.gz")
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A 3-member teacher, 3 unlabelled CTs, all pseudo-labelled once (in-process, one rank)."""
    tmp = tmp_path_factory.mktemp("pseudo")
    teacher_json = make_teacher(tmp / "teacher")
    unlabelled = write_unlabelled(tmp / "unlabelled", 3)
    teacher = load_teacher(teacher_json, CPU.device)
    store, names = make_pseudo_labels(unlabelled, teacher, tmp / "cache", PseudoConfig(batch_size=8), CPU)
    return tmp, teacher_json, unlabelled, teacher, store, names


def _reference_labels(image_path: Path, teacher_json: Path) -> tuple[np.ndarray, np.ndarray]:
    """Independently: every member on the padded slices, softmax, mean over members, argmax; top-2 margin."""
    vol_zyx = prepare(io.read_ct(image_path), SPEC).vol_zyx
    z, h, w = vol_zyx.shape
    x = torch.from_numpy(pad_slices(vol_zyx[:, None]).astype(np.float32))  # (Z, 1, H16, W16)
    members = json.loads(teacher_json.read_text())["members"]
    probs = []
    for m in members:
        ckpt = torch.load(teacher_json.parent / m["checkpoint"], weights_only=False)
        model = UNet(UNetConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            probs.append(torch.softmax(model.eval()(x)[0], dim=1)[:, :, :h, :w].numpy())
    mean = np.mean(probs, axis=0)  # (Z, 14, h, w)
    top2 = np.sort(mean, axis=1)[:, -2:]
    return mean.argmax(axis=1).astype(np.uint8), top2[:, 1] - top2[:, 0]


def test_pseudo_labels_are_argmax_of_mean_member_probabilities(labelled):
    tmp, teacher_json, unlabelled, _, store, names = labelled
    assert names == ["Case_00001", "Case_00002", "Case_00003"]
    for name in names:
        expected, margin = _reference_labels(unlabelled / f"{name}_0000.nii.gz", teacher_json)
        found = np.load(store.labels(name))
        assert found.dtype == np.uint8 and found.shape == expected.shape
        clear = margin > 1e-5  # a float32 tie may go either way with another batch size
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(found[clear], expected[clear])
        confidence = np.load(store.confidence(name)).astype(np.float32) / CONFIDENCE_SCALE
        assert confidence.min() >= 1 / NUM_CLASSES - 1 / CONFIDENCE_SCALE  # a max probability of 14 classes
        record = store.read_record(name)
        assert record["members"] == 3 and 0.0 <= record["agreement"] <= 1.0
        assert store.image(name).is_file()  # the training cache image, written on the way


def test_confidence_mask_ignores_exactly_the_masked_voxels(labelled):
    _, _, _, _, store, names = labelled
    threshold = float(np.median(np.load(store.confidence(names[0])))) / CONFIDENCE_SCALE  # masks about half
    cfg = PseudoConfig(confidence_threshold=threshold)
    cases = pseudo_cases(store, names, cfg, CPU)
    q = np.load(store.confidence(names[0]))
    weight_zyx = np.load(cases[0].weight_path)
    np.testing.assert_array_equal(weight_zyx, confidence_mask(q, threshold))
    np.testing.assert_array_equal(weight_zyx == 1, q.astype(np.float32) / CONFIDENCE_SCALE >= threshold)
    assert 0.2 < weight_zyx.mean() < 0.9

    item = SliceDataset(cases[:1], SliceConfig(1, 64))[len(cases[0].image()) // 2]
    target, weight = item["label"][None], item["weight"][None]  # (1, 64, 64)
    assert 0 < weight.sum() < weight.numel()
    logits = torch.randn(1, NUM_CLASSES, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = eq2_loss(logits, target, weight=weight)
    masked, kept = weight[0] == 0, weight[0] == 1
    changed = logits.clone()
    changed[0][:, masked] = torch.randn(NUM_CLASSES, int(masked.sum()))
    assert torch.allclose(eq2_loss(changed, target, weight=weight), loss, atol=1e-6)  # masked voxels: no effect
    # ... and the loss is Eq. 2 over exactly the kept voxels (its sums and means ignore arrangement).
    kept_logits = logits[0][:, kept][None, :, None, :]  # (1, 14, 1, K)
    assert torch.allclose(eq2_loss(kept_logits, target[0][kept][None, None]), loss, atol=1e-5)
    one = kept.nonzero()[0]
    changed = logits.clone()
    changed[0, :, one[0], one[1]] += torch.linspace(-5, 5, NUM_CLASSES)
    assert not torch.allclose(eq2_loss(changed, target, weight=weight), loss, atol=1e-6)  # kept voxels count


def test_labelling_again_skips_done_cases_and_redoes_only_missing_ones(labelled):
    tmp, _, unlabelled, teacher, store, names = labelled
    from training.data import discover_unlabelled

    cases = select_cases(discover_unlabelled(unlabelled), 1.0, 0)
    assert label_all(cases, teacher, store, PseudoConfig(batch_size=8), CPU) == []
    before = store.labels(names[0]).stat().st_mtime_ns
    store.record(names[1]).unlink()  # as if killed before its record was written
    assert label_all(cases, teacher, store, PseudoConfig(batch_size=8), CPU) == [names[1]]
    assert store.labels(names[0]).stat().st_mtime_ns == before


def test_drop_disagreeing_drops_the_cases_members_agree_on_least(tmp_path):
    store = PseudoStore(tmp_path, tmp_path)
    for name, agreement in (("a", 0.9), ("b", 0.2), ("c", 0.6), ("d", 0.4)):
        store.record(name).write_text(json.dumps({"agreement": agreement}))
    assert dropped_cases(store, ["a", "b", "c", "d"], 0.5) == {"b", "d"}
    assert dropped_cases(store, ["a", "b", "c", "d"], 0.0) == set()


def test_a_teacher_whose_members_differ_in_preprocessing_is_refused(tmp_path):
    teacher_json = make_teacher(tmp_path, members=2, width=2)
    path = tmp_path / "fold_1" / "best.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["spec"] = ModelSpec(input_channels=1, spacing_xyz_mm=(4.0, 4.0, 12.0)).to_dict()  # another grid
    save_checkpoint(path, ckpt)
    with pytest.raises(ValueError, match="the members disagree on preprocessing"):
        load_teacher(teacher_json)
    assert len(load_teacher(tmp_path / "fold_0" / "best.pt").models) == 1  # a checkpoint: a one-member teacher


class _FixedLabels(torch.nn.Module):
    """A stand-in member whose argmax is `labels_hw` on every slice: (logits, aux) as the U-Net returns them."""

    def __init__(self, labels_hw: np.ndarray) -> None:
        super().__init__()
        onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels_hw]  # (H, W, 14)
        self.logits = torch.from_numpy(10 * onehot).permute(2, 0, 1)  # (14, H, W)

    def forward(self, x: torch.Tensor):
        logits = self.logits.expand(x.shape[0], -1, -1, -1)
        return logits, None


def test_member_agreement_is_the_mean_pairwise_organ_dice_under_flare22s_empty_rule():
    a = np.array([[0, 1, 1, 2], [2, 0, 9, 9]])
    b = np.array([[0, 1, 2, 2], [0, 3, 9, 9]])  # last column: only inside the padding (cropped away below)
    b[:, 3] = 5
    vote = SoftVote([_FixedLabels(a), _FixedLabels(b)], "cpu", agreement_hw=(2, 3))
    probs = vote(np.zeros((2, 1, 2, 4), np.float32))
    assert probs.shape == (2, NUM_CLASSES, 2, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # Over the real 2 x 3 region (the same on every slice): organ 1: 2*1/(2+1); organ 2: 0/(1+1); organ 3:
    # 0/(0+1); organ 9: 2*1/(1+1); the 9 organs absent from both score 1 (FLARE22's rule), organ 5 among them:
    # it lies in the padding only.
    expected = (2 / 3 + 0.0 + 0.0 + 1.0 + 9 * 1.0) / 13
    assert vote.agreement() == pytest.approx(expected)
    assert SoftVote([_FixedLabels(a)], "cpu", agreement_hw=(2, 3)).agreement() == 1.0  # one member agrees


def test_unlabelled_fraction_picks_a_seeded_subset_and_one_means_all(labelled):
    from training.data import CaseFiles

    cases = [CaseFiles(f"c{i:02d}", Path(f"c{i:02d}")) for i in range(20)]
    assert select_cases(cases, 1.0, 0) == cases
    subset = select_cases(cases, 0.375, 3)
    assert len(subset) == 8 and subset == select_cases(cases, 0.375, 3) and subset != select_cases(cases, 0.375, 4)


def test_torchrun_two_gloo_processes_label_each_case_exactly_once(labelled, tmp_path):
    _, teacher_json, _, _, _, _ = labelled
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(labelled[2], unlabelled)
    shutil.copy(labelled[2] / "Case_00001_0000.nii.gz", unlabelled / "Case_00004_0000.nii.gz")  # 4 cases
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.pseudo", "--teacher", str(teacher_json), "--unlabelled", str(unlabelled),
           "--cache", str(tmp_path / "cache"), "--device", "cpu", "--batch-size", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (store_dir,) = (tmp_path / "cache").glob("*/pseudo/*")
    logs = {r: (store_dir / f"labelled-by-rank{r}.txt").read_text().split() for r in (0, 1)}
    names = ["Case_00001", "Case_00002", "Case_00003", "Case_00004"]
    assert sorted(logs[0] + logs[1]) == names  # every case once, none twice
    assert logs[0] == names[0::2] and logs[1] == names[1::2]
    for r, mine in logs.items():
        assert all(json.loads((store_dir / f"{n}.json").read_text())["rank"] == r for n in mine)
