"""Read a CT safely, write a mask atomically, list the cases of a folder and name their outputs.

Every header is checked before any voxel is read (3D, one component, a known pixel type, positive
finite spacing, a voxel count under `MAX_VOXELS`); float voxels are then checked for NaN and
infinity. A refused file raises `InputError` whose message names the file and the reason.
Used by `flare_infer.pipeline` and the CLI (`python -m flare_infer predict ...`), which reads the
next case in a background thread (`ReadAhead`) while the current one is on the network.

Design note (isal read and write, `read_gzip_voxels`, `write_gzip_nifti`).
Invariants: (1) the image read is the one ITK's reader gives, voxel for voxel, with ITK's geometry and pixel type:
ITK parses the header, isal only inflates the voxel bytes into the image's own buffer, and anything but a plain
file (little-endian NIfTI-1, 3D, no scaling; isal installed) goes to ITK whole; (2) a damaged or short file is an
`InputError`, never a partly filled image; (3) at most 16 MB of inflated bytes exist besides the image (a file
of one value inflates a thousandfold); (4) the mask written decompresses to exactly the bytes of ITK's own `.nii`:
the header is ITK's for a one-voxel image of the same geometry with dim[1..3] patched (the only fields that
depend on the size), the probe file is removed, and `write_mask`'s temporary file and rename keep it atomic.
Why so: ITK inflates with zlib into a buffer of its own and then copies it into the image, and deflates with
zlib; isal is faster at both, and the read saves one copy of the voxels. Measured (benchmarks/bench_gzip.py,
docs/results/bench_gzip.json, bench CT 512 x 512 x 200, 5 repeats): read median 0.41 s against ITK's 0.53 s,
the mask written in 0.029 s against 0.35 s (1.4 MB instead of 1.0 MB: isal's level 1).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_infer.geometry import voxels_to_fill

# 2^31 voxels (1024 x 1024 x 2048): 4 GiB as int16 before any processing; a FLARE CT has ~0.1-0.3 of that.
MAX_VOXELS = 1024 * 1024 * 2048

_ACCEPTED_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
    sitk.sitkFloat32, sitk.sitkFloat64,
}  # fmt: skip
_FLOAT_PIXEL_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}
CASE_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """A case that cannot be processed; the message names the file and the reason."""


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"not a readable image header ({_first_line(e)})") from None
    return reader


def _first_line(e: Exception) -> str:
    """ITK messages span lines (source file, line, class); keep the informative last non-empty one."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def check_header(reader: sitk.ImageFileReader) -> None:
    """Raise `InputError` unless the header describes a 3D scalar image of sensible size and spacing."""
    dim = reader.GetDimension()
    if dim != 3:
        raise InputError(f"expected a 3D image, found {dim}D with size {reader.GetSize()}")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"expected a scalar image, found {reader.GetNumberOfComponents()} components per voxel")
    if reader.GetPixelID() not in _ACCEPTED_PIXEL_IDS:
        raise InputError(f"unsupported pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())}")
    size = reader.GetSize()
    n_voxels = int(np.prod(size, dtype=np.int64))
    if n_voxels > MAX_VOXELS or min(size) < 1:
        raise InputError(f"size {size} = {n_voxels} voxels is outside 1..{MAX_VOXELS} (1024 x 1024 x 2048)")
    spacing = reader.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be positive and finite, found {spacing} mm")
    if not all(np.isfinite(v) for v in (*reader.GetOrigin(), *reader.GetDirection())):
        raise InputError(f"origin/direction must be finite, found {reader.GetOrigin()} / {reader.GetDirection()}")


