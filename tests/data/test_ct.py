"""Tests for vljax.data.ct: parity with Merlin's MONAI chain, an independent SciPy reference,
orientation by hand-built geometry, the fused path, and loading errors.

Tolerance: atol 1e-5 on [0, 1] outputs. MONAI interpolates in float64 and casts to float32; vljax
interpolates in float32. On HU values up to ~3000 that costs a few float32 ulps (~1e-3 HU), i.e.
~1e-7 after dividing by the 2000 HU window; a wrong grid (a half-voxel shift, a wrong size, a flipped
axis) on these noisy volumes produces errors of order 0.1. Measured maxima are <= 2e-7, and 8e-7 for
the rotated affine, whose float32-stored rotation carries ~1e-8 of shear that vljax ignores.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import nibabel as nib
import numpy as np
import pytest

from vljax.data import ct

ATOL = 1e-5

# World axis and sign of each axis code (RAS+ world, as NIfTI).
_CODE = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def _stored(canonical: np.ndarray, spacing_ras, origin_ras, codes: str):
    """A RAS array stored with axis codes `codes`, and its affine, both built by hand.

    Stored axis i runs along world axis a_i in direction s_i; the world grid is the same for all
    codes, so every orientation describes the same voxels in the same places.
    """
    axes = [_CODE[c][0] for c in codes]
    signs = [_CODE[c][1] for c in codes]
    assert sorted(axes) == [0, 1, 2]
    data = canonical.transpose(axes)
    affine = np.eye(4)
    translation = np.array(origin_ras, dtype=float)
    for i, (a, s) in enumerate(zip(axes, signs)):
        affine[:3, i] = 0.0
        affine[a, i] = s * spacing_ras[a]
        if s < 0:
            data = np.flip(data, axis=i)
            translation[a] += (canonical.shape[a] - 1) * spacing_ras[a]
    affine[:3, 3] = translation
    return np.ascontiguousarray(data), affine


def _hu_volume(shape, seed):
    """Noisy int16 HU with values beyond the window on both sides (the hardest case to match)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2000, 3000, size=shape).astype(np.int16)


def _write(path, data, affine, slope_inter=None):
    img = nib.Nifti1Image(data, affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return str(path)


def _monai_chain(spacing, shape):
    t = pytest.importorskip("monai.transforms")
    return t.Compose([
        t.LoadImaged(keys="image"),
        t.EnsureChannelFirstd(keys="image"),
        t.Orientationd(keys="image", axcodes="RAS"),
        t.Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        t.ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        t.SpatialPadd(keys="image", spatial_size=list(shape)),
        t.CenterSpatialCropd(keys="image", roi_size=list(shape)),
    ])


def _monai(path, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _monai_chain(config.spacing, config.shape)({"image": path})["image"]
    out = np.asarray(out)
    assert out.shape == (1, *config.shape)
    return ct.to_model_layout(out[0])  # Merlin: (B, C, X, Y, Z) -> (B, C, Z, X, Y)


def _rotated_affine(spacing, degrees, origin):
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1, -1, 1])  # LPS-like, rotated about z
    affine[:3, 3] = origin
    return affine


# (name, stored shape, stored axis codes or an affine builder, stored-axis spacing, target x,y,z,
#  slope/inter). Targets are chosen so that axes get padded (odd and even widths) and cropped.
CASES = [
    ("LPS", (40, 36, 20), "LPS", (0.7, 0.8, 2.5), (16, 24, 18), None),
    ("LAS", (36, 40, 21), "LAS", (2.0, 1.1, 5.0), (45, 33, 31), None),
    ("RPI_tie", (33, 36, 20), "RPI", (0.75, 0.75, 3.0), (16, 19, 23), None),
    ("LPI", (39, 35, 19), "LPI", (0.9, 0.7, 2.0), (25, 30, 14), None),
    ("ARS_perm", (36, 40, 20), "ARS", (0.8, 0.7, 2.5), (20, 18, 17), None),
    ("SLP_perm", (20, 40, 36), "SLP", (2.5, 0.7, 0.8), (17, 20, 18), None),
    ("RAS_scaled", (38, 37, 22), "RAS", (1.2, 1.3, 2.0), (31, 32, 14), (2.0, -1024.0)),
    ("near_target", (30, 31, 12), "LPS", (1.5004, 1.5, 3.0), (28, 34, 12), None),
    ("rotated", (40, 36, 20), "rot", (0.7, 0.8, 2.5), (16, 24, 18), None),
]


