"""Per-case time and whole-device GPU memory of onnxruntime-gpu, batch sizes 1 to 64, fp32 and fp16, cold start in.

    python benchmarks/gpu_bench.py --out results/gpu                       # on a GPU machine (docs/GPU.md)
    bash benchmarks/gpu_run.sh                                             # the same, on the device machine
    python benchmarks/gpu_bench.py --out /tmp/g --size small --cases 1 --batch-sizes 1 2 --width 8   # CPU fallback

Every configuration (precision x batch size x arena cap) runs in a FRESH process, so the cold start
counts: interpreter, `import onnxruntime`, CUDA/cuDNN load (`flare_infer.cuda_setup.preload_cuda`),
session creation (`flare_infer.session.load_model`, the deployed options: arena capped at
`--arena-mib`, default the shipped `CUDA_ARENA_LIMIT_BYTES`), then every case through the real path
`flare_infer.pipeline.predict_file` (read, prepare, predict_volume with fixed batches, restore, write).
`flare_infer.profile.profile_command` samples that process every 0.1 s: whole-device GPU memory
(NVML total - free, as the organisers), CPU and RAM. Reported per configuration: process wall time,
session creation, first case (cold) and the median of the later cases (warm), GPU memory as the
organisers count it (largest value in > 2% of samples), peak, the idle device's memory before the
process started (baseline), AUC GPU. Then the settings that keep GPU memory under `--limit-mib`.

Cases: `--cases` synthetic CTs generated with `training.phantoms` (`--size full`: FLARE22-like
512 x 512 x ~100-500 at 0.6-1.0 mm), written as .nii.gz once, read by every configuration.
Model: `--model NAME.onnx` (+ `--model-fp16`), with sidecars; else a randomly initialised
`training.model.UNet` of `--width` exported here with `training.export` (torch needed; speed and
memory do not depend on the weights' values), fp16 via `training.export.convert_fp16`.

Without CUDAExecutionProvider (onnxruntime without CUDA, or no GPU) the script says so and measures
on the CPU instead (GPU fields null), unless `--require-cuda`, which makes that an error (exit 3).
Writes OUT/gpu_bench.json and OUT/gpu_bench.md, rewritten after every configuration, so a run cut off
by `--time-limit` (or killed) keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_infer.profile import profile_command  # noqa: E402
from flare_infer.session import CUDA_ARENA_LIMIT_BYTES  # noqa: E402

MIB = 1024 * 1024
EXIT_NO_CUDA = 3
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class GpuBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    precisions: tuple[str, ...] = PRECISIONS
    arena_mib: tuple[int, ...] = (CUDA_ARENA_LIMIT_BYTES // MIB,)
    cases: int = 2  # the first is the cold case, the others give the warm per-case time
    size: str = "full"
    width: int = 32
    limit_mib: int = 1024  # "under 1 GB"
    time_limit_s: float = 420.0  # whole run; configurations that would start later are skipped
    config_timeout_s: float = 180.0  # one configuration's process
    seed: int = 60_000

    def __post_init__(self) -> None:
        if not set(self.precisions) <= set(PRECISIONS):
            raise ValueError(f"--precisions must be from {PRECISIONS}, found {self.precisions}")
        if self.cases < 1 or min(self.batch_sizes) < 1:
            raise ValueError(f"--cases and every batch size must be >= 1; found {self.cases}, {self.batch_sizes}")


@dataclass
class ConfigResult:
    precision: str
    batch_size: int
    arena_mib: int
    device: str
    status: str = "not run"  # ok / failed (exit N) / timed out / skipped (time limit)
    provider: str | None = None
    process_wall_s: float | None = None
    import_s: float | None = None  # import onnxruntime + CUDA preload
    session_s: float | None = None
    first_case_s: float | None = None
    warm_case_s: float | None = None  # median of cases 2..n
    case_s: list[float] = field(default_factory=list)
    stages_first: dict[str, float] = field(default_factory=dict)
    gpu_memory_mib: int | None = None  # organisers: largest value seen in > 2% of samples
    gpu_peak_mib: int | None = None
    gpu_baseline_mib: int | None = None  # the device before the process started
    auc_gpu_mib_s: float | None = None
    max_ram_mib: float | None = None
    cuda_preloaded: bool | None = None  # flare_infer.cuda_setup.preload_cuda() in the child
    error: str | None = None


# ----------------------------------------------------------------------------- the child: one configuration
def child_main(args: argparse.Namespace) -> int:
    """One fresh process: session, then every case through predict_file; timings to args.child_json."""
    t0 = time.perf_counter()
    import onnxruntime  # noqa: F401  (timed: part of the cold start)

    import flare_infer.session as session
    from flare_infer import io
    from flare_infer.pipeline import predict_file

    preloaded = None
    if args.device == "cuda":
        from flare_infer.cuda_setup import preload_cuda

        preloaded = preload_cuda()  # False is not fatal: LD_LIBRARY_PATH (gpu_run.sh) may still serve CUDA
    t1 = time.perf_counter()
    session.CUDA_ARENA_LIMIT_BYTES = args.arena_mib * MIB  # read when the session's providers are built
    try:
        model = session.load_model(args.model, device=args.device)
    except Exception as e:  # CUDA provider that does not start: the parent reports why
        Path(args.child_json).write_text(json.dumps({"error": f"session: {type(e).__name__}: {e}"}))
        raise
    t2 = time.perf_counter()
    out = {
        "import_s": t1 - t0, "session_s": t2 - t1, "provider": model.provider, "cuda_preloaded": preloaded,
        "case_s": [], "stages": [],
    }  # fmt: skip
    out_dir = Path(args.child_out)
    for path in io.list_cases(Path(args.cases_dir)):
        t = time.perf_counter()
        try:
            result = predict_file(
                path, out_dir / io.output_name(path), model.predict, model.spec,
                batch_size=args.batch_size, fixed_batch=model.fixed_batch,
            )  # fmt: skip
        except Exception as e:  # e.g. the arena cap too small for this batch: keep the reason
            out["error"] = f"case {path.name}: {type(e).__name__}: {str(e)[:500]}"
            Path(args.child_json).write_text(json.dumps(out))
            raise
        out["case_s"].append(time.perf_counter() - t)
        out["stages"].append(result.seconds)
        Path(args.child_json).write_text(json.dumps(out))  # after every case: a timeout keeps what was done
    return 0


# ----------------------------------------------------------------------------- the parent
def cuda_available() -> tuple[bool, list[str]]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, providers
    from flare_infer.cuda_setup import nvidia_driver_visible

    return nvidia_driver_visible() or gpu_name() is not None, providers


def gpu_used_mib() -> int | None:
    """Whole-device memory used now (NVML total - free), None without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return round((info.total - info.free) / MIB)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, no driver, no device
        return None


