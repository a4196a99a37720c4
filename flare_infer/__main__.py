"""Command line: predict every CT in a folder; evaluate, preview and profile as subcommands too.

    python -m flare_infer predict INPUT_DIR OUTPUT_DIR [--model weights/student.onnx] [--device auto|cuda|cpu]
        [--precision auto|fp32|fp16] [--cuda-arena-mib 768] [--batch-size N] [--postprocess none|lcc]
        [--restore linear|nearest] [--preview] [--shard K/N] [--threads N] [--no-read-ahead]
        [--output-format nifti|dicom-seg|rtstruct] [--statistics]

Every `*.nii.gz` / `*.nii` in INPUT_DIR is a case; `NAME_0000.nii.gz` writes `NAME.nii.gz`, other
names keep theirs. An INPUT_DIR without them is searched for DICOM files (any folder structure): each CT series
is a case (`flare_infer.dicom`: naming, what is skipped or refused), written as NAME.nii.gz, NAME.seg.dcm or
NAME.rtstruct.dcm (`--output-format`); `--statistics` adds NAME.statistics.json and one CSV for the run.
A case that fails logs `ERROR <file name>: <reason>` on stderr and the others go on. Exit code: 0 every case
written, 1 some case failed, 2 usage error (nothing was processed).
The first case is read while onnxruntime starts, and each next case while the current one is on the
network (`io.ReadAhead`, a background thread). argparse rather than typer here: typer (with the
pydantic it loads to coerce options) costs 0.30 s of CPU at every start, argparse 0.03 s (measured,
docs/PERFORMANCE.md), and the container pays the start once per case.

    python -m flare_infer evaluate PRED_DIR GT_DIR ...     # = python -m flare_infer.evaluate (FLARE22 DSC, NSD)
    python -m flare_infer preview IMAGE [MASK] ...         # = python -m flare_infer.preview (overlay PNG)
    python -m flare_infer profile --out R.json -- CMD ...  # = python -m flare_infer.profile (time, memory)
Those three are handed to their module's own command line (`TOOLS`), imported only when asked for, so
`predict` starts as fast as before.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from flare_infer import io
from flare_infer.cli import HelpFormatter, at_least
from flare_infer.cli import choices as one_of
from flare_infer.hosts import available_cpus
from flare_infer.postprocess import POSTPROCESS_CHOICES
from flare_infer.restore import RESTORE_CHOICES
from flare_infer.session import CUDA_ARENA_LIMIT_BYTES, DEVICES, PRECISIONS

log = logging.getLogger("flare_infer")

DEFAULT_MODEL = Path("weights/student.onnx")
EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2
STAGES = ("read", "preprocess", "infer", "restore", "write")
OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")  # the last two need DICOM input (flare_infer.dicom_out)


class UsageError(Exception):
    """Bad arguments or environment: reported before any case is processed, exit code 2."""


def default_model_candidates() -> list[Path]:
    """weights/student.onnx beside the package's checkout, in /workspace (the container), then in the cwd."""
    repo_root = Path(__file__).resolve().parents[1]
    candidates = [repo_root / DEFAULT_MODEL, Path("/workspace") / DEFAULT_MODEL, Path.cwd() / DEFAULT_MODEL]
    return list(dict.fromkeys(candidates))  # unique, in order


def resolve_model(model: Path | None) -> Path:
    if model is not None:
        if not model.is_file():
            raise UsageError(f"--model {model}: file not found")
        return model
    candidates = default_model_candidates()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UsageError(
            "the shipped weights are not there yet: no weights/student.onnx in "
            + ", ".join(str(p.parent) for p in candidates)
            + ". Train and export them (`python -m training.student ...`, then `python -m training.export ...`) "
            "or pass --model PATH.onnx (with its PATH.json sidecar)."
        )
    return found


