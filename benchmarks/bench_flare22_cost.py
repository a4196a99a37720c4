"""What a FLARE22-size run costs: per-case disk, RAM and CPU at the paper's sizes, extrapolated to 50 + 2000 cases.

    python benchmarks/bench_flare22_cost.py                       # writes docs/results/flare22_cost.json
    python benchmarks/bench_flare22_cost.py --labelled 1 --unlabelled 1 --steps 1 --out /tmp/cost.json   # quicker

Measured on full-size generated CTs (`training.phantoms` --size full: 384-512 px in-plane at 0.6-1.0 mm,
1.5-5 mm slices, FLARE22's range) with the paper's preprocessing (1.5 x 1.5 x 2.5 mm grid, the teacher's
ct_window normalisation) and its network (U-Net width 32, depth 5, 256 x 256 patches, batch 40):
  - the training cache's disk per case (`training.data.build_cache`: float16 image, uint8 label) and its
    CPU seconds per case (one process, `time.process_time`, every thread counted);
  - the pseudo-label store's disk per case and CPU seconds per case to label it with a 3-member teacher
    (`training.pseudo.label_case`; random weights: the cost does not depend on them);
  - one DataLoader worker's memory (RSS and private bytes from /proc, after a few batches of the teacher's
    loader with the paper's augmentation);
  - a CPU training step at the paper's sizes (forward, Eq. 1 with deep supervision, backward, Adam), a few
    steps after one warm-up.
The totals for FLARE22 (50 labelled + 2000 unlabelled cases; the paper pseudo-labels 750) are products of
these means and are marked "extrapolated"; GPU time per stage is not measured (no GPU here) and is null.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer

from training.augment import AugmentConfig
from training.data import build_cache, discover_labelled, discover_unlabelled
from training.loop import LoopConfig, make_optimizer
from training.losses import deep_supervision_loss, eq1_loss
from training.model import UNet, UNetConfig
from training.phantoms import generate_dataset
from training.pseudo import PseudoConfig, PseudoStore, label_case
from training.teacher import Teacher, TeacherConfig, _loader, resolve_window
from training.utils import setup_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLARE22 = {"labelled": 50, "unlabelled": 2000, "unlabelled_paper": 750}  # the paper uses 750 of the 2000
PAPER = TeacherConfig(augment=AugmentConfig.from_cli(0.5, 0.5, 0.2), workers=1)  # the CLI defaults: the paper's


def _bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def cache_cost(cases: list, spec, cache_dir: Path) -> list[dict]:
    """Per case: cache bytes (image, label) and CPU / wall seconds of preprocessing it (one process)."""
    rows = []
    for case in cases:
        c0, t0 = time.process_time(), time.perf_counter()
        (cached,) = build_cache([case], spec, cache_dir, workers=0, quiet=True)
        rows.append({"name": case.name, "cpu_s": round(time.process_time() - c0, 2),
                     "wall_s": round(time.perf_counter() - t0, 2), "shape_zyx": list(cached.image().shape),
                     "image_bytes": _bytes([cached.image_path]),
                     "label_bytes": _bytes([cached.label_path]) if cached.label_path else 0})  # fmt: skip
    return rows


def paper_teacher(spec) -> Teacher:
    """Three width-32 U-Nets (random, seeded) as a teacher: labelling costs the same whatever the weights."""
    torch.manual_seed(0)
    models = tuple(UNet(UNetConfig(width=32, depth=5)).eval() for _ in range(3))
    probs = type(spec).from_dict({**spec.to_dict(), "output": "probabilities"})
    return Teacher(models, probs, "bench_flare22_cost", "bench_flare22_cost (random weights)")


def pseudo_cost(cases: list, teacher: Teacher, cache_dir: Path, rt) -> list[dict]:
    """Per case: the store's bytes (pseudo-label, confidence, record) and CPU / wall seconds of labelling it."""
    store = PseudoStore.for_teacher(teacher, cache_dir)
    store.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        c0, t0 = time.process_time(), time.perf_counter()
        label_case(case, teacher, store, PseudoConfig(batch_size=16), rt)
        files = [store.labels(case.name), store.confidence(case.name), store.record(case.name)]
        rows.append({"name": case.name, "cpu_s": round(time.process_time() - c0, 2),
                     "wall_s": round(time.perf_counter() - t0, 2), "store_bytes": _bytes(files)})  # fmt: skip
    return rows


def _proc_kib(pid: int) -> dict:
    """RSS, peak RSS and private (not shared with other processes) memory of a process, KiB, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = {k: int(v.split()[0]) for k, v in rollup.items()}
    return {"rss_kib": int(status["VmRSS"].split()[0]), "peak_rss_kib": int(status["VmHWM"].split()[0]),
            "private_kib": kib["Private_Clean"] + kib["Private_Dirty"], "pss_kib": kib["Pss"]}  # fmt: skip


def worker_memory(cached: list, cfg: TeacherConfig, rt, batches: int) -> dict:
    """One DataLoader worker of the teacher's loader (paper augmentation, batch 40, 256 px) after `batches`."""
    loader = _loader(cached, cfg, rt)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    (worker,) = it._workers  # one worker: workers=1
    mem = _proc_kib(worker.pid)
    del it, loader
    return {**mem, "batches": batches, "batch": cfg.batch_size, "patch": cfg.patch_size}


