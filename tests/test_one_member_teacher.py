"""A one-member teacher: phase two taught by one checkpoint (a single fold's best.pt) instead of teacher.json.

weights/train.sh's CPU-sized recipe trains one fold and hands its best.pt to training.student; load_teacher took a
checkpoint already, but the student read the preprocessing from teacher.json only (issue 26).
"""

from __future__ import annotations

import torch

from flare_infer.spec import ModelSpec, Normalization
from training.model import UNet, UNetConfig
from training.student import Sources, StudentConfig, student_spec
from training.teacher import load_teacher, teacher_spec


def _checkpoint(path, spec: ModelSpec) -> None:
    cfg = UNetConfig(width=4, depth=3)
    torch.save({"model": UNet(cfg).state_dict(), "model_config": cfg.to_dict(), "spec": spec.to_dict()}, path)


def test_a_checkpoint_teaches_with_its_own_preprocessing(tmp_path):
    spec = ModelSpec(1, (3.0, 3.0, 4.0), Normalization("ct_window", window_hu=(-909.0, 263.0)))
    ckpt = tmp_path / "best.pt"
    _checkpoint(ckpt, spec)
    read = teacher_spec(ckpt)
    assert read.output == "probabilities"
    assert read.spacing_xyz_mm == (3.0, 3.0, 4.0) and read.normalization == spec.normalization
    loaded = load_teacher(ckpt).spec
    assert (read.spacing_xyz_mm, read.normalization, read.output) == (loaded.spacing_xyz_mm, loaded.normalization,
                                                                       loaded.output)
    src = Sources(tmp_path, tmp_path, ckpt, None, tmp_path / "cache")
    student = student_spec(src, StudentConfig())
    assert student.spacing_xyz_mm == (3.0, 3.0, 4.0) and student.output == "logits"