def parse_shard(shard: str) -> tuple[int, int]:
    """`K/N` -> (K, N) with 0 <= K < N: this process takes cases K, K+N, K+2N, ..."""
    try:
        k, n = (int(s) for s in shard.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be K/N (for example 0/4), found {shard!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard K/N needs 0 <= K < N, found {shard!r}")
    return k, n


@dataclass
class Outputs:
    """What each case writes: the mask's format, the statistics, and for DICOM cases the series reader."""

    format: str = "nifti"  # one of OUTPUT_FORMATS
    statistics: bool = False  # NAME.statistics.json per case and one CSV for the run
    dicom: object = None  # a flare_infer.dicom.SeriesReader where the cases are DICOM series, else None
    shard: tuple[int, int] = (0, 1)
    documents: list = field(default_factory=list)  # each written case's statistics, for the run's CSV

    def name(self, path: Path) -> str:
        if self.dicom is None:
            return io.output_name(path)
        from flare_infer.dicom_out import output_name

        return output_name(path.name, self.format)

    def writer(self, path: Path):
        """The atomic writer of `path`'s mask: NIfTI by `io.write_mask`, DICOM by `flare_infer.dicom_out`."""
        if self.format == "nifti":
            return io.write_mask
        from flare_infer import dicom_out

        return lambda mask, out: dicom_out.write(self.format, mask, self.dicom.headers(path.name), out)


def check_folders(input_dir: Path, output_dir: Path, output_format: str = "nifti") -> tuple[list[Path], object]:
    """Cases of `input_dir` and, for DICOM series, their reader (else None); raises `UsageError` for a missing/empty
    input, a DICOM output asked of NIfTI input, or an unwritable output folder."""
    if not input_dir.is_dir():
        raise UsageError(f"input folder {input_dir} does not exist or is not a folder")
    cases, reader = io.list_cases(input_dir), None
    if cases and output_format != "nifti":
        raise UsageError(f"--output-format {output_format} needs DICOM input, and {input_dir} holds NIfTI files "
                         "(*.nii.gz, *.nii): use --output-format nifti")  # fmt: skip
    if not cases:
        cases, reader = _dicom_cases(input_dir, output_format)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output folder {output_dir} cannot be written ({e.strerror or e})") from None
    return cases, reader


def _dicom_cases(input_dir: Path, output_format: str) -> tuple[list[Path], object]:
    """The DICOM CT series below `input_dir` as cases (one line per skipped series and bad file), and their reader."""
    try:
        from flare_infer import dicom
    except ImportError as e:
        raise UsageError(f"input folder {input_dir} holds no *.nii.gz or *.nii file, and DICOM input needs the "
                         f"`dicom` extra (pip install -e \".[cpu,dicom]\"): {e}") from None  # fmt: skip
    found = dicom.scan(input_dir)
    dicom.log_scan(found, input_dir)
    if not found.series:
        raise UsageError(f"input folder {input_dir} holds no *.nii.gz or *.nii file and no DICOM CT series "
                         f"({len(found.skipped)} series skipped, {len(found.bad_files)} bad DICOM files, "
                         f"{found.not_dicom} other files)")  # fmt: skip
    return dicom.case_paths(input_dir, found.series), dicom.SeriesReader(
        found.series, bad_files=len(found.bad_files), keep_headers=output_format != "nifti"
    )


def _load(
    model_path: Path, device: str, threads: int | None, precision: str = "auto", cuda_arena_mib: int | None = None
):
    from flare_infer.session import load_model  # onnxruntime is imported only when predicting
    from flare_infer.spec import SpecError

    try:
        return load_model(
            model_path, device=device, threads=threads, precision=precision,
            cuda_arena_bytes=cuda_arena_mib * 2**20 if cuda_arena_mib else None,
        )  # fmt: skip
    except (SpecError, RuntimeError, ValueError) as e:
        raise UsageError(f"model {model_path}: {e}") from None


def _save_preview(result, out_png: Path) -> None:
    try:
        from flare_infer.preview import save_preview

        save_preview(result.image, result.mask, out_png)
    except Exception as e:  # a missing picture must not fail a case whose mask is written
        log.warning("WARNING %s: preview not written (%s: %s)", out_png.name, type(e).__name__, e)


def run_cases(
    cases: list[Path], output_dir: Path, model, *, batch_size: int, postprocess: str, preview: bool,
    restore: str = "linear", ahead: io.ReadAhead | None = None, outputs: Outputs | None = None,
) -> int:  # fmt: skip
    """Predict each case, log one line per case; return the number of failed cases.

    Case i + 1 is read in a background thread while case i runs (`io.ReadAhead`); its read errors are
    reported for case i + 1, when its turn comes.
    """
    from flare_infer.pipeline import predict_file

    failed = 0
    totals = dict.fromkeys(STAGES, 0.0)
    outputs = outputs or Outputs()
    with ahead or io.ReadAhead() as ahead:
        for i, path in enumerate(_progress(cases)):
            if i + 1 < len(cases):
                ahead.schedule(cases[i + 1])
            failed += not _run_case(path, output_dir, model, predict_file, totals, batch_size=batch_size,
                                    postprocess=postprocess, preview=preview, restore=restore,
                                    read=ahead.read, outputs=outputs)  # fmt: skip
    if outputs.statistics:
        _write_run_statistics(outputs, output_dir)
    done = len(cases) - failed
    log.info("%d of %d cases written, %d failed; seconds per stage over all cases: %s", done, len(cases), failed,
             " ".join(f"{s} {totals[s]:.1f}" for s in STAGES))  # fmt: skip
    return failed


def _run_case(path: Path, output_dir: Path, model, predict_file, totals: dict, *, batch_size: int, postprocess: str,
              preview: bool, restore: str, read=io.read_ct, outputs: Outputs | None = None) -> bool:  # fmt: skip
    """One case, logged; False (and an `ERROR <file name>: <reason>` line) if it failed."""
    outputs = outputs or Outputs()
    out_path = output_dir / outputs.name(path)
    try:
        result = predict_file(
            path, out_path, model.predict, model.spec,
            batch_size=batch_size, postprocess=postprocess, fixed_batch=model.fixed_batch, restore_method=restore,
            read=read, write=outputs.writer(path),
        )  # fmt: skip
    except Exception as e:  # one bad case never stops the others; the reason is logged with its name
        reason = str(e) if isinstance(e, io.InputError) else f"{type(e).__name__}: {e}"
        print(f"ERROR {path.name}: {reason}", file=sys.stderr, flush=True)
        if not isinstance(e, io.InputError):  # not the input's fault: where it happened, for a bug report
            log.error("%s: traceback of the %s", path.name, type(e).__name__, exc_info=e)
        return False
    for stage, seconds in result.seconds.items():
        totals[stage] += seconds
    stages = " ".join(f"{s} {result.seconds[s]:.2f}s" for s in STAGES)
    log.info("%s -> %s: %s [%s]", path.name, out_path.name, stages, model.provider)
    stem = out_path.name.split(".nii")[0] if outputs.dicom is None else path.name
    if preview:
        _save_preview(result, out_path.with_name(stem + ".png"))
    if outputs.statistics:
        return _write_case_statistics(result, stem, out_path.parent, outputs)
    return True


def _write_case_statistics(result, stem: str, output_dir: Path, outputs: Outputs) -> bool:
    """NAME.statistics.json of a written case (on the input's grid, from the mask written); False if it failed."""
    from flare_infer import statistics

    try:
        document = statistics.case_document(stem, result.image, result.mask)
        statistics.write_case_json(document, output_dir / statistics.json_name(stem))
    except Exception as e:  # the mask is written; the case is failed all the same, as its asked-for output is not
        print(f"ERROR {stem}: statistics not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return False
    outputs.documents.append(document)
    return True


def _write_run_statistics(outputs: Outputs, output_dir: Path) -> None:
    from flare_infer import statistics

    path = output_dir / statistics.csv_name(outputs.shard)
    statistics.write_csv(outputs.documents, path)
    log.info("statistics of %d cases in %s", len(outputs.documents), path)


def _progress(cases: list[Path]):
    """A progress bar over cases on an interactive terminal; plain iteration in logs."""
    if not sys.stderr.isatty():
        yield from cases
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(cases, description="cases", console=Console(stderr=True), transient=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flare_infer", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = commands.add_parser("predict", help="segment every CT in INPUT_DIR into OUTPUT_DIR",
                            description="Segment every CT in INPUT_DIR into OUTPUT_DIR.",
                            formatter_class=HelpFormatter)  # fmt: skip
    for name, (_, summary) in TOOLS.items():  # listed here; app() hands their arguments to their module
        commands.add_parser(name, help=summary, add_help=False)
    p.add_argument("input_dir", type=Path, metavar="INPUT_DIR",
                   help="folder of CTs (*.nii.gz, *.nii), or of DICOM files (each CT series a case)")  # fmt: skip
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="folder for the masks (created)")
    p.add_argument("--model", type=Path, help="NAME.onnx with NAME.json beside it (default: weights/student.onnx)")
    p.add_argument("--device", default="auto", metavar=one_of(DEVICES),
                   help="auto = CUDA if onnxruntime has it, else CPU")  # fmt: skip
    p.add_argument(
        "--precision",
        default="auto",
        metavar=one_of(PRECISIONS),
        help="auto = NAME.fp16.onnx on CUDA where its sidecar records a passed check",
    )
    p.add_argument(
        "--cuda-arena-mib",
        type=at_least(64),
        default=CUDA_ARENA_LIMIT_BYTES // 2**20,
        help="onnxruntime's CUDA arena cap, MiB (effect on the whole device unmeasured)",
    )
    p.add_argument("--batch-size", type=at_least(1), default=16, help="axial slices per network call")
    p.add_argument("--postprocess", default="none", metavar=one_of(POSTPROCESS_CHOICES),
                   help="lcc = largest connected component per organ")  # fmt: skip
    p.add_argument(
        "--restore",
        default="linear",
        metavar=one_of(RESTORE_CHOICES),
        help="linear = class probabilities interpolated onto the CT, then argmax; nearest = the nearest label",
    )
    p.add_argument(
        "--preview",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also write NAME.png: axial, coronal, sagittal slices with the mask",
    )
    p.add_argument("--shard", default="0/1", help="K/N: process cases K, K+N, K+2N, ... (split a folder over machines)")
    p.add_argument("--threads", type=at_least(1), help="CPU threads, onnxruntime and ITK (default: all allowed)")
    p.add_argument("--read-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="read the next case in a background thread (holds one more CT, at most 128 MiB of "
                        "voxels: a larger one is read in its turn)")  # fmt: skip
    p.add_argument("--output-format", default="nifti", choices=OUTPUT_FORMATS,
                   help="nifti: NAME.nii.gz; dicom-seg: NAME.seg.dcm (DICOM Segmentation); rtstruct: NAME.rtstruct.dcm "
                        "(RT Structure Set); the DICOM ones need DICOM input (the `dicom` extra)")  # fmt: skip
    p.add_argument("--statistics", action=argparse.BooleanOptionalAction, default=False,
                   help="also write NAME.statistics.json per case (volume, HU, bounding box, cut by the edge) and "
                        "statistics.csv for the run")  # fmt: skip
    return parser


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Serve large arrays from one heap and keep freed memory for the next ones (glibc; False elsewhere).

    By default glibc maps every array over 128 kB-32 MB afresh and unmaps it when freed, so each temporary of a case
    (the network's 44 MB score batches, restore's chunks, ...) is page-faulted and zeroed by the kernel anew: on
    the bench CT (512 x 512 x 200, docs/PERFORMANCE.md) 264k page faults and 1.1-2.0 s of system CPU per case; with
    this, 119k and 0.7-0.9 s, and 45 MB less peak RSS (one arena instead of one per thread). Up to `KEEP_BYTES` freed
    at the heap's top stays mapped between cases.

    Elsewhere (Windows: `CDLL(None)` raises TypeError; macOS: no `mallopt`) or where glibc refuses a setting
    (mallopt returns 0) the allocator is left as it is, and a debug line says so.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's on Linux
    except (OSError, AttributeError, TypeError):
        log.debug("allocator left as it is: no mallopt in this process (%s)", sys.platform)
        return False
    settings = (("M_ARENA_MAX", M_ARENA_MAX, 1), ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, KEEP_BYTES),
                ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, KEEP_BYTES))  # fmt: skip
    refused = [f"{name}={value}" for name, param, value in settings if mallopt(param, value) != 1]  # all tried
    if refused:
        log.debug("mallopt refused %s: the allocator keeps its default for those", ", ".join(refused))
    return not refused


def no_huge_pages_for_numpy() -> bool:
    """Stop numpy advising transparent huge pages for its arrays; False where this numpy has no such switch.

    On Linux numpy asks the kernel for 2 MB pages (madvise) for every array of 4 MB or more. Where the kernel gives
    them only on such advice (`/sys/kernel/mm/transparent_hugepage/enabled` and `defrag` both `madvise`, as on the
    development machine, a VM) each first touch of one zeroes 2 MB and may compact memory first: on the bench CT
    (docs/PERFORMANCE.md) 1.2-1.5 s of system CPU per case with the advice, 0.6-0.7 s without, and 0.6 s less wall.
    The same as NUMPY_MADVISE_HUGEPAGE=0, which numpy reads only when first imported.
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # numpy 2
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # numpy 1.20-1.26
        except ImportError:
            import numpy

            log.debug("numpy %s has no huge-page switch: its advice left as it is", numpy.__version__)
            return False
    _set_madvise_hugepage(False)
    return True


def _check_choices(args: argparse.Namespace) -> None:
    for option, choices in (("device", DEVICES), ("postprocess", POSTPROCESS_CHOICES), ("restore", RESTORE_CHOICES),
                            ("precision", PRECISIONS)):  # fmt: skip
        if getattr(args, option) not in choices:
            raise UsageError(f"--{option} must be one of {choices}, found {getattr(args, option)!r}")


def predict(args: argparse.Namespace) -> int:
    """Segment every CT in args.input_dir into args.output_dir; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    keep_freed_memory()  # before the first large array and the first thread
    no_huge_pages_for_numpy()
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's header warnings are noise; refusals say why
    # ITK reads and writes in threads too: --threads, else at most the CPUs the host's quota allows
    itk_default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads or min(itk_default, available_cpus()))
    try:
        _check_choices(args)
        k, n = parse_shard(args.shard)
        cases, dicom_reader = check_folders(args.input_dir, args.output_dir, args.output_format)
        cases = cases[k::n]
        model_path = resolve_model(args.model)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()
    outputs = Outputs(args.output_format, args.statistics, dicom_reader, (k, n))
    with io.ReadAhead(enabled=args.read_ahead, read=dicom_reader) as ahead:
        if cases:
            ahead.schedule(cases[0])  # read while onnxruntime loads and the session is built
        try:
            loaded = _load(model_path, args.device, args.threads, args.precision, args.cuda_arena_mib)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        log.info("model %s on %s; %d cases (shard %d/%d)", loaded.model_path, loaded.provider, len(cases), k, n)
        trained_on = loaded.spec.extra.get("trained_on")
        if trained_on:  # once per run: no user takes phantom-trained weights for a FLARE22 model (issue 26)
            log.info("weights trained on %s", trained_on)
        if loaded.provider == "CPUExecutionProvider" and args.device != "cpu":
            log.info("no usable NVIDIA GPU (no driver visible or no CUDA in this onnxruntime): running on the CPU")
        failed = run_cases(
            cases, args.output_dir, loaded, batch_size=args.batch_size, postprocess=args.postprocess,
            preview=args.preview, restore=args.restore, ahead=ahead, outputs=outputs,
        )  # fmt: skip
        failed += getattr(dicom_reader, "bad_files", 0)  # DICOM files whose header was unusable: ERROR lines above
    log.info("total %.1f s", time.perf_counter() - start)
    return EXIT_CASE_FAILED if failed else EXIT_OK


# The other commands: (module whose `_cli(argv, prog)` parses and runs them, one line for the command list)
TOOLS = {
    "evaluate": ("flare_infer.evaluate", "FLARE22 DSC and NSD of PRED_DIR against GT_DIR"),
    "preview": ("flare_infer.preview", "overlay PNG of a CT and a mask"),
    "profile": ("flare_infer.profile", "time, GPU memory, CPU and RAM of a command, as the organisers measured"),
}


def app(argv: list[str] | None = None) -> None:
    """Parse, run, exit with the command's code (argparse's own usage errors exit 2, like ours)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        module._cli(argv[1:], prog=f"python -m flare_infer {argv[0]}")  # exits with the command's status
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(predict(args))


def exit_now(code: int | str | None) -> NoReturn:
    """Exit as `sys.exit(code)` would, with the logs and streams flushed, without the interpreter's teardown.

    The teardown frees every object of the last case (the CT, its resampled copy, the mask, the session) one by
    one, only for the kernel to drop the whole memory anyway: 0.16 s against 0.09 s from the last line to the
    exit status on the bench CT (5 runs each, by hand, docs/PERFORMANCE.md). Every file is written and closed before.
    """
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    try:
        app()
    except SystemExit as e:
        exit_now(e.code)