def step_seconds(cfg: TeacherConfig, steps: int) -> dict:
    """Wall and CPU seconds of one training step at the paper's sizes (random batch; one warm-up not timed)."""
    model = UNet(UNetConfig(width=32, depth=5, deep_supervision=True)).train()
    optimizer = make_optimizer(model, LoopConfig(lr=2e-4))
    image = torch.randn(cfg.batch_size, 1, cfg.patch_size, cfg.patch_size)  # (B, 1, H, W)
    label = torch.randint(0, 14, (cfg.batch_size, cfg.patch_size, cfg.patch_size))  # (B, H, W)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        main, aux = model(image)
        deep_supervision_loss(eq1_loss, main, aux, label, aux_weight=0.1, beta=0.65).backward()
        optimizer.step()

    step()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    wall, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "steps_timed": steps, "threads": torch.get_num_threads()}


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def extrapolate(cache_l: list[dict], cache_u: list[dict], pseudo: list[dict], worker: dict, step: dict) -> dict:
    """FLARE22 totals from the per-case means (products, not measurements)."""
    n_l, n_u, n_p = FLARE22["labelled"], FLARE22["unlabelled"], FLARE22["unlabelled_paper"]
    slices = _mean(cache_l, "slices")
    teacher_steps_per_epoch = int(np.ceil(0.8 * n_l * slices / PAPER.batch_size))  # a fold trains on 4/5
    gib, hour = 2**30, 3600
    return {
        "cache_disk_gib": round((n_l * _mean(cache_l, "bytes") + n_u * _mean(cache_u, "bytes")) / gib, 1),
        "pseudo_store_disk_gib": {"all_2000": round(n_u * _mean(pseudo, "store_bytes") / gib, 1),
                                  "paper_750": round(n_p * _mean(pseudo, "store_bytes") / gib, 1)},
        "cache_cpu_hours": round((n_l * _mean(cache_l, "cpu_s") + n_u * _mean(cache_u, "cpu_s")) / hour, 1),
        "pseudo_label_cpu_hours": {"all_2000": round(n_u * _mean(pseudo, "cpu_s") / hour, 1),
                                   "paper_750": round(n_p * _mean(pseudo, "cpu_s") / hour, 1)},
        "loader_ram_gib_per_worker": round(worker["peak_rss_kib"] / 2**20, 2),
        "teacher_steps_per_fold_epoch": teacher_steps_per_epoch,
        "teacher_training_cpu_wall_hours_per_fold_epoch": round(teacher_steps_per_epoch * step["wall_s"] / hour, 2),
        "teacher_training_cpu_wall_years_5_folds_3000_epochs": round(
            5 * 3000 * teacher_steps_per_epoch * step["wall_s"] / (hour * 24 * 365), 1),
        "gpu_seconds_per_stage": None,
        "how": "per-case means of 'measured' times FLARE22's case counts (50 labelled, 2000 unlabelled, 750 for the "
               "paper's pseudo-labels); slices per labelled case on the paper's grid from the cached cases; a fold "
               "trains on 4/5 of the labelled cases; CPU training time = steps x the measured CPU step",
    }  # fmt: skip


def main(
    labelled: int = typer.Option(2, help="full-size labelled cases generated and cached"),
    unlabelled: int = typer.Option(1, help="full-size unlabelled cases generated, cached and pseudo-labelled"),
    steps: int = typer.Option(2, help="training steps timed (after one warm-up)"),
    batches: int = typer.Option(4, help="loader batches before the worker's memory is read"),
    seed: int = typer.Option(1000, help="phantom seed (not one the datasets of the project use)"),
    out: Path = typer.Option(REPO / "docs" / "results" / "flare22_cost.json"),
) -> None:
    load_before = os.getloadavg()[0]
    rt = setup_runtime("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        t0 = time.perf_counter()
        generate_dataset(data, labelled=labelled, unlabelled=unlabelled, validation=0, seed=seed, size="full",
                         progress=False)  # fmt: skip
        gen_s = time.perf_counter() - t0
        lab, unl = discover_labelled(data / "labelled"), discover_unlabelled(data / "unlabelled")
        cfg = resolve_window(PAPER, lab, Path(tmp), rt)
        cache_l, cache_u = cache_cost(lab, cfg.spec(), cache), cache_cost(unl, cfg.spec(), cache)
        for r in cache_l + cache_u:
            r["bytes"], r["slices"] = r["image_bytes"] + r["label_bytes"], r["shape_zyx"][0]
        pseudo = pseudo_cost(unl, paper_teacher(cfg.spec()), cache, rt)
        worker = worker_memory(build_cache(lab, cfg.spec(), cache, quiet=True), cfg, rt, batches)
        step = step_seconds(cfg, steps)
    result = {
        "command": "python benchmarks/bench_flare22_cost.py " + " ".join(
            f"--{k} {v}" for k, v in (("labelled", labelled), ("unlabelled", unlabelled), ("steps", steps),
                                       ("batches", batches), ("seed", seed))),
        "sizes": {"spacing_xyz_mm": list(cfg.spacing_xyz_mm), "width": 32, "depth": 5, "patch": cfg.patch_size,
                  "batch": cfg.batch_size, "augment": "flips 0.5, rotations 0.5, distortions 0.2",
                  "normalization": cfg.normalization, "phantom_size": "full"},
        "measured": {"phantom_generation_s_total": round(gen_s, 1), "cache_labelled": cache_l,
                     "cache_unlabelled": cache_u, "pseudo_label": pseudo, "loader_worker": worker,
                     "train_step_cpu": step},
        "extrapolated_flare22": extrapolate(cache_l, cache_u, pseudo, worker, step),
        "not_measured": "GPU time of every stage: no GPU on the machine that ran this",
        "machine": machine_record(load_before, torch=torch.__version__),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["extrapolated_flare22"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
