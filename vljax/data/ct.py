"""CT volumes: NIfTI loading and Merlin's preprocessing chain, in NumPy.

Merlin prepares every CT with this MONAI chain (DESIGN.md §1):

    LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd((1.5, 1.5, 3), bilinear)
    -> ScaleIntensityRanged(-1000, 1000 -> 0, 1, clip) -> SpatialPadd(224, 224, 160)
    -> CenterSpatialCropd(224, 224, 160)

This module reproduces it with nibabel + NumPy only; tests compare it with MONAI itself. The MONAI
(1.6.1) facts it relies on:

* Orientation only flips and transposes axes (nibabel io_orientation / ornt_transform).
* Spacing (diagonal=False, scale_extent=False) keeps the directions of the voxel axes, so after
  reorientation resampling is separable: output voxel j samples input voxel coordinate
  j * s_out / s_in on each axis (the first voxel centres coincide). The output size is
  round((n - 1) * s_in / s_out + 1) with NumPy's round-half-to-even, evaluated with MONAI's own
  affine arithmetic because ties (0.75 -> 1.5 mm on an even axis) are common. Input spacings
  within 1e-3 mm of the target are kept; near-identity transforms are skipped. Trilinear
  interpolation; samples beyond the volume take the border value.
* SpatialPad (symmetric) pads w // 2 before and w - w // 2 after; CenterSpatialCrop starts at
  size // 2 - roi // 2.

`preprocess_ct` fuses resample, pad and crop: only voxels that survive the crop are interpolated,
one axis at a time, and the result equals the unfused chain bit for bit.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Sequence

import ml_dtypes
import nibabel as nib
import numpy as np
from nibabel import orientations

_AFFINE_TOL = 1e-3  # MONAI's AFFINE_TOL, which Spacing uses for "same spacing" and "no-op" tests.
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_RAS = orientations.axcodes2ornt("RAS")


# What makes a file unusable (`CTLoadError.kind`), so that `vljax.validate` can count and classify
# problems without parsing messages.
MISSING_FILE = "missing_file"
UNREADABLE_HEADER = "unreadable_header"  # not NIfTI, or nibabel cannot parse its header
NOT_3D = "not_3d"
ZERO_SIZE = "zero_size"
BAD_AFFINE = "bad_affine"  # singular or non-finite voxel-to-world affine
SHEARED = "sheared"  # axis-separable resampling (MONAI Spacing's) does not apply
CORRUPT_VOXELS = "corrupt_voxels"  # the voxel data cannot be decoded (truncated, bad gzip stream)
BAD_DTYPE = "bad_dtype"
NAN_VOXELS = "nan_voxels"


class CTLoadError(ValueError):
    """An unusable CT file. Messages name the file path and the problem, never file contents.

    `kind` is one of the constants above ("unusable" when none applies); it is an instance attribute,
    so it survives pickling from worker processes.
    """

    kind = "unusable"


def _ct_error(kind: str, message: str) -> CTLoadError:
    err = CTLoadError(message)
    err.kind = kind
    return err


class _ShearedAffine(ValueError):
    """Raised by `_spacing_grid`; a ValueError as before, told apart so that the kind can be SHEARED."""


@dataclasses.dataclass(frozen=True)
class CTPreprocessConfig:
    """Targets of Merlin's preprocessing.

    Attributes:
      spacing: output voxel size in mm along x, y, z of RAS.
      shape: output size in voxels along x, y, z (zero-padded, then centre-cropped to it).
      hu_window: HU range mapped linearly onto [0, 1]; values outside are clipped.
      dtype: "float32", or "bfloat16" to halve host memory and host-to-device bytes.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    shape: tuple[int, int, int] = (224, 224, 160)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    dtype: str = "float32"

    def __post_init__(self):
        spacing = _config_tuple(self.spacing, 3, "spacing")
        shape = _config_tuple(self.shape, 3, "shape")
        window = _config_tuple(self.hu_window, 2, "hu_window")
        if not all(_is_real(s) and s > 0 for s in spacing):
            raise ValueError(f"CTPreprocessConfig.spacing must be 3 positive finite mm, got {spacing}.")
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"CTPreprocessConfig.shape must be 3 positive integers, got {shape}.")
        if not (all(_is_real(v) for v in window) and window[0] < window[1]):
            raise ValueError(f"CTPreprocessConfig.hu_window must be finite (lo, hi), lo < hi, got {window}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"CTPreprocessConfig.dtype must be in {sorted(_DTYPES)}, got {self.dtype!r}.")
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        object.__setattr__(self, "hu_window", tuple(float(v) for v in window))


def _config_tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"CTPreprocessConfig.{name} must be a sequence of {n} numbers, got {value!r}.")
    if len(value) != n:
        raise ValueError(f"CTPreprocessConfig.{name} must have {n} entries, got {len(value)}.")
    return tuple(value)