def gpu_name() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            total = pynvml.nvmlDeviceGetMemoryInfo(h).total // MIB
            return f"{name if isinstance(name, str) else name.decode()} ({total} MiB), driver " + str(
                pynvml.nvmlSystemGetDriverVersion()
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def make_cases(out_dir: Path, cfg: GpuBenchConfig) -> list[dict]:
    from training.phantoms import WIDE_DOMAIN, generate_case, write_image

    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(cfg.cases):
        image, _ = generate_case(cfg.seed + i, WIDE_DOMAIN, cfg.size)
        path = out_dir / f"gpu_bench_{i:03d}_0000.nii.gz"
        write_image(image, path)
        cases.append({"file": path.name, "size_xyz": list(image.GetSize()), "spacing_xyz": list(image.GetSpacing())})
    return cases


def make_models(out_dir: Path, cfg: GpuBenchConfig, args: argparse.Namespace) -> tuple[dict[str, Path], list[str]]:
    """{precision: NAME.onnx} (sidecars beside them) and notes on how they were made."""
    if args.model:
        models = {"fp32": Path(args.model)}
        if args.model_fp16:
            models["fp16"] = Path(args.model_fp16)
        notes = [f"models given: {', '.join(f'{k} {v}' for k, v in models.items())}"]
        missing = sorted(set(cfg.precisions) - set(models))
        if missing:
            notes.append(f"no model for {missing} (pass --model-fp16): those configurations are skipped")
        return models, notes
    import torch

    from flare_infer.spec import ModelSpec, sidecar_path
    from training.export import ExportConfig, convert_fp16, export_onnx
    from training.model import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=cfg.width)).eval()
    fp32 = out_dir / f"unet_w{cfg.width}.onnx"
    try:
        export_onnx(model, fp32, ExportConfig(exporter="dynamo"))
        how = "dynamo, opset 18"
    except Exception as e:  # an older torch on the GPU machine: the legacy exporter gives the same graph
        print(f"dynamo export failed ({type(e).__name__}: {e}); using the torchscript exporter", flush=True)
        export_onnx(model, fp32, ExportConfig(exporter="torchscript", opset=17))
        how = "torchscript, opset 17"
    ModelSpec().save(sidecar_path(fp32))
    models = {"fp32": fp32}
    notes = [f"random-init UNet width {cfg.width} ({model.num_parameters():,} parameters), exported here ({how})"]
    if "fp16" in cfg.precisions:
        fp16 = out_dir / f"unet_w{cfg.width}.fp16.onnx"
        try:
            convert_fp16(fp32, fp16)
            ModelSpec().save(sidecar_path(fp16))
            models["fp16"] = fp16
            notes.append("fp16: training.export.convert_fp16 (float16 inside, float32 I/O)")
        except ImportError as e:
            notes.append(f"fp16 skipped: {e} (pip install onnxconverter-common)")
    return models, notes