def read_ct(path: str | Path) -> sitk.Image:
    """Read a CT after checking its header; raise `InputError` for anything the pipeline cannot use."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found")
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    reader = _header(path)
    check_header(reader)
    # isal's read sees truncation itself and keeps NaN and infinity for check_finite: only ITK's needs the payload
    # checked first (which, for float voxels, inflates the whole file once more)
    image = read_gzip_voxels(path, reader)  # None where its conditions do not hold: ITK reads
    if image is None:
        check_nifti_payload(path, reader)
        try:
            image = reader.Execute()
        except RuntimeError as e:
            raise InputError(f"voxel data unreadable, truncated or corrupt ({_first_line(e)})") from None
    check_finite(image)
    return image


# Per decompression call: compressed bytes in, and at most so many voxel bytes out (a file of mostly one value
# inflates a thousandfold: the copy held at once stays small)
_GZIP_INPUT_BYTES, _GZIP_OUTPUT_BYTES = 1 << 20, 1 << 24


def read_gzip_voxels(path: Path, reader: sitk.ImageFileReader) -> sitk.Image | None:
    """The image ITK's reader would give for a plain `.nii.gz`, its voxels decompressed by isal straight into the
    image's buffer; None where isal is missing or the file is not plain (ITK then reads it).

    ITK's NIfTI reader decompresses with zlib into a buffer of its own and copies that into the image: on the bench
    CT (512 x 512 x 200 int16, docs/PERFORMANCE.md) 0.50-0.56 s against 0.40-0.46 s here (3 fresh processes each, by
    hand). Plain: a little-endian NIfTI-1 header (checked in the data), 3 dimensions, no intensity scaling. The
    header (geometry, pixel type) is ITK's own reading of it; for a header `check_header` accepts (one component,
    a pixel type of `_ACCEPTED_PIXEL_IDS`) and no scaling, ITK's pixel type is the file's datatype, voxel for voxel.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    keys = set(reader.GetMetaDataKeys())
    if not path.name.lower().endswith(".nii.gz") or not {"vox_offset", "scl_slope", "scl_inter", "dim[0]"} <= keys:
        return None
    slope, inter = float(reader.GetMetaData("scl_slope")), float(reader.GetMetaData("scl_inter"))
    if int(reader.GetMetaData("dim[0]")) != 3 or slope not in (0.0, 1.0) or inter != 0.0:
        return None
    image = sitk.Image(reader.GetSize(), reader.GetPixelID())
    voxels = voxels_to_fill(image).reshape(-1).view(np.uint8)
    try:
        filled = _inflate_into(voxels, path, skip=int(float(reader.GetMetaData("vox_offset"))), inflate=isal_zlib)
    except isal_zlib.error as e:
        raise InputError(f"compressed data truncated or corrupt ({e})") from None
    if filled is None:
        return None
    if filled < len(voxels):
        raise InputError(f"voxel data truncated: the header needs {len(voxels)} voxel bytes, the file holds {filled}")
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def _inflate_into(voxels: np.ndarray, path: Path, *, skip: int, inflate) -> int | None:
    """Decompress the gzip file `path` (one or more members), drop its first `skip` bytes (the header) and copy the
    rest into the bytes `voxels` until full; the number of bytes copied, or None for a big-endian or NIfTI-2
    header (its first field, sizeof_hdr, is not 348 little-endian). `inflate`: a zlib-like module (isal_zlib)."""
    head, filled = b"", 0
    with path.open("rb") as f:
        stream = inflate.decompressobj(wbits=31)  # 31: gzip
        chunk = f.read(_GZIP_INPUT_BYTES)
        while chunk and filled < len(voxels):
            data = stream.decompress(chunk, _GZIP_OUTPUT_BYTES)
            if len(head) < 4:
                head += data[: 4 - len(head)]
                if len(head) == 4 and head != struct.pack("<i", 348):
                    return None
            dropped = min(skip, len(data))
            skip -= dropped
            n = min(len(data) - dropped, len(voxels) - filled)
            if n > 0:
                voxels[filled : filled + n] = np.frombuffer(data, np.uint8, n, dropped)
                filled += n
            if stream.unconsumed_tail:  # more output than one call gives (a highly compressible file)
                chunk = stream.unconsumed_tail
            elif stream.eof and stream.unused_data:  # one gzip member ends and another follows
                chunk, stream = stream.unused_data, inflate.decompressobj(wbits=31)
            else:
                chunk = f.read(_GZIP_INPUT_BYTES)
    return filled


# NIfTI datatype codes of float voxels -> numpy dtype without byte order
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK_BYTES = 1 << 24