def _is_real(v) -> bool:
    real = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return real and bool(np.isfinite(v))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _image_from_bytes(raw: bytes):
    """A NIfTI-1 or NIfTI-2 image held in memory (the decompressed bytes of a .nii.gz)."""
    try:
        return nib.Nifti1Image.from_bytes(raw)
    except Exception:  # noqa: BLE001 - not NIfTI-1: try NIfTI-2, whose error then stands
        return nib.Nifti2Image.from_bytes(raw)


def load_nifti_header(path: str | os.PathLike, *, whole: bool = False):
    """Opens a NIfTI file without reading its voxels: (image, 3-D shape, float64 affine).

    The checks that need only the header (a file, NIfTI, one 3-D volume, no zero-size axis, a finite
    non-singular affine), shared by `load_nifti` and `vljax.validate`'s start-up check. The image's
    `dataobj` is untouched. Raises CTLoadError, naming the file, with its `kind`.

    `whole` (what `load_nifti` uses): a .nii.gz is decompressed entirely first, which checks its gzip
    CRC and length. nibabel reads a .nii.gz only as far as the voxels end, so it never reaches the
    checksum: a file corrupted inside its compressed stream can decode to garbage voxels without an
    error. Decompressing in one call is also no slower than nibabel's streamed read.
    """
    path = os.fspath(path)
    where = f"CT file {path!r}"
    if not os.path.isfile(path):
        raise _ct_error(MISSING_FILE, f"{where} does not exist or is not a file; check the path and the data root.")
    raw = None
    if whole and path.lower().endswith(".gz"):
        try:
            with open(path, "rb") as f:
                raw = f.read()
            # Not gzip at all: nibabel's own read below names it an unreadable image.
            raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else None
        except MemoryError:
            raise
        except Exception as e:  # BadGzipFile (CRC or length mismatch), EOFError (cut short), zlib.error
            raise _ct_error(CORRUPT_VOXELS, f"{where} has corrupt or truncated compressed data "
                            f"({type(e).__name__}: its gzip stream fails its checksum or ends early); "
                            "re-download or re-export it.") from None
    try:
        # No memory map: the whole read happens in _read_nifti.
        img = _image_from_bytes(raw) if raw is not None else nib.load(path, mmap=False)
    except MemoryError:
        raise
    except Exception as e:  # ImageFileError, HeaderDataError, BadGzipFile, EOFError, zlib.error, ...
        # Only the exception type: nibabel's messages can quote file bytes.
        raise _ct_error(UNREADABLE_HEADER, f"{where} is not a readable NIfTI image ({type(e).__name__}); "
                        "re-export it as .nii or .nii.gz, or drop it from the manifest.") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _ct_error(UNREADABLE_HEADER, f"{where} holds a {type(img).__name__}, not NIfTI; convert it to .nii.gz.")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise _ct_error(NOT_3D, f"{where} has shape {shape}; expected one 3-D volume, (x, y, z) or (x, y, z, 1). "
                        "Split multi-volume files or drop the file.")
    if min(shape) == 0:
        raise _ct_error(ZERO_SIZE, f"{where} has a zero-size dimension (shape {shape}); drop or re-export the file.")
    affine = np.asarray(img.affine, dtype=np.float64)
    rzs = affine[:3, :3]
    norms = np.sqrt(np.sum(rzs * rzs, axis=0))
    if not np.isfinite(affine).all() or not abs(np.linalg.det(rzs)) > 1e-6 * np.prod(norms):
        raise _ct_error(BAD_AFFINE, f"{where} has a singular or non-finite voxel-to-world affine (sform/qform); "
                        "fix its header geometry or drop the file.")
    return img, shape, affine


