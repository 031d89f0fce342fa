r"""Checks a dataset before any training: its manifest, every NIfTI header and (`--deep`) every voxel.

    python -m vljax.validate --data_dir=/data/merlin [--deep] [--workers=N]

`--data_dir` is a Merlin-layout folder or a .jsonl manifest (`vljax.data.manifest`). Prints one line
per problem (class, study id, file: never report text), then the count per class, and exits 1 when
any problem is blocking (0 when clean or only warnings). Three levels:

* manifest (`manifest.read_manifest`): tables, labels, splits, ids, image files present.
* headers (`check_headers`, no voxel decoded; about 2 ms a file, ~2 s for 1,000): a readable
  NIfTI header, one 3-D volume, a usable affine (the checks `ct.load_nifti` makes before decoding,
  shared through `ct.load_nifti_header`), plausible voxel spacing, geometry `ct.preprocess_ct`
  accepts (`ct.check_geometry`: no shear), oblique axes, and truncation: an uncompressed file
  shorter than vox_offset + the voxel bytes, or a .nii.gz whose gzip trailer (ISIZE, the
  uncompressed size mod 2**32) disagrees with that size, which is what a half-written file shows.
  Meant for the trainer to run at start-up, before it builds the model.
* voxels (`check_voxels`, `--deep`; `ct._read_nifti` in worker processes): corrupt or truncated
  data, NaN/inf, constant volumes, intensities that are not CT in HU.

Problem classes; all block except the warnings `oblique` and `uncalibrated` (heuristics: the data may
be fine, a person should look):

    manifest   missing_file empty_report bad_label duplicate_id unknown_split missing_row
               bad_phenotype bad_row bad_encoding bad_table
    header     unreadable_header not_3d zero_size bad_affine bad_dtype truncated bad_spacing sheared
               oblique (warning)
    voxels     corrupt_voxels nan_voxels constant_volume absurd_hu uncalibrated (warning)

Thresholds, and why:

* spacing outside [0.1, 30] mm on an axis: no CT is finer than 0.1 mm; 30 mm is beyond real slice
  thickness (10 mm) and the phantom's coarsest studies (25 mm). Outside, the header is in the wrong
  unit or broken, and resampling would make a garbage (or enormous) input.
* oblique: a voxel axis more than 20 degrees from every world axis. Loading accepts it, but the
  model then sees the body tilted (resampling keeps the voxel axes' directions).
* constant: max - min < 1 HU. A real CT spans air to bone, over 1000 HU.
* absurd HU: on ~1M sampled voxels, the minimum value left out (scanners fill the outside of the
  field of view with one padding value such as -2048 or -3024 HU), the 99th percentile above
  4000 HU (1% of voxels denser than cortical bone; metal implants are a smaller fraction) or the 1st
  below -2000 HU (air is -1000 HU): a wrong scl_slope/scl_inter, or values that are not HU.
* uncalibrated (warning): the same 1st percentile above -500 HU: no air anywhere, where an abdominal
  CT always holds air around the body, in the lungs and in the bowel; typical of raw stored values
  exported without their rescale intercept (air at 0 instead of -1000).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import multiprocessing
import os
import sys
from typing import Iterable, Sequence

import numpy as np

from vljax import cli
from vljax.data import ct
from vljax.data import manifest as manifest_lib
from vljax.data.manifest import Problem

# Classes found at the header and voxel levels beyond those `ct.CTLoadError.kind` and
# `manifest.Problem.kind` name.
TRUNCATED = "truncated"
BAD_SPACING = "bad_spacing"
OBLIQUE = "oblique"
CONSTANT_VOLUME = "constant_volume"
ABSURD_HU = "absurd_hu"
UNCALIBRATED = "uncalibrated"

MANIFEST_CLASSES = (manifest_lib.MISSING_FILE, manifest_lib.EMPTY_REPORT, manifest_lib.BAD_LABEL,
                    manifest_lib.DUPLICATE_ID, manifest_lib.UNKNOWN_SPLIT, manifest_lib.MISSING_ROW,
                    manifest_lib.BAD_PHENOTYPE, manifest_lib.BAD_ROW, manifest_lib.BAD_ENCODING,
                    manifest_lib.BAD_TABLE)
HEADER_CLASSES = (ct.MISSING_FILE, ct.UNREADABLE_HEADER, ct.NOT_3D, ct.ZERO_SIZE, ct.BAD_AFFINE, ct.BAD_DTYPE,
                  TRUNCATED, BAD_SPACING, ct.SHEARED, OBLIQUE)
VOXEL_CLASSES = (ct.CORRUPT_VOXELS, ct.NAN_VOXELS, CONSTANT_VOLUME, ABSURD_HU, UNCALIBRATED)
WARNINGS = frozenset({OBLIQUE, UNCALIBRATED})  # every other class blocks training

SPACING_RANGE_MM = (0.1, 30.0)
OBLIQUE_DEGREES = 20.0
CONSTANT_RANGE_HU = 1.0
MAX_P99_HU = 4000.0
MIN_P1_HU = -2000.0
UNCALIBRATED_P1_HU = -500.0
_SAMPLE_VOXELS = 1 << 20
_MAX_LISTED = 25


def is_blocking(problem: Problem) -> bool:
    return problem.kind not in WARNINGS


class DatasetError(ValueError):
    """Blocking problems in the data; the message lists them (study ids and files, no report text)."""


# ------------------------------------------------------------------------------------------------
# Headers
# ------------------------------------------------------------------------------------------------
def check_headers(records: Sequence, *, workers: int | None = None,
                  spacing: Sequence[float] = ct.CTPreprocessConfig().spacing) -> list[Problem]:
    """Header-level problems of every record's image (`study_id`, `image`), in record order.

    Reads headers only (nibabel's header and affine, the file size or gzip trailer). By default
    1,000 files or more are checked in one process per CPU (the checks are Python-bound) and fewer in
    threads; `workers=N` uses N threads (for network storage, where the wait is I/O). `spacing` is
    the preprocessing target, for the shear test `ct.preprocess_ct` applies.
    """
    spacing = tuple(float(s) for s in spacing)
    jobs = [(r.study_id, os.fspath(r.image), spacing) for r in records]
    cpus = os.cpu_count() or 1
    if workers == 1 or len(jobs) <= 1:
        results = [_header_problems(*job) for job in jobs]
    elif len(jobs) >= _PROCESSES_FROM and cpus > 1 and not workers:
        # The checks are Python-bound (~2-3 ms a file, nibabel's header parsing and the geometry
        # test), so threads do not add up; processes do (spawned: callers may have imported JAX).
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(cpus, mp_context=ctx) as pool:
            results = list(pool.map(_header_job, jobs, chunksize=max(1, len(jobs) // (8 * cpus))))
    else:  # few files, or on network storage where waiting on I/O dominates
        with concurrent.futures.ThreadPoolExecutor(workers or min(32, cpus + 4)) as pool:
            results = list(pool.map(_header_job, jobs))
    return [p for ps in results for p in ps]


_PROCESSES_FROM = 1000  # files; below, starting processes costs more than it saves


def _header_job(job: tuple[str, str, tuple[float, ...]]) -> list[Problem]:
    return _header_problems(*job)


def _header_problems(sid: str, path: str, spacing: tuple[float, ...]) -> list[Problem]:
    try:
        img, shape, affine = ct.load_nifti_header(path)
    except ct.CTLoadError as e:
        return [Problem(e.kind, sid, path, str(e))]
    problems = []
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        problems.append(Problem(ct.BAD_DTYPE, sid, path, f"stores {dtype} voxels; expected real integer or "
                                "float HU values"))
    short = _truncation(path, img)
    if short:
        problems.append(Problem(TRUNCATED, sid, path, short + "; re-download or re-export it"))
    rzs = affine[:3, :3]
    mm = np.sqrt(np.sum(rzs * rzs, axis=0))
    lo, hi = SPACING_RANGE_MM
    if not ((mm >= lo) & (mm <= hi)).all():
        problems.append(Problem(BAD_SPACING, sid, path, f"voxel spacing {_mm(mm)} mm is outside [{lo:g}, {hi:g}] "
                                "mm on some axis; fix the header's pixdim/affine (wrong unit?) or drop the file"))
        return problems  # the geometry tests below would resample to an absurd grid
    try:
        ct.check_geometry(path, shape, affine, spacing)
    except ct.CTLoadError as e:
        return problems + [Problem(e.kind, sid, path, str(e))]
    # cos of each voxel axis' angle to its nearest world axis
    cosines = np.max(np.abs(rzs / mm), axis=0)
    angle = math.degrees(math.acos(float(np.clip(cosines.min(), -1.0, 1.0))))
    if angle > OBLIQUE_DEGREES:
        problems.append(Problem(OBLIQUE, sid, path, f"a voxel axis is {angle:.0f} degrees from the nearest "
                                "world axis; the model will see the volume tilted (resample it to an axial grid)"))
    return problems


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _truncation(path: str, img) -> str | None:
    """Why the file is shorter than its header says, or None. Reads the file size and, for gzip,
    its last 4 bytes (ISIZE: the uncompressed size mod 2**32), never the data."""
    # The proxy's offset is the file's vox_offset (the image's header copy has it reset to 0).
    expected = int(img.dataobj.offset) + math.prod(img.shape) * img.get_data_dtype().itemsize
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] != b"\x1f\x8b":  # not gzip, whatever the name says: nibabel read it raw
            if size < expected:
                return f"the file holds {size} bytes; its header needs {expected} (offset + voxels)"
            return None
        if len(magic) < 4 or size < 18:  # gzip header (10) + trailer (8)
            return f"the gzip file holds only {size} bytes"
        if magic[3] & 0x04:  # FEXTRA: block gzip (BGZF), many members; the last ISIZE is not the total
            return None  # left to --deep
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize != expected % 2**32:
        return (f"the gzip trailer records {isize} uncompressed bytes (mod 2**32) where the header needs "
                f"{expected}: the file is truncated (half-written?)")
    return None


# ------------------------------------------------------------------------------------------------
# Voxels
# ------------------------------------------------------------------------------------------------
def check_voxels(records: Sequence, *, workers: int | None = None, progress: bool = True) -> list[Problem]:
    """Voxel-level problems of every record's image, read whole in `workers` processes (default: cpu
    count; spawned, so callers may have imported JAX), in record order, with a progress bar."""
    workers = workers or os.cpu_count() or 1
    jobs = [(r.study_id, os.fspath(r.image)) for r in records]  # ids and paths only: no report text
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="voxels", unit="volume", file=sys.stderr, disable=not progress)
    results = []
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_voxel_problems(job))
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for ps in pool.map(_voxel_problems, jobs):
                    results.append(ps)
                    bar.update()
    finally:
        bar.close()
    return [p for ps in results for p in ps]


def _voxel_problems(job: tuple[str, str]) -> list[Problem]:
    sid, path = job
    try:
        data, _ = ct._read_nifti(path)
    except ct.CTLoadError as e:
        return [Problem(e.kind, sid, path, str(e))]
    return _intensity_problems(sid, path, data)


def _intensity_problems(sid: str, path: str, data: np.ndarray) -> list[Problem]:
    """Constant volumes and intensities that are not CT in HU (thresholds: module docstring)."""
    lo, hi = float(data.min()), float(data.max())
    if hi - lo < CONSTANT_RANGE_HU:
        return [Problem(CONSTANT_VOLUME, sid, path, f"every voxel is {lo:.0f} HU (range {hi - lo:.3g} HU): an empty "
                        "or failed export; re-export it or drop the study")]
    flat = data.ravel(order="K")
    sample = flat[:: max(1, flat.size // _SAMPLE_VOXELS)]
    inside = sample[sample > lo]  # without the padding value outside the field of view
    p1, p99 = (float(v) for v in np.percentile(inside if inside.size else sample, [1, 99]))
    where = f"1st-99th percentile {p1:.0f} to {p99:.0f} HU"
    if p99 > MAX_P99_HU or p1 < MIN_P1_HU:
        return [Problem(ABSURD_HU, sid, path, f"intensities are not CT in HU ({where}; expected about -1000 (air) to "
                        f"at most {MAX_P99_HU:.0f}); check scl_slope/scl_inter or the export")]
    if p1 > UNCALIBRATED_P1_HU:
        return [Problem(UNCALIBRATED, sid, path, f"no air anywhere ({where}; air is -1000 HU): values may be "
                        "stored without their rescale intercept; check the export")]
    return []


# ------------------------------------------------------------------------------------------------
# The whole dataset
# ------------------------------------------------------------------------------------------------
def validate_dataset(data_dir: str | os.PathLike, *, deep: bool = False, workers: int | None = None,
                     spacing: Sequence[float] = ct.CTPreprocessConfig().spacing,
                     progress: bool = False) -> tuple[int, list[Problem]]:
    """(number of studies the manifest lists, every problem): manifest, headers and with `deep`
    voxels. A dataset that cannot be read at all gives its table problems and 0 studies.
    Raises FileNotFoundError when `data_dir` does not exist."""
    try:
        manifest, problems = manifest_lib.read_manifest(data_dir)
    except manifest_lib.ManifestError as e:
        return 0, list(e.details)
    n = len(manifest) + len({p.study_id for p in problems if p.study_id} - {r.study_id for r in manifest.records})
    header = check_headers(manifest.records, workers=workers, spacing=spacing)
    problems += header
    if deep:
        unusable = {p.study_id for p in header if is_blocking(p)}  # already reported, and would fail again
        problems += check_voxels([r for r in manifest.records if r.study_id not in unusable],
                                 workers=workers, progress=progress)
    return n, problems


def problem_line(p: Problem) -> str:
    message = p.message.removeprefix(f"{p.study_id}: ") if p.study_id else p.message  # the id has a column
    return f"{p.kind:<17} {p.study_id or '-':<14} {p.path}: {message}"


def report_lines(problems: Iterable[Problem]) -> list[str]:
    """One line per problem (class, study id, file, message), then the count per class."""
    problems = list(problems)
    lines = [problem_line(p) for p in problems]
    counts = collections.Counter(p.kind for p in problems)
    if counts:
        lines.append("problems per class:")
        lines += [f"  {kind:<17} {n:5d}  {'warning' if kind in WARNINGS else 'blocking'}"
                  for kind, n in sorted(counts.items())]
    return lines


def raise_if_blocking(problems: Sequence[Problem], source: str) -> None:
    """Raises DatasetError listing the blocking problems (the first 25, and the count per class)."""
    blocking = [p for p in problems if is_blocking(p)]
    if not blocking:
        return
    shown = [problem_line(p) for p in blocking[:_MAX_LISTED]]
    counts = ", ".join(f"{k} {n}" for k, n in sorted(collections.Counter(p.kind for p in blocking).items()))
    more = f"\n  ... and {len(blocking) - _MAX_LISTED} more" if len(blocking) > _MAX_LISTED else ""
    raise DatasetError(f"{source}: {len(blocking)} blocking problem(s) in the data ({counts}):\n  "
                       + "\n  ".join(shown) + more + "\nFix or drop these studies; `python -m vljax.validate "
                       f"--data_dir={source} --deep` checks every file.")


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------
def _define_flags():
    """Only when run as a command: importing this module (the trainer does) defines no flags."""
    from absl import flags

    return dict(
        data_dir=flags.DEFINE_string("data_dir", None, "dataset to check: Merlin-layout folder or .jsonl manifest"),
        deep=flags.DEFINE_bool("deep", False,
                               "also read every volume's voxels (NaN, constant, HU range, corrupt data)"),
        workers=flags.DEFINE_integer("workers", 0, "threads for headers, processes for --deep (0: by cpu count)"),
    )


def main(argv, flag_values: dict) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_dir, deep, workers = (flag_values[k].value for k in ("data_dir", "deep", "workers"))
    if not data_dir:
        raise app.UsageError("--data_dir is required (a Merlin-layout folder or a .jsonl manifest)")
    if workers < 0:
        raise app.UsageError("--workers must be >= 0")
    try:
        n, problems = validate_dataset(data_dir, deep=deep, workers=workers or None, progress=True)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    levels = "manifest, headers" + (", voxels" if deep else " (voxels not read: --deep)")
    for line in report_lines(problems):
        print(line)
    blocking = sum(is_blocking(p) for p in problems)
    print(f"{data_dir}: {n} studies checked ({levels}): {blocking} blocking problem(s), "
          f"{len(problems) - blocking} warning(s)" + ("; fix or drop the studies listed" if blocking else ""))
    sys.stdout.flush()
    sys.exit(1 if blocking else 0)


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()
    app.run(lambda argv: main(argv, _FLAGS), flags_parser=cli.parse_flags)
