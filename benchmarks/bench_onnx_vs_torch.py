"""ONNX Runtime (CPU) against eager PyTorch and torch.compile: same weights, same slices, same threads.

    python benchmarks/bench_onnx_vs_torch.py                                  # widths 32 and 16, batches 1 4 16
    python benchmarks/bench_onnx_vs_torch.py --checkpoint runs/student/best.pt --markdown out.md
    python benchmarks/bench_onnx_vs_torch.py --quick                          # seconds: does the code path run

Model: `training.model.UNet` at each `--width`, randomly initialised (Kaiming, eval-mode batch norm
with its initial statistics), or the weights of `--checkpoint` (its width, not `--width`). Speed does
not depend on the weights' values, only on the architecture and the input shape. Exported with
`training.export.export_onnx` (main head only, dynamic batch/H/W; `--exporter dynamo` opset 18 as
shipped, or `torchscript` opset 17) and loaded through `flare_infer.session.load_model`, the deployed
session (ORT_ENABLE_ALL, intra-op threads = `--threads`, inter-op 1).

Slices: a full-size synthetic CT (`training.phantoms`, wide domain) prepared as deployed
(`flare_infer.pipeline.prepare`: 1.5 x 1.5 x 2.5 mm, normalised to [0, 1]) and padded to a multiple of
16 by the predictor's own code; the `batch` slices around the middle of the volume. `--slices random`
uses uniform [0, 1] slices of `--size` instead.

Timing: for each (width, batch), after `--warmup` calls of each backend, `--repeats` rounds in which
every backend runs once, in turn (interleaved, so load on a shared machine hits all alike); the median
per call, divided by the batch, is reported per slice. torch runs under `torch.inference_mode()` with
`torch.set_num_threads(--threads)`. torch.compile (inductor, default mode, static shapes) is compiled
during its warm-up; its first-call time per shape is reported as the compile time; a failure is
reported with its reason and the other columns still come out. Inductor caches compiled graphs on
disk, so a second run compiles in seconds: the compile column of a first run is the cold figure.
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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from flare_infer.predictor import gather_batch  # noqa: E402
from flare_infer.preprocess import pad_slices  # noqa: E402
from flare_infer.session import default_threads, load_model  # noqa: E402
from flare_infer.spec import ModelSpec, sidecar_path  # noqa: E402
from training.export import ExportConfig, MainHead, export_onnx  # noqa: E402
from training.model import UNet, UNetConfig  # noqa: E402

BACKENDS = ("onnxruntime", "torch eager", "torch.compile")


@dataclass(frozen=True)
class BenchConfig:
    widths: tuple[int, ...] = (32, 16)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    checkpoint: str | None = None
    slices: str = "phantom"  # or "random"
    size: int = 352  # H = W of random slices
    phantom_seed: int = 7  # a 512 x 512 x 214 CT at 0.99 mm -> 338 x 338 at 1.5 mm -> 352 x 352 padded
    exporter: str = "dynamo"
    compile: bool = True

    def __post_init__(self) -> None:
        if self.slices not in ("phantom", "random"):
            raise ValueError(f"--slices must be phantom or random, found {self.slices!r}")
        if self.repeats < 1 or self.warmup < 1 or self.threads < 1:
            raise ValueError(f"--repeats, --warmup and --threads must be >= 1; found {self}")
        if self.size % 16:
            raise ValueError(f"--size must be a multiple of 16 (the U-Net's), found {self.size}")


@dataclass
class Row:
    width: int
    batch: int
    shape_nchw: tuple[int, ...]
    ms_per_slice: dict[str, float | None] = field(default_factory=dict)  # median per call / batch
    spread_ms: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # min, max per slice
    compile_s: float | None = None  # first call of torch.compile at this shape
    max_abs_diff: float | None = None  # |onnxruntime - torch eager| on the logits
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs
def phantom_volume(seed: int, spec: ModelSpec) -> np.ndarray:
    """(Z, Y, X) float32 in [0, 1]: a full-size synthetic CT prepared exactly as deployed."""
    from flare_infer.pipeline import prepare
    from training.phantoms import WIDE_DOMAIN, generate_case

    image, _ = generate_case(seed, WIDE_DOMAIN, "full")
    return prepare(image, spec).vol_zyx


def slice_batch(vol_zyx: np.ndarray | None, batch: int, channels: int, cfg: BenchConfig) -> np.ndarray:
    """(batch, channels, H16, W16) float32, as the predictor feeds the network."""
    if vol_zyx is None:
        rng = np.random.default_rng(batch)
        return rng.random((batch, channels, cfg.size, cfg.size), dtype=np.float32)
    start = max(0, vol_zyx.shape[0] // 2 - batch // 2)
    z = np.arange(start, start + batch) % vol_zyx.shape[0]
    return np.ascontiguousarray(pad_slices(gather_batch(vol_zyx, z, channels)), dtype=np.float32)


# ----------------------------------------------------------------------------- models
def build_model(width: int, cfg: BenchConfig) -> tuple[UNet, ModelSpec]:
    if cfg.checkpoint is None:
        torch.manual_seed(0)
        return UNet(UNetConfig(width=width)).eval(), ModelSpec()
    from training.loop import load_model as load_checkpoint

    model, _, spec = load_checkpoint(cfg.checkpoint, "cpu")
    return model.eval(), spec


def export(model: UNet, spec: ModelSpec, out_dir: Path, cfg: BenchConfig) -> tuple[Path, float]:
    """NAME.onnx + sidecar in out_dir; returns the path and the export time."""
    path = out_dir / f"unet_w{model.cfg.width}.onnx"
    t = time.perf_counter()
    export_onnx(model, path, ExportConfig(exporter=cfg.exporter, opset=18 if cfg.exporter == "dynamo" else 17))
    spec.save(sidecar_path(path))
    return path, time.perf_counter() - t


def torch_callables(model: UNet, cfg: BenchConfig) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    head = MainHead(model).eval()

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return head(torch.from_numpy(x)).numpy()

    fns = {"torch eager": eager}
    if cfg.compile:
        compiled = torch.compile(head, dynamic=False)

        def comp(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return compiled(torch.from_numpy(x)).numpy()

        fns["torch.compile"] = comp
    return fns


# ----------------------------------------------------------------------------- timing
def time_call(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def bench_shape(fns: dict, x: np.ndarray, row: Row, cfg: BenchConfig) -> None:
    """Warm up every backend, then `repeats` interleaved rounds; fills row.ms_per_slice."""
    live = {}
    for name, fn in fns.items():
        try:
            first = time_call(fn, x)
            for _ in range(cfg.warmup - 1):
                time_call(fn, x)
        except Exception as e:  # torch.compile may fail on a CPU without a usable compiler: report why
            row.notes.append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            traceback.print_exc(limit=3)
            continue
        if name == "torch.compile":
            row.compile_s = first
        live[name] = fn
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(cfg.repeats):
        for name, fn in live.items():
            times[name].append(time_call(fn, x))
    n = x.shape[0]
    for name in fns:
        t = times.get(name)
        row.ms_per_slice[name] = round(1000 * statistics.median(t) / n, 1) if t else None
        row.spread_ms[name] = (round(1000 * min(t) / n, 1), round(1000 * max(t) / n, 1)) if t else None


def run(cfg: BenchConfig) -> tuple[list[Row], dict]:
    torch.set_num_threads(cfg.threads)
    meta = {"load_before": os.getloadavg(), "started": _now()}
    widths = cfg.widths if cfg.checkpoint is None else (None,)
    vol_zyx = None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_ort_") as tmp:
        for width in widths:
            model, spec = build_model(width, cfg)
            if cfg.slices == "phantom" and vol_zyx is None:
                vol_zyx = phantom_volume(cfg.phantom_seed, spec)
                meta["phantom_prepared_zyx"] = list(vol_zyx.shape)
            path, export_s = export(model, spec, Path(tmp), cfg)
            onnx_model = load_model(path, device="cpu", threads=cfg.threads)
            meta[f"export_s_w{model.cfg.width}"] = round(export_s, 1)
            meta[f"params_w{model.cfg.width}"] = model.num_parameters()
            fns = {"onnxruntime": onnx_model.predict, **torch_callables(model, cfg)}
            for batch in cfg.batch_sizes:
                x = slice_batch(vol_zyx, batch, model.cfg.in_channels, cfg)
                row = Row(model.cfg.width, batch, tuple(x.shape))
                row.max_abs_diff = float(np.abs(fns["onnxruntime"](x) - fns["torch eager"](x)).max())
                bench_shape(fns, x, row, cfg)
                rows.append(row)
                print(_row_line(row), flush=True)
            del onnx_model
    meta["load_after"] = os.getloadavg()
    meta["finished"] = _now()
    return rows, meta


# ----------------------------------------------------------------------------- report
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ms(v: float | None) -> str:
    return "failed" if v is None else f"{v:.1f}"


def _ms_range(row: Row, name: str) -> str:
    """median (min to max) per slice."""
    spread = row.spread_ms.get(name)
    return _ms(row.ms_per_slice.get(name)) + (f" ({spread[0]:.0f}-{spread[1]:.0f})" if spread else "")


def _row_line(row: Row) -> str:
    ms = row.ms_per_slice
    return (
        f"width {row.width} batch {row.batch} {row.shape_nchw}: "
        + ", ".join(f"{k} {_ms(v)} ms/slice" for k, v in ms.items())
        + f"; eager/ORT {_ratio(ms.get('torch eager'), ms.get('onnxruntime'))}"
        + (f"; compile {row.compile_s:.1f} s" if row.compile_s is not None else "")
        + (f"; {'; '.join(row.notes)}" if row.notes else "")
    )


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    import onnxruntime as ort

    return {
        "cpu": cpu, "cores_allowed": default_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "onnxruntime": ort.__version__, "platform": platform.platform(),
    }  # fmt: skip


def markdown(rows: list[Row], meta: dict, cfg: BenchConfig) -> str:
    has_compile = cfg.compile
    head = "| width | batch | input (N, C, H, W) | ONNX Runtime ms/slice | torch eager ms/slice | eager / ORT |"
    sep = "|---|---|---|---|---|---|"
    if has_compile:
        head += " torch.compile ms/slice | compile / ORT | compile time (1st call) |"
        sep += "---|---|---|"
    head += " max abs logit diff ORT vs eager |"
    sep += "---|"
    lines = [head, sep]
    for r in rows:
        ms = r.ms_per_slice
        line = (
            f"| {r.width} | {r.batch} | {r.shape_nchw} | {_ms_range(r, 'onnxruntime')} | {_ms_range(r, 'torch eager')} "
            f"| {_ratio(ms['torch eager'], ms['onnxruntime'])} |"
        )
        if has_compile:
            comp = f"{r.compile_s:.1f} s" if r.compile_s is not None else "-"
            line += f" {_ms_range(r, 'torch.compile')} | {_ratio(ms['torch.compile'], ms['onnxruntime'])} | {comp} |"
        lines.append(line + f" {r.max_abs_diff:.2g} |")
    notes = ["ms/slice: median per call / batch, (min-max) over the timed rounds"]
    if has_compile:
        notes.append(
            "compile time: the first call at that shape; seconds, not a minute, when inductor's on-disk cache "
            "(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) holds the graph from an earlier run"
        )
    notes += sorted({n for r in rows for n in r.notes})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, nargs="+", default=[32, 16], help="U-Net widths (ignored with --checkpoint)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per shape (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per backend and shape")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch and onnxruntime intra-op threads")
    p.add_argument("--checkpoint", help="last.pt / best.pt of training: its weights and width instead of random ones")
    p.add_argument("--slices", default="phantom", choices=["phantom", "random"])
    p.add_argument("--size", type=int, default=352, help="H = W of --slices random")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--quick", action="store_true", help="width 8, batches 1 2, 64 x 64 random slices, 2 repeats")
    p.add_argument("--markdown", type=Path, help="write the table (and settings) here")
    p.add_argument("--json", type=Path, help="write rows and settings as JSON here")
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.batch_sizes, a.slices, a.size, a.repeats = [8], [1, 2], "random", 64, 2
    cfg = BenchConfig(
        widths=tuple(a.width), batch_sizes=tuple(a.batch_sizes), repeats=a.repeats, warmup=a.warmup,
        threads=a.threads, checkpoint=a.checkpoint, slices=a.slices, size=a.size, exporter=a.exporter,
        compile=not a.no_compile,
    )  # fmt: skip
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    info = machine()
    print(f"{info}\nsettings: {cfg}\nload average before: {os.getloadavg()}", flush=True)
    rows, meta = run(cfg)
    settings = (
        f"Settings: {cfg.threads} threads (torch.set_num_threads and ORT intra-op; inter-op 1), "
        f"ORT graph optimisation ORT_ENABLE_ALL, CPUExecutionProvider; export {cfg.exporter}; "
        f"weights {cfg.checkpoint or 'random (Kaiming init, seed 0)'}; slices {cfg.slices}"
        + (f" (phantom seed {cfg.phantom_seed}, prepared {meta.get('phantom_prepared_zyx')})" if cfg.slices == "phantom"
           else f" ({cfg.size} x {cfg.size})")
        + f"; warm-up {cfg.warmup}, median of {cfg.repeats} interleaved rounds.\n"
        f"Run {meta['started']} to {meta['finished']}; load average (1, 5, 15 min) before "
        f"{tuple(round(v, 2) for v in meta['load_before'])}, after {tuple(round(v, 2) for v in meta['load_after'])}.\n"
        f"Machine: {info['cpu']}, {info['cores_allowed']} cores allowed; torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}, Python {info['python']}.\n"
    )  # fmt: skip
    table = markdown(rows, meta, cfg)
    print("\n" + table + "\n" + settings)
    if args.markdown:
        args.markdown.write_text(table + "\n" + settings)
    if args.json:
        payload = {"machine": info, "settings": asdict(cfg), "meta": meta, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