def _read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 3-D voxels in their stored dtype (float32 when scl_slope/inter apply) + affine."""
    img, shape, affine = load_nifti_header(path, whole=True)
    where = f"CT file {os.fspath(path)!r}"
    proxy = img.dataobj
    scaled = (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))) != (1.0, 0.0)
    try:  # nibabel reads lazily: decompress and decode here, inside the try.
        data = np.asarray(proxy, dtype=np.float32) if scaled else np.asarray(proxy)
    except MemoryError:
        raise
    except Exception as e:  # EOFError, zlib.error, BadGzipFile, ValueError (short buffer), ...
        raise _ct_error(CORRUPT_VOXELS, f"{where} has corrupt or truncated voxel data ({type(e).__name__}); "
                        "re-download or re-export it.") from None
    if data.dtype.kind not in "iuf":
        raise _ct_error(BAD_DTYPE, f"{where} stores {data.dtype} voxels; expected real integer or float HU values.")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise _ct_error(NAN_VOXELS, f"{where} contains NaN or infinite voxels; fix or drop the file.")
    return data.reshape(shape, order="A"), affine


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3-D NIfTI CT: float32 voxels in file axis order (scl_slope/inter applied) and the
    4x4 float64 voxel-to-RAS-mm affine (nibabel's img.affine: sform, else qform).

    Raises CTLoadError, naming the file, for anything unusable.
    """
    data, affine = _read_nifti(path)
    return data.astype(np.float32, copy=False), affine


# ------------------------------------------------------------------------------------------------
# The chain, one step at a time
# ------------------------------------------------------------------------------------------------


def orient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flips and transposes axes so that +x, +y, +z point Right, Anterior, Superior.

    As MONAI's Orientation("RAS"): no interpolation. Returns a view of `data` and its new affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = orientations.ornt_transform(orientations.io_orientation(affine), _RAS)
    if np.isnan(ornt).any():
        raise ValueError("the affine is degenerate: its voxel axes cannot be matched to R, A, S.")
    new_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])
    return orientations.apply_orientation(data, ornt), new_affine


def _spacing_grid(shape, affine: np.ndarray, spacing) -> tuple[list[np.ndarray], np.ndarray]:
    """MONAI Spacing's output grid: for each axis, the input voxel coordinate of every output voxel.

    Repeats the arithmetic of MONAI's zoom_affine(diagonal=False) and compute_shape_offset
    (scale_extent=False) so that round-half-to-even ties in the output size resolve as they do there.
    Returns (coordinates per axis, output affine). Where MONAI skips resampling (transform within
    AFFINE_TOL of the identity at the same size) the coordinates are the input grid itself.
    """
    in_shape = np.array(shape[:3], dtype=float)
    rzs = affine[:3, :3]
    in_spacing = np.sqrt(np.sum(rzs * rzs, axis=0))
    out_spacing = np.array(spacing, dtype=np.float64)
    keep = np.abs(in_spacing - out_spacing) <= _AFFINE_TOL  # Spacing keeps spacings this close.
    out_spacing[keep] = in_spacing[keep]
    # The output axes keep the input axes' directions: split rotation from zoom (Cholesky).
    zoom = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zoom)
    out_affine = np.eye(4)
    out_affine[:3, :3] = rotation @ np.diag(np.sign(np.diag(zoom)) * out_spacing)
    # Output size: extent of the input's corner voxel centres, in output voxels, plus one.
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in in_shape], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(out_affine, affine) @ corners
    dist = corners_out[:-1].copy()
    out_shape = np.round(np.ptp(corners_out[:-1] / corners_out[-1], axis=1) + 1.0).astype(int)
    # Origin: the input corner whose output coordinates are smallest on every axis (first voxel
    # centres coincide). If no corner is smallest within 1e-8 (MONAI's test; oblique affines
    # stored in float32 fail it), MONAI centres the grids instead, using shape / 2.
    origin = [i for i in range(corners.shape[1])
              if np.allclose(np.min(dist - dist[:, i:i + 1], 1), 0.0, rtol=_AFFINE_TOL)]
    if origin:
        out_affine[:3, 3] = (affine @ corners)[:-1, origin[0]]
    else:
        out_affine[:3, 3] = rzs @ (in_shape / 2.0) + affine[:3, 3] - out_affine[:3, :3] @ (out_shape / 2.0)
    xform = np.linalg.solve(affine, out_affine)  # output voxel -> input voxel
    # Oblique affines stored in float32 carry ~1e-8 of spurious shear; up to 1e-3 voxel of drift
    # across the volume is ignored, more is a real shear (e.g. an uncorrected gantry tilt).
    off_diagonal = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
    if np.abs(off_diagonal).max() * max(in_shape.max(), out_shape.max()) > 1e-3:
        raise _ShearedAffine("the affine is sheared; axis-separable resampling does not apply (unsupported).")
    if np.array_equal(out_shape, in_shape) and (np.allclose(affine, out_affine, atol=_AFFINE_TOL)
                                                or np.allclose(xform, np.eye(4), atol=_AFFINE_TOL)):
        return [np.arange(n, dtype=np.float64) for n in out_shape], affine.copy()
    coords = []
    for k in range(3):
        c = xform[k, k] * np.arange(out_shape[k], dtype=np.float64) + xform[k, 3]
        if np.abs(c - np.round(c)).max() < 1e-9:  # on the input grid up to round-off: gather exactly
            c = np.round(c)
        coords.append(c)
    return coords, out_affine