def run_config(
    res: ConfigResult, model: Path, cases_dir: Path, work: Path, cfg: GpuBenchConfig, timeout_s: float
) -> ConfigResult:
    tag = f"{res.precision}_b{res.batch_size}_a{res.arena_mib}"
    child_json, child_out = work / f"{tag}.json", work / f"{tag}_masks"
    child_out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child-json", str(child_json), "--model", str(model),
        "--cases-dir", str(cases_dir), "--child-out", str(child_out), "--batch-size", str(res.batch_size),
        "--device", res.device, "--arena-mib", str(res.arena_mib),
    ]  # fmt: skip
    res.gpu_baseline_mib = gpu_used_mib()
    prof = profile_command(cmd, 0.1, timeout_s=timeout_s)
    res.process_wall_s = prof.wall_time_s
    res.gpu_memory_mib, res.auc_gpu_mib_s, res.max_ram_mib = prof.gpu_memory_mb, prof.auc_gpu_mb_s, prof.max_ram_mb
    res.gpu_peak_mib = max(prof.samples_gpu_mb) if prof.samples_gpu_mb else None
    child = json.loads(child_json.read_text()) if child_json.is_file() else {}
    res.error = child.get("error")
    if "provider" in child:
        res.provider, res.import_s, res.session_s = child["provider"], child["import_s"], child["session_s"]
        res.cuda_preloaded = child.get("cuda_preloaded")
        res.case_s = [round(s, 3) for s in child["case_s"]]
        res.first_case_s = res.case_s[0] if res.case_s else None
        res.warm_case_s = round(statistics.median(res.case_s[1:]), 3) if len(res.case_s) > 1 else None
        res.stages_first = {k: round(v, 3) for k, v in child["stages"][0].items()} if child["stages"] else {}
    expected = len(list(cases_dir.glob("*.nii.gz")))
    if prof.timed_out:
        res.status = f"timed out after {timeout_s:.0f} s ({len(res.case_s)} of {expected} cases)"
    elif prof.exit_code != 0:
        res.status = f"failed (exit {prof.exit_code})"
    else:
        res.status = "ok"
    shutil.rmtree(child_out, ignore_errors=True)  # masks are not needed, and a big run would fill the disk
    return res


def summarise(results: list[ConfigResult], cfg: GpuBenchConfig) -> list[str]:
    """Lines naming the settings under the memory limit, fastest (warm per-case time) first."""
    ok = [r for r in results if r.status == "ok" and r.gpu_memory_mib is not None]
    under = sorted((r for r in ok if r.gpu_memory_mib < cfg.limit_mib), key=lambda r: r.warm_case_s or r.first_case_s)
    if not ok:
        return [f"no GPU memory measured (no NVML or GPU, or nothing finished): no verdict on {cfg.limit_mib} MiB"]
    if not under:
        return [f"no configuration stayed under {cfg.limit_mib} MiB of whole-device GPU memory"]
    lines = [f"settings under {cfg.limit_mib} MiB whole-device GPU memory (organisers' measure), fastest first:"]
    for r in under:
        lines.append(
            f"  {r.precision} --batch-size {r.batch_size} (arena cap {r.arena_mib} MiB): {r.gpu_memory_mib} MiB, "
            f"warm {r.warm_case_s} s/case, cold first case {r.first_case_s} s, process {r.process_wall_s} s"
        )
    return lines