def _case_file(tmp_path, case, seed=0):
    name, shape, codes, spacing, _, slope_inter = case
    data = _hu_volume(shape, seed)
    if codes == "rot":
        affine = _rotated_affine(spacing, 10.0, (12.0, -7.5, 40.25))
    else:
        # Hand-built affine with this case's stored-axis spacing and an arbitrary origin.
        axes = [_CODE[c][0] for c in codes]
        spacing_ras = [spacing[axes.index(a)] for a in range(3)]
        shape_ras = [shape[axes.index(a)] for a in range(3)]
        _, affine = _stored(np.zeros(shape_ras), spacing_ras, (-31.3, 17.9, -412.6), codes)
    if slope_inter is not None:
        data = (data // 2).astype(np.int16)
    return _write(tmp_path / f"{name}.nii.gz", data, affine, slope_inter)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_monai_chain(tmp_path, case):
    path = _case_file(tmp_path, case)
    config = ct.CTPreprocessConfig(shape=case[4])
    ours = ct.preprocess_ct(path, config)
    theirs = _monai(path, config)
    assert ours.shape == theirs.shape == (case[4][2], case[4][0], case[4][1])
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    assert 0.0 < ours.mean() < 1.0  # not trivially all padding


def test_matches_monai_chain_default_config(tmp_path):
    # A 0.75 mm scan (shape ties: 127 * 0.5 + 1 = 64.5 rounds to 64) and the real 224x224x160 target.
    path = _write(tmp_path / "default.nii.gz", _hu_volume((128, 120, 60), 1),
                  np.array([[-0.75, 0, 0, 100.0], [0, -0.75, 0, 80.0], [0, 0, 3.0, -500.0], [0, 0, 0, 1]]))
    config = ct.CTPreprocessConfig()
    ours = ct.preprocess_ct(path, config)
    assert ours.shape == (160, 224, 224)
    np.testing.assert_allclose(ours, _monai(path, config), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# An independent reference: SciPy map_coordinates on nibabel's canonical (RAS) array.
# ------------------------------------------------------------------------------------------------


def _scipy_reference(path, config):
    ndimage = pytest.importorskip("scipy.ndimage")
    img = nib.as_closest_canonical(nib.load(path))
    vol = np.asarray(img.dataobj, dtype=np.float64)
    affine = img.affine
    assert np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))  # axis-aligned RAS
    in_spacing = np.diag(affine)[:3]
    out_spacing = np.array(config.spacing)
    # Output grid: voxel-centre spacing s_out, first centre on the first input centre, size
    # round((n - 1) * s_in / s_out + 1).
    out_shape = np.round((np.array(vol.shape) - 1) * in_spacing / out_spacing + 1).astype(int)
    world = [affine[k, 3] + out_spacing[k] * np.arange(out_shape[k]) for k in range(3)]
    grid = np.stack(np.meshgrid(*world, indexing="ij"), axis=0).reshape(3, -1)
    voxel = (np.linalg.inv(affine) @ np.concatenate([grid, np.ones_like(grid[:1])]))[:3]
    res = ndimage.map_coordinates(vol, voxel, order=1, mode="nearest").reshape(out_shape)
    lo, hi = config.hu_window
    res = np.clip((res - lo) / (hi - lo), 0.0, 1.0)
    widths = [max(t - n, 0) for n, t in zip(res.shape, config.shape)]
    res = np.pad(res, [(w // 2, w - w // 2) for w in widths])
    starts = [n // 2 - t // 2 for n, t in zip(res.shape, config.shape)]
    res = res[tuple(slice(s, s + t) for s, t in zip(starts, config.shape))]
    return res.transpose(2, 0, 1)


SCIPY_CASES = [c for c in CASES if c[0] in ("LPS", "LAS", "LPI", "SLP_perm", "RAS_scaled")]


@pytest.mark.parametrize("case", SCIPY_CASES, ids=[c[0] for c in SCIPY_CASES])
def test_matches_scipy_reference(tmp_path, case):
    path = _case_file(tmp_path, case, seed=3)
    config = ct.CTPreprocessConfig(shape=case[4])
    np.testing.assert_allclose(ct.preprocess_ct(path, config), _scipy_reference(path, config),
                               rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# Orientation, checked with hand-built geometry only.
# ------------------------------------------------------------------------------------------------

ORIENTATIONS = ["RAS", "LPS", "LAS", "RPI", "LPI", "ARS", "SLP", "PIR", "IRA"]


def test_marker_lands_on_the_same_voxel_on_the_patients_right(tmp_path):
    # RAS grid of 48 x 40 x 24 voxels of 1 x 1 x 2 mm from origin o; a bright voxel at RAS index
    # (33, 27, 18): 15 mm right, 7 mm anterior and 12 mm superior of the centre voxel (24, 20, 12).
    spacing, origin = (1.0, 1.0, 2.0), (-20.0, 35.0, -300.0)
    canonical = np.full((48, 40, 24), -1000, np.int16)
    canonical[33, 27, 18] = 1000
    config = ct.CTPreprocessConfig(spacing=(1.5, 1.5, 3.0), shape=(34, 24, 16))
    # Output grid: 1.5 mm from the same origin, so the marker at 33 mm, 27 mm, 36 mm from it sits on
    # output voxel (22, 18, 12) of a 32 x 27 x 16 grid (47/1.5+1 = 32.3, 39/1.5+1 = 27, 46/3+1 = 16.3).
    # x: padded 32 -> 34, 1 voxel before: H = 23.  y: cropped 27 -> 24 from 13 - 12 = 1: W = 17.
    # z: unchanged: D = 12.  Layout (D, H, W) = (z, x, y).
    expected = (12, 23, 17)
    for codes in ORIENTATIONS:
        data, affine = _stored(canonical, spacing, origin, codes)
        out = ct.preprocess_volume(data, affine, config)
        assert out.shape == (16, 34, 24)
        peak = np.unravel_index(np.argmax(out), out.shape)
        assert peak == expected, codes
        assert out[peak] == 1.0 and np.sort(out.ravel())[-2] < 1.0, codes
        d, h, w = peak
        # Patient right = +x in RAS = larger H; anterior = larger W; superior = larger D.
        assert h > out.shape[1] / 2 and w > out.shape[2] / 2 and d > out.shape[0] / 2, codes
    # The same through a file on disk, stored LPS (the DICOM-derived layout).
    data, affine = _stored(canonical, spacing, origin, "LPS")
    assert data[48 - 1 - 33, 40 - 1 - 27, 18] == 1000  # stored LPS: x and y indices reversed
    out = ct.preprocess_ct(_write(tmp_path / "marker.nii.gz", data, affine), config)
    assert np.unravel_index(np.argmax(out), out.shape) == expected


def test_orient_to_ras_is_axis_permutation_only():
    canonical = _hu_volume((5, 6, 7), 2)
    for codes in ORIENTATIONS:
        data, affine = _stored(canonical, (0.5, 0.6, 0.7), (1.0, 2.0, 3.0), codes)
        ras, ras_affine = ct.orient_to_ras(data, affine)
        np.testing.assert_array_equal(ras, canonical)
        np.testing.assert_allclose(ras_affine, np.array(
            [[0.5, 0, 0, 1.0], [0, 0.6, 0, 2.0], [0, 0, 0.7, 3.0], [0, 0, 0, 1]]), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The fused path, dtypes, config.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_equals_unfused_chain(tmp_path, case):
    path = _case_file(tmp_path, case, seed=5)
    config = ct.CTPreprocessConfig(shape=case[4])
    data, affine = ct.load_nifti(path)
    assert data.dtype == np.float32 and data.ndim == 3
    data, affine = ct.orient_to_ras(data, affine)
    data, affine = ct.resample_to_spacing(data, affine, config.spacing)
    unfused = ct.to_model_layout(ct.pad_and_crop(ct.scale_hu(data, config.hu_window), config.shape))
    np.testing.assert_array_equal(ct.preprocess_ct(path, config), unfused)


def test_resample_grid_and_affine():
    # 0.75 mm -> 1.5 mm: 11 voxels -> (10 * 0.5 + 1) = 6, sampling input 0, 2, 4, ... exactly.
    data = np.arange(11 * 4 * 3, dtype=np.float32).reshape(11, 4, 3)
    affine = np.diag([0.75, 1.5, 3.0, 1.0])
    affine[:3, 3] = (5.0, 6.0, 7.0)
    out, out_affine = ct.resample_to_spacing(data, affine, (1.5, 1.5, 3.0))
    np.testing.assert_array_equal(out, data[::2])
    np.testing.assert_allclose(out_affine, np.diag([1.5, 1.5, 3.0, 1.0]) + np.pad(
        np.array([[5.0], [6.0], [7.0]]), ((0, 1), (3, 0))), atol=1e-12)


def test_resample_size_ties_round_half_to_even():
    # (n - 1) * 0.75 / 1.5 + 1 = 18.5 for n = 36 and 17.5 for n = 34: both give 18, as np.round.
    for n in (36, 34):
        out, _ = ct.resample_to_spacing(np.zeros((n, 3, 2), np.float32), np.diag([0.75, 1.5, 3.0, 1.0]),
                                        (1.5, 1.5, 3.0))
        assert out.shape == (18, 3, 2)


def test_single_slice_and_thin_volumes_match_monai(tmp_path):
    for shape in ((40, 36, 1), (1, 36, 20)):
        path = _write(tmp_path / "thin.nii.gz", _hu_volume(shape, 6), np.diag([-0.7, -0.8, 2.5, 1.0]))
        config = ct.CTPreprocessConfig(shape=(16, 24, 4))
        np.testing.assert_allclose(ct.preprocess_ct(path, config), _monai(path, config), rtol=0, atol=ATOL)


def test_preprocess_volume_leaves_input_alone_and_ignores_memory_layout():
    data = _hu_volume((64, 60, 20), 7).astype(np.float32)
    affine = np.diag([-0.75, -0.75, 3.0, 1.0])  # on-grid resampling: the path that slices views
    config = ct.CTPreprocessConfig(shape=(24, 28, 22))
    before = data.copy()
    out = ct.preprocess_volume(data, affine, config)
    np.testing.assert_array_equal(data, before)
    np.testing.assert_array_equal(out, ct.preprocess_volume(np.asfortranarray(data), affine, config))
    affine = np.diag([-0.7, 0.8, 2.5, 1.0])  # interpolating: the pass order follows the layout
    layouts = (np.asfortranarray(data), data[:, ::-1].copy()[:, ::-1],
               data.transpose(2, 0, 1).copy().transpose(1, 2, 0))
    for layout in layouts:
        np.testing.assert_allclose(ct.preprocess_volume(layout, affine, config),
                                   ct.preprocess_volume(data, affine, config), rtol=0, atol=1e-6)


def test_pad_and_crop_monai_offsets():
    x = np.arange(7, dtype=np.float32)[:, None, None] * np.ones((1, 1, 1), np.float32)
    padded = ct.pad_and_crop(x, (10, 1, 1))[:, 0, 0]  # pad 3: 1 before, 2 after
    np.testing.assert_array_equal(padded, [0, 0, 1, 2, 3, 4, 5, 6, 0, 0])
    cropped = ct.pad_and_crop(x, (4, 1, 1))[:, 0, 0]  # start 7 // 2 - 4 // 2 = 1
    np.testing.assert_array_equal(cropped, [1, 2, 3, 4])
    cropped = ct.pad_and_crop(x[:6], (3, 1, 1))[:, 0, 0]  # start 6 // 2 - 3 // 2 = 2
    np.testing.assert_array_equal(cropped, [2, 3, 4])


def test_bfloat16_output(tmp_path):
    path = _case_file(tmp_path, CASES[0])
    f32 = ct.preprocess_ct(path, ct.CTPreprocessConfig(shape=CASES[0][4]))
    bf16 = ct.preprocess_ct(path, ct.CTPreprocessConfig(shape=CASES[0][4], dtype="bfloat16"))
    assert bf16.dtype == np.dtype(ml_dtypes.bfloat16) and bf16.shape == f32.shape
    np.testing.assert_array_equal(bf16, f32.astype(ml_dtypes.bfloat16))
    np.testing.assert_allclose(bf16.astype(np.float32), f32, atol=2.0**-8)


def test_four_d_with_trailing_singleton_is_accepted(tmp_path):
    data = _hu_volume((20, 18, 10), 4)
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    config = ct.CTPreprocessConfig(shape=(16, 16, 8))
    three = ct.preprocess_ct(_write(tmp_path / "a.nii.gz", data, affine), config)
    four = ct.preprocess_ct(_write(tmp_path / "b.nii.gz", data[..., None], affine), config)
    np.testing.assert_array_equal(three, four)


def test_config_defaults_and_validation():
    config = ct.CTPreprocessConfig()
    assert config.spacing == (1.5, 1.5, 3.0) and config.shape == (224, 224, 160)
    assert config.hu_window == (-1000.0, 1000.0) and config.dtype == "float32"
    assert ct.CTPreprocessConfig(shape=[8, 8, 8]).shape == (8, 8, 8)  # normalised to a tuple
    bad = [
        dict(spacing=(1.5, 0.0, 3.0)), dict(spacing=(1.5, -1.0, 3.0)), dict(spacing=(1.5, 1.5)),
        dict(spacing=(1.5, float("nan"), 3.0)), dict(spacing=1.5), dict(shape=(224, 0, 160)),
        dict(shape=(224.0, 224, 160)), dict(shape=(224, 224)), dict(hu_window=(1000.0, -1000.0)),
        dict(hu_window=(0.0, 0.0)), dict(hu_window=(-1000.0, float("inf"))), dict(dtype="float16"),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="CTPreprocessConfig"):
            ct.CTPreprocessConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# Loading errors: CTLoadError naming the file.
# ------------------------------------------------------------------------------------------------


def _truncated(tmp_path):
    path = _write(tmp_path / "truncated.nii.gz", _hu_volume((30, 30, 20), 0), np.eye(4))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    return path


def _random_bytes(tmp_path):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return str(path)


def _uncompressed_truncated(tmp_path):
    path = _write(tmp_path / "short.nii", _hu_volume((30, 30, 20), 0), np.eye(4))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) - 100])
    return path


def _nan(tmp_path):
    data = _hu_volume((10, 10, 5), 0).astype(np.float32)
    data[3, 4, 2] = np.nan
    return _write(tmp_path / "nan.nii.gz", data, np.eye(4))


def _singular(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 2] = affine[:3, 1]  # two voxel axes along the same world direction
    img = nib.Nifti1Image(_hu_volume((10, 10, 5), 0), None)
    img.set_sform(affine, code=1)
    img.set_qform(None, code=0)
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    return str(path)


ERROR_CASES = {
    "missing": (lambda tmp_path: str(tmp_path / "missing.nii.gz"), "does not exist"),
    "random_bytes": (_random_bytes, "not a readable NIfTI"),
    "truncated_gzip": (_truncated, "corrupt or truncated"),
    "truncated_raw": (_uncompressed_truncated, "corrupt or truncated|not a readable"),
    "two_d": (lambda p: _write(p / "flat.nii.gz", _hu_volume((10, 10), 0), np.eye(4)), "3-D"),
    "two_volumes": (lambda p: _write(p / "4d.nii.gz", _hu_volume((10, 10, 5, 2), 0), np.eye(4)), "3-D"),
    "zero_size": (lambda p: _write(p / "empty.nii.gz", np.zeros((10, 0, 5), np.int16), np.eye(4)),
                  "zero-size"),
    "nan": (_nan, "NaN"),
    "singular_affine": (_singular, "singular"),
    "not_nifti": (lambda p: _write_mgh(p), "not NIfTI"),
}


def _sheared(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[0, 2] = 0.5  # slices shifted sideways along z (an uncorrected gantry tilt)
    return _write(tmp_path / "sheared.nii.gz", _hu_volume((20, 20, 10), 0), affine)


def test_sheared_affine_is_refused_by_preprocess_ct(tmp_path):
    path = _sheared(tmp_path)
    ct.load_nifti(path)  # loading is fine; Spacing would not be axis-separable
    with pytest.raises(ct.CTLoadError, match="sheared") as info:
        ct.preprocess_ct(path, ct.CTPreprocessConfig(shape=(8, 8, 8)))
    assert repr(path) in str(info.value)


def _write_mgh(tmp_path):
    path = tmp_path / "volume.mgz"
    nib.save(nib.MGHImage(_hu_volume((10, 10, 5), 0).astype(np.int32), np.eye(4)), str(path))
    return str(path)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_files_raise_ct_load_error_naming_the_file(tmp_path, name):
    make, problem = ERROR_CASES[name]
    path = make(tmp_path)
    for load in (ct.load_nifti, ct.preprocess_ct):
        with pytest.raises(ct.CTLoadError, match=problem) as info:
            load(path)
        message = str(info.value)
        assert repr(str(path)) in message
        assert isinstance(info.value, ValueError)
        # No chained nibabel/gzip exception: their messages can quote file bytes.
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__