def _interpolate_axes(data: np.ndarray, coords: list[np.ndarray], grid_shape: Sequence[int]) -> np.ndarray:
    """Separable trilinear sampling: axis k at voxel coordinates coords[k], border value outside.

    `coords` may be a block of the full output grid of size `grid_shape`. Works on `data` as laid
    out in memory (axes by stride, reversed axes read forwards): axes that land on the input grid
    are sliced first (no arithmetic); then each remaining axis is gathered with `np.take` over
    contiguous rows or slabs and blended, the innermost axis (element-wise gathers) last, the
    others by how much the full grid shrinks them. The pass order depends only on `data`'s layout
    and `grid_shape`, so a block gives exactly the matching part of the full grid.
    Returns a new float32 array (x, y, z), strided.
    """
    perm = sorted(range(3), key=lambda k: (-abs(data.strides[k]), k))
    out = data.transpose(perm)
    flipped = [out.strides[i] < 0 for i in range(3)]
    out = out[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    shape_in = out.shape
    lows, fracs = [], []
    for i, k in enumerate(perm):
        c = np.clip(coords[k], 0.0, shape_in[i] - 1.0)
        c = ((shape_in[i] - 1.0) - c)[::-1] if flipped[i] else c
        lows.append(np.floor(c).astype(np.intp))
        fracs.append(c - lows[-1])
    copied = False
    for i in range(3):  # on the grid: a * 1 + b * 0 would give a, exactly; just select
        if not fracs[i].any():
            step = _progression_step(lows[i])
            if step:
                index = [slice(None)] * 3
                index[i] = slice(lows[i][0], lows[i][-1] + 1, step)
                out = out[tuple(index)]
            else:
                out, copied = np.take(out, lows[i], axis=i), True
    ratio = [grid_shape[k] / shape_in[i] for i, k in enumerate(perm)]
    for i in sorted((i for i in range(3) if fracs[i].any()), key=lambda i: (i == 2, ratio[i], i)):
        low = np.take(out, lows[i], axis=i).astype(np.float32, copy=False)
        high = np.take(out, np.minimum(lows[i] + 1, shape_in[i] - 1), axis=i).astype(np.float32, copy=False)
        w = fracs[i].astype(np.float32).reshape([-1 if j == i else 1 for j in range(3)])
        low *= 1.0 - w
        high *= w
        low += high
        out, copied = low, True
    out = out.astype(np.float32, copy=False) if copied else np.array(out, dtype=np.float32)
    out = out[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    return out.transpose(np.argsort(perm))


def _progression_step(index: np.ndarray) -> int:
    """The step of `index` if it is an increasing arithmetic progression (then a slice), else 0."""
    if len(index) == 1:
        return 1
    step = int(index[1] - index[0])
    return step if step > 0 and np.all(np.diff(index) == step) else 0


def resample_to_spacing(data: np.ndarray, affine: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling of a RAS-oriented volume to `spacing` mm on MONAI Spacing's exact grid.

    Returns float32 data and the output affine; samples beyond the input take the border value.
    """
    affine = np.asarray(affine, dtype=np.float64)
    coords, out_affine = _spacing_grid(data.shape, affine, spacing)
    grid_shape = [len(c) for c in coords]
    return np.ascontiguousarray(_interpolate_axes(data, coords, grid_shape)), out_affine


def scale_hu(data: np.ndarray, window: Sequence[float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Maps HU [lo, hi] linearly onto [0, 1] and clips (MONAI ScaleIntensityRange, float32 math)."""
    out = np.array(data, dtype=np.float32)
    _scale_inplace(out, *window)
    return out


def _scale_inplace(x: np.ndarray, lo: float, hi: float) -> None:
    x -= np.float32(lo)
    x /= np.float32(float(hi) - float(lo))
    np.clip(x, 0.0, 1.0, out=x)


def _crop_window(n: int, target: int) -> tuple[int, int, int]:
    """Symmetric zero pad of n voxels to >= target, then centre crop to target, as one window:
    (first surviving source voxel, its output index, how many survive)."""
    pad = max(target - n, 0)
    start = (n + pad) // 2 - target // 2  # MONAI crop: centre = size // 2, start = centre - roi // 2
    src = start - pad // 2
    return max(src, 0), max(-src, 0), min(n, src + target) - max(src, 0)


def pad_and_crop(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """MONAI SpatialPad(method="symmetric", value 0) to at least `shape`, then CenterSpatialCrop."""
    out = np.zeros(tuple(shape), dtype=data.dtype)
    windows = [_crop_window(n, t) for n, t in zip(data.shape, shape)]
    out[tuple(slice(f, f + m) for _, f, m in windows)] = data[tuple(slice(s, s + m) for s, _, m in windows)]
    return out


def output_dtype(config: CTPreprocessConfig) -> np.dtype:
    """The dtype `preprocess_ct` returns for `config`."""
    return _DTYPES[config.dtype]


def to_model_layout(volume_xyz: np.ndarray) -> np.ndarray:
    """(x, y, z) -> C-contiguous (D, H, W) = (z, x, y), Merlin's `x.permute(0, 1, 4, 2, 3)`.

    In RAS that puts superior at larger D, patient right at larger H, anterior at larger W.
    """
    return np.ascontiguousarray(np.transpose(volume_xyz, (2, 0, 1)))


# ------------------------------------------------------------------------------------------------
# The whole chain, fused
# ------------------------------------------------------------------------------------------------


def preprocess_volume(data: np.ndarray, affine: np.ndarray,
                      config: CTPreprocessConfig = CTPreprocessConfig()) -> np.ndarray:
    """Merlin's chain on an in-memory HU volume (file axis order) with its voxel-to-RAS affine.

    Returns the (D, H, W) = (z, x, y) model input in `config.dtype`. Only voxels that survive the
    crop are interpolated; integer input is widened to float32 by the first (shrinking) pass.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}.")
    if data.dtype.kind not in "iuf":
        raise ValueError(f"expected real-valued HU voxels, got dtype {data.dtype}.")
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)  # MONAI's LoadImage casts to float32 first
    data, affine = orient_to_ras(data, affine)
    coords, _ = _spacing_grid(data.shape, affine, config.spacing)
    grid_shape = [len(c) for c in coords]
    windows = [_crop_window(n, t) for n, t in zip(grid_shape, config.shape)]
    block = _interpolate_axes(data, [c[s:s + m] for c, (s, _, m) in zip(coords, windows)], grid_shape)
    _scale_inplace(block, *config.hu_window)
    sx, sy, sz = config.shape
    out = np.zeros((sz, sx, sy), dtype=_DTYPES[config.dtype])
    (_, fx, mx), (_, fy, my), (_, fz, mz) = windows
    out[fz:fz + mz, fx:fx + mx, fy:fy + my] = np.transpose(block, (2, 0, 1))
    return out


def preprocess_ct(path: str | os.PathLike, config: CTPreprocessConfig = CTPreprocessConfig()) -> np.ndarray:
    """Loads a NIfTI CT and applies Merlin's chain: (D, H, W) = (z, x, y) in `config.dtype`.

    Raises CTLoadError, naming the file, for unusable files (including unsupported sheared affines).
    """
    data, affine = _read_nifti(path)
    try:
        return preprocess_volume(data, affine, config)
    except CTLoadError:
        raise
    except ValueError as e:
        raise _ct_error(SHEARED if isinstance(e, _ShearedAffine) else CTLoadError.kind,
                        f"CT file {os.fspath(path)!r}: {e}") from None


def load_model_input(path: str | os.PathLike, config: CTPreprocessConfig = CTPreprocessConfig()) -> np.ndarray:
    """`preprocess_ct`, refusing a constant result: what the input pipeline (and the volume cache)
    feed the model for one file. A volume of one value (all 0 HU, all air) is not a CT, and training
    on it teaches nothing (`vljax.validate --deep` finds them all)."""
    volume = preprocess_ct(path, config)
    if volume.size and volume.min() == volume.max():
        raise CTLoadError(f"CT file {os.fspath(path)!r} is constant after preprocessing (every voxel "
                          f"{float(volume.flat[0]):g} in [0, 1]): not a usable CT; fix or drop the file.")
    return volume


def check_geometry(path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray,
                   spacing: Sequence[float] = CTPreprocessConfig().spacing) -> None:
    """Raises the CTLoadError `preprocess_ct` would raise for this geometry, without any voxels.

    Reorients a zero-byte stand-in of `shape` and builds the resampling grid for `spacing` (cheap:
    one coordinate vector per axis), so header-only checks refuse exactly what loading refuses.
    """
    stand_in = np.broadcast_to(np.zeros((), np.uint8), tuple(int(n) for n in shape))
    try:
        oriented, ras_affine = orient_to_ras(stand_in, affine)
        _spacing_grid(oriented.shape, ras_affine, spacing)
    except ValueError as e:
        raise _ct_error(SHEARED if isinstance(e, _ShearedAffine) else BAD_AFFINE,
                        f"CT file {os.fspath(path)!r}: {e}") from None