def markdown(results: list[ConfigResult], meta: dict, summary: list[str]) -> str:
    lines = [
        "| precision | batch | arena cap MiB | provider | status | process s | import+load s | session s | first case s"
        " | warm case s | GPU MiB (>2% samples) | GPU peak MiB | baseline MiB | AUC GPU MiB s | max RAM MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for r in results:
        status = r.status + (f": {r.error}" if r.error else "")
        lines.append(
            f"| {r.precision} | {r.batch_size} | {r.arena_mib} | {r.provider or '-'} | {status} | "
            f"{f(r.process_wall_s, 1)} | {f(r.import_s)} | {f(r.session_s)} | {f(r.first_case_s)} | "
            f"{f(r.warm_case_s)} | {f(r.gpu_memory_mib)} | {f(r.gpu_peak_mib)} | {f(r.gpu_baseline_mib)} | "
            f"{f(r.auc_gpu_mib_s, 0)} | {f(r.max_ram_mib, 0)} |"
        )
    head = [
        f"# GPU benchmark: onnxruntime per case, {meta['started']}",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- GPU: {meta['gpu']}; onnxruntime {meta['onnxruntime']} (providers {meta['providers']})",
        f"- device used: {meta['device']}" + (f" -- {meta['fallback']}" if meta.get("fallback") else ""),
        f"- cases: {meta['cases']}",
        *(f"- {n}" for n in meta["model_notes"]),
        "",
    ]
    return "\n".join(head + lines + [""] + summary) + "\n"


def write_results(out: Path, results: list[ConfigResult], meta: dict, cfg: GpuBenchConfig) -> list[str]:
    summary = summarise(results, cfg)
    payload = {"meta": meta, "settings": asdict(cfg), "results": [asdict(r) for r in results], "summary": summary}
    (out / "gpu_bench.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "gpu_bench.md").write_text(markdown(results, meta, summary))
    return summary


def parent_main(args: argparse.Namespace) -> int:
    cfg = GpuBenchConfig(
        batch_sizes=tuple(args.batch_sizes), precisions=tuple(args.precisions), arena_mib=tuple(args.arena_mib),
        cases=args.cases, size=args.size, width=args.width, limit_mib=args.limit_mib,
        time_limit_s=args.time_limit, config_timeout_s=args.config_timeout,
    )  # fmt: skip
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    has_cuda, providers = cuda_available()
    fallback = None
    if not has_cuda:
        why = (
            f"CUDAExecutionProvider is not available (this onnxruntime {ort.__version__} offers {providers})"
            if "CUDAExecutionProvider" not in providers
            else "onnxruntime has CUDAExecutionProvider but no NVIDIA driver is visible"
        )
        if args.require_cuda:
            print(f"error: {why}; install onnxruntime-gpu (docs/GPU.md) or drop --require-cuda", file=sys.stderr)
            return EXIT_NO_CUDA
        fallback = f"{why}: measuring on the CPU instead; these are NOT GPU numbers"
        print(f"WARNING: {fallback}", flush=True)
    device = "cuda" if has_cuda else "cpu"
    meta = {
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "gpu": gpu_name(), "onnxruntime": ort.__version__, "providers": providers, "device": device,
        "fallback": fallback,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        meta["cases"] = make_cases(work / "cases", cfg)
        meta["cases_generated_s"] = round(time.monotonic() - t, 1)
        models, meta["model_notes"] = make_models(work, cfg, args)
        print(f"cases {meta['cases']} ({meta['cases_generated_s']} s); {meta['model_notes']}", flush=True)
        results = [
            ConfigResult(p, b, a, device)
            for b in cfg.batch_sizes
            for p in cfg.precisions
            for a in cfg.arena_mib  # batch outermost: a cut-off run still has both precisions of the small batches
        ]
        for res in results:
            left = cfg.time_limit_s - (time.monotonic() - start)
            if res.precision not in models:
                res.status = "skipped (no model)"
            elif left < 20:
                res.status = "skipped (time limit)"
            else:
                run_config(res, models[res.precision], work / "cases", work, cfg, min(cfg.config_timeout_s, left))
            print(_progress_line(res), flush=True)
            write_results(out, results, meta, cfg)
    summary = write_results(out, results, meta, cfg)
    print("\n".join(["", *summary, f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}"]))
    return 0


def _progress_line(r: ConfigResult) -> str:
    return (
        f"{r.precision} batch {r.batch_size} arena {r.arena_mib}: {r.status}, first case {r.first_case_s} s, "
        f"warm {r.warm_case_s} s, GPU {r.gpu_memory_mib} MiB (peak {r.gpu_peak_mib}, baseline {r.gpu_baseline_mib})"
        + (f"; {r.error}" if r.error else "")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = GpuBenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--model", help="NAME.onnx (fp32) with NAME.json; default: a random-init UNet exported here")
    p.add_argument("--model-fp16", help="NAME.fp16.onnx with its sidecar (with --model)")
    p.add_argument("--width", type=int, default=d.width, help="U-Net width of the generated model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    p.add_argument("--precisions", nargs="+", default=list(d.precisions), choices=PRECISIONS)
    p.add_argument("--arena-mib", type=int, nargs="+", default=list(d.arena_mib), help="CUDA arena caps to try")
    p.add_argument("--cases", type=int, default=d.cases, help="generated CTs; the first is the cold case")
    p.add_argument("--size", default=d.size, choices=["full", "small"], help="training.phantoms size")
    p.add_argument("--limit-mib", type=int, default=d.limit_mib, help="the memory limit to report settings under")
    p.add_argument("--time-limit", type=float, default=d.time_limit_s, help="whole run (s): later configs skipped")
    p.add_argument("--config-timeout", type=float, default=d.config_timeout_s, help="one configuration's process (s)")
    p.add_argument("--require-cuda", action="store_true", help="exit 3 instead of falling back to the CPU")
    # internal: one configuration in a fresh process
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--cases-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_json is None and a.out is None:
        p.error("--out is required")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_json is not None:
        args.arena_mib = args.arena_mib[0]
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
