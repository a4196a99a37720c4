"""The body crop's speed-up with a paper-size U-Net: the project's predict against a plain pipeline (issue 16).

    python benchmarks/bench_crop.py --out docs/results/crop_speed.json [--slices 200] [--repeats 3]

Both sides run the same ONNX model (the paper's U-Net size: width 32, depth 5, untrained weights; the time
does not depend on them) on the same 512 x 512 x `--slices` int16 CT with air around the body
(`bench_pipeline.generate_ct`: the body is 83 % x 59 % of the field of view, its box about half the slice),
alternating, `--repeats` times each, in this one process:

- plain: SimpleITK read, canonical resampling to 1.5 x 1.5 x 2.5 mm, whole-volume mean/std normalisation,
  every slice through the network in batches, argmax, nearest restore onto the input grid, SimpleITK write;
- ours: `flare_infer.pipeline.predict_file` (body crop, only the body's box through the network, linear
  restore by default; `--restore nearest` to compare like with like).

Goal: ours <= 0.7 x plain. The JSON keeps every repeat's stage times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_pipeline import generate_ct  # noqa: E402

from flare_infer import geometry  # noqa: E402
from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.preprocess import mean_std, pad_slices  # noqa: E402
from flare_infer.session import load_model  # noqa: E402
from flare_infer.spec import ModelSpec, Normalization  # noqa: E402

SPACING = (1.5, 1.5, 2.5)


def paper_size_model(workdir: Path) -> Path:
    """ONNX + sidecar of an untrained width-32, depth-5 U-Net (the paper's size), exported as training does."""
    import torch

    from training.export import ExportConfig, export_onnx
    from training.model import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, width=32, depth=5, deep_supervision=True))
    path = workdir / "paper_size.onnx"
    export_onnx(net, path, ExportConfig())
    spec = ModelSpec(1, SPACING, Normalization("ct_window", window_hu=(-100.0, 300.0)))
    spec.save(path.with_suffix(".json"))
    print(f"paper-size U-Net: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", flush=True)
    return path


def plain(ct_path: Path, out_path: Path, predict, batch_size: int) -> dict[str, float]:
    """The straightforward pipeline: whole volume through the network, nearest labels back."""
    t, s = time.perf_counter(), {}
    image = sitk.ReadImage(str(ct_path))
    s["read"], t = time.perf_counter() - t, time.perf_counter()
    resampled = geometry.canonical_resample_ct(image, SPACING)
    vol = sitk.GetArrayViewFromImage(resampled)
    mean, std = mean_std(vol)
    vol = np.clip((vol - (mean - 3 * std)) / (6 * std), 0, 1).astype(np.float32)
    s["preprocess"], t = time.perf_counter() - t, time.perf_counter()
    labels = np.zeros(vol.shape, np.uint8)
    h, w = vol.shape[1:]
    for z0 in range(0, vol.shape[0], batch_size):
        batch = pad_slices(vol[z0 : z0 + batch_size, None])
        labels[z0 : z0 + batch_size] = predict(np.ascontiguousarray(batch)).argmax(1)[:, :h, :w]
    s["infer"], t = time.perf_counter() - t, time.perf_counter()
    mask = geometry.labels_to_image_grid(labels, geometry.Grid.of(resampled), image)
    s["restore"], t = time.perf_counter() - t, time.perf_counter()
    sitk.WriteImage(mask, str(out_path), useCompression=True)
    s["write"] = time.perf_counter() - t
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--restore", default="linear", choices=["linear", "nearest"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_crop_") as tmp:
        work = Path(tmp)
        model = load_model(paper_size_model(work), device="cpu")
        ct_path = work / "ct.nii.gz"
        sitk.WriteImage(generate_ct(args.slices), str(ct_path), useCompression=True)
        runs = {"plain": [], "ours": []}
        for _ in range(args.repeats):  # alternating: load on the machine moves both alike
            runs["plain"].append(plain(ct_path, work / "plain.nii.gz", model.predict, args.batch_size))
            r = predict_file(ct_path, work / "ours.nii.gz", model.predict, model.spec, batch_size=args.batch_size,
                             restore_method=args.restore)  # fmt: skip
            runs["ours"].append(r.seconds)
            print({k: round(sum(v[-1].values()), 2) for k, v in runs.items()}, flush=True)
    totals = {k: [sum(r.values()) for r in v] for k, v in runs.items()}
    ratios = [o / p for o, p in zip(totals["ours"], totals["plain"], strict=True)]
    record = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "ct": f"512 x 512 x {args.slices} int16, 0.8 x 0.8 x 2.5 mm (benchmarks/bench_pipeline.generate_ct)",
        "model": "untrained U-Net width 32, depth 5 (the paper's size), ONNX Runtime CPU, 1.5 x 1.5 x 2.5 mm",
        "restore": args.restore,
        "median_seconds": {k: round(statistics.median(v), 2) for k, v in totals.items()},
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "runs": {k: [{s: round(x, 3) for s, x in r.items()} for r in v] for k, v in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("median_seconds", "ratio_per_repeat", "ratio_median")}))


if __name__ == "__main__":
    main()