def check_nifti_payload(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse truncated voxel data and NaN/inf floats, which ITK's NIfTI reader lets through silently.

    ITK reads a truncated `.nii.gz` without error and turns NaN and infinity into 0, so these checks look at
    the file itself. An integer `.nii.gz` whose gzip trailer (uncompressed size mod 2^32) matches the header
    costs nothing; float voxels and a mismatching trailer (truncated, or a multi-member gzip) are streamed once.
    """
    if not path.name.lower().endswith(CASE_SUFFIXES) or "vox_offset" not in reader.GetMetaDataKeys():
        return
    datatype = int(reader.GetMetaData("datatype"))
    n_bytes = int(np.prod(reader.GetSize(), dtype=np.int64)) * int(reader.GetMetaData("bitpix")) // 8
    expected = int(float(reader.GetMetaData("vox_offset"))) + n_bytes
    if path.name.lower().endswith(".nii"):
        found = path.stat().st_size
        if found < expected:
            raise InputError(f"voxel data truncated: the header needs {expected} bytes, the file has {found}")
        if datatype in _NIFTI_FLOATS:
            _scan_floats(path.open("rb"), expected - n_bytes, expected, _NIFTI_FLOATS[datatype])
        return
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        trailer_size = struct.unpack("<I", f.read(4))[0]
    if trailer_size == expected % 2**32 and datatype not in _NIFTI_FLOATS:
        return
    try:
        found = _scan_floats(gzip.open(path, "rb"), expected - n_bytes, expected, _NIFTI_FLOATS.get(datatype))
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"compressed data truncated or corrupt ({e})") from None
    if found < expected:
        raise InputError(f"voxel data truncated: the header needs {expected} bytes, the file holds {found}")


def _scan_floats(stream, offset: int, end: int, dtype: str | None) -> int:
    """Read `stream` to its end; raise if a float voxel in [offset, end) is NaN/inf; return the bytes read."""
    with stream:
        head = stream.read(offset)
        order = "<" if head[:4] == struct.pack("<i", 348) else ">"
        total, carry, n_bad = len(head), b"", 0
        item = np.dtype(dtype).itemsize if dtype else 1
        while chunk := stream.read(_CHUNK_BYTES):
            total += len(chunk)
            if dtype is None:
                continue
            data = carry + chunk[: max(0, len(chunk) - max(0, total - end))]
            usable = len(data) - len(data) % item
            vals = np.frombuffer(data[:usable], dtype=order + dtype)
            n_bad += int(np.count_nonzero(~np.isfinite(vals)))
            carry = data[usable:]
    if n_bad:
        raise InputError(f"{n_bad} voxels are NaN or infinite")
    return total


def check_finite(image: sitk.Image) -> None:
    """Float images may hold NaN or infinity, which would poison the mean and std of the normalisation."""
    if image.GetPixelID() not in _FLOAT_PIXEL_IDS:
        return
    vol = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(vol).all():
        n_bad = int(np.count_nonzero(~np.isfinite(vol)))
        raise InputError(f"{n_bad} voxels are NaN or infinite")


# The most voxel bytes the read-ahead holds beside the case on the network: a 512 x 512 x 256 int16 CT. Above it a
# case is read in its turn (its read then not overlapped): the soak's largest case, 512 x 512 x 400, peaks at about
# 1.07 GB alone, so a next case under this cap keeps a run within 1.2x of it (docs/PERFORMANCE.md, "Soak").
READ_AHEAD_MAX_BYTES = 128 * 2**20
_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkFloat32: 4}  # anything else (64-bit types): 8


class ReadAhead:
    """Reads scheduled cases in one background thread; `read` of a scheduled file takes its result.

        with io.ReadAhead() as ahead:
            ahead.schedule(cases[0])            # read while onnxruntime starts
            for i, path in enumerate(cases):
                if i + 1 < len(cases):
                    ahead.schedule(cases[i + 1])  # read while this case is on the network
                predict_file(path, ..., read=ahead.read)  # waits for the scheduled read

    ITK releases the GIL while it decompresses and parses, so the read overlaps the network (on a GPU,
    the CPU is mostly idle meanwhile) and onnxruntime's start. One case more is held in memory, at most
    `max_bytes` of voxels (READ_AHEAD_MAX_BYTES): a larger NIfTI, by its header, is read in its turn instead, so
    the read-ahead adds at most that to a run's peak (the 200-case soak: 1.25x the largest case's peak with an
    unbounded read-ahead, docs/PERFORMANCE.md). A file that cannot be read raises its `InputError` in the
    `read` call of that case, not earlier; reads never taken are dropped on exit (nothing is written by a read).
    """

    def __init__(self, enabled: bool = True, read=None, max_bytes: int | None = None) -> None:
        self._read = read or read_ct  # path -> sitk.Image: `read_ct`, or the DICOM series reader (flare_infer.dicom)
        # The cap needs the header's size: for NIfTI files (read_ct); another reader's cases are not capped.
        self._max_bytes = (READ_AHEAD_MAX_BYTES if max_bytes is None else max_bytes) if read is None else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._scheduled: dict[str, Future] = {}  # absolute path -> the read of that file
        self._lock = threading.Lock()
        self.enabled = enabled  # False: `schedule` does nothing (every read happens in `read`)

    def schedule(self, path: str | Path) -> None:
        if not self.enabled or not self._fits(path):
            return
        key = os.path.abspath(path)
        with self._lock:
            if key not in self._scheduled:
                self._scheduled[key] = self._pool.submit(self._read, path)

    def _fits(self, path: str | Path) -> bool:
        """Whether the file's voxels (by its header) fit under the cap. An unreadable header is scheduled as before:
        the background read raises its `InputError` in that case's `read`, which holds nothing."""
        if self._max_bytes is None:
            return True
        try:
            header = _header(Path(path))
        except InputError:
            return True
        voxels = int(np.prod(header.GetSize(), dtype=np.int64)) * header.GetNumberOfComponents()
        return voxels * _PIXEL_BYTES.get(header.GetPixelID(), 8) <= self._max_bytes

    def read(self, path: str | Path) -> sitk.Image:
        """`read_ct(path)` (or the reader given): the scheduled background read's result (or error) if there is
        one, else read now."""
        with self._lock:
            scheduled = self._scheduled.pop(os.path.abspath(path), None)
        return scheduled.result() if scheduled is not None else self._read(path)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            for future in self._scheduled.values():
                future.cancel()
            self._scheduled.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_mask(mask: sitk.Image, path: str | Path) -> None:
    """Write atomically: a hidden temporary file in the same folder, then rename, so no partial output exists.

    A uint8 `.nii.gz` is compressed by isal where it is installed (`write_gzip_nifti`), anything else by ITK.
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix  # SimpleITK picks the writer by suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        if not write_gzip_nifti(mask, tmp):
            sitk.WriteImage(mask, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_NIFTI_DIMS = 42  # NIfTI-1 header: dim[1], dim[2], dim[3] as int16 at bytes 42-47 (dim[0] at 40)
_GZIP_LEVEL = 1  # isal's fastest: the bench CT's mask in 0.6 MB instead of ITK's 0.4 MB


def write_gzip_nifti(mask: sitk.Image, path: Path) -> bool:
    """Write a uint8 3D image as `.nii.gz` with the bytes ITK would write, compressed by isal; False (nothing
    written) where isal is missing, the image is not uint8 3D or the name not `.nii.gz` (ITK writes then).

    ITK's NIfTI writer deflates with zlib, and its header depends on the size only through dim[1..3]: the header is
    the one ITK writes for a one-voxel image of the same spacing, origin and direction, those three patched (tests
    compare the decompressed bytes with ITK's own `.nii`). On the stand-in's mask of the bench CT (512 x 512 x 200,
    docs/PERFORMANCE.md) 0.014-0.017 s against ITK's 0.15-0.18 s (3 runs each, by hand); the file is 0.62 MB
    instead of 0.37 MB.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return False
    if not path.name.endswith(".nii.gz") or mask.GetPixelID() != sitk.sitkUInt8 or mask.GetDimension() != 3:
        return False
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetSpacing(mask.GetSpacing())
    probe.SetOrigin(mask.GetOrigin())
    probe.SetDirection(mask.GetDirection())
    one_voxel = path.with_name(f"{path.name}.header.nii")
    try:
        sitk.WriteImage(probe, str(one_voxel))
        header = bytearray(one_voxel.read_bytes()[:-1])  # the header, without its one voxel
    finally:
        one_voxel.unlink(missing_ok=True)
    header[_NIFTI_DIMS : _NIFTI_DIMS + 6] = struct.pack("<3h", *mask.GetSize())
    stream = isal_zlib.compressobj(_GZIP_LEVEL, isal_zlib.DEFLATED, 31)  # 31: gzip
    with path.open("wb") as f:
        f.write(stream.compress(bytes(header)))
        f.write(stream.compress(memoryview(sitk.GetArrayViewFromImage(mask)).cast("B")))
        f.write(stream.flush())
    return True


def is_case_file(path: Path) -> bool:
    """A visible `*.nii.gz` / `*.nii` file, whatever the case of its extension (`.NII.GZ` too)."""
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(CASE_SUFFIXES)


def list_cases(input_dir: str | Path) -> list[Path]:
    """Every `*.nii.gz` and `*.nii` (any case) directly in `input_dir` (hidden files skipped), sorted by name."""
    return sorted(p for p in Path(input_dir).iterdir() if is_case_file(p))


def output_name(input_path: str | Path) -> str:
    """`NAME_0000.nii.gz` -> `NAME.nii.gz` (nnU-Net channel suffix); other names are kept. The extension is
    written in lower case (`NAME.NII.GZ` -> `NAME.nii.gz`): ITK's NIfTI writer refuses upper-case ones."""
    name = Path(input_path).name
    suffix = next(s for s in CASE_SUFFIXES if name.lower().endswith(s))
    stem = name[: -len(suffix)]
    return re.sub(r"_0000$", "", stem) + suffix
