"""`python -m vljax.validate`: planted faults of every class are found, by class and study id; a clean
phantom passes; the header level finds truncation without reading voxels."""

from __future__ import annotations

import math
import pathlib
import shutil
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from vljax import validate
from vljax.data import ct
from vljax.data import phantom as ph
from vljax.data.manifest import load_manifest
from tests.data.csv_rows import read_rows as _rows, write_rows as _write_rows

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _image(ds, sid):
    return ds / ph.IMAGES_DIR / f"{sid}.nii.gz"


def _rewrite(ds, sid, change):
    """Re-saves a study's volume as change(data, affine) -> (data, affine)."""
    img = nib.load(_image(ds, sid))
    data, affine = change(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), _image(ds, sid))


def _rotated_z(affine, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    out = affine.copy()
    out[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    return out


def _sheared(affine):
    out = affine.copy()
    out[:3, 2] += 0.5 * out[:3, 0]  # slices shifted sideways along z (an uncorrected gantry tilt)
    return out


def _plant_faults(ds) -> tuple[set, set]:
    """One fault per study on a copy of the fixture phantom: {(class, study id)} blocking and warnings."""
    ids = [r[0] for r in _rows(ds / ph.REPORTS_FILE)[1:]]
    sid = dict(zip(["missing", "empty_report", "label", "duplicate", "split", "truncated", "garbage", "4d",
                    "spacing", "sheared", "nan", "constant", "absurd", "oblique", "uncalibrated"], ids))
    reports = _rows(ds / ph.REPORTS_FILE)
    row = {r[0]: r for r in reports}
    row[sid["empty_report"]][1] = " "
    row[sid["split"]][3] = "holdout"
    reports.append(list(row[sid["duplicate"]]))
    _write_rows(ds / ph.REPORTS_FILE, reports)
    labels = _rows(ds / ph.LABELS_FILE)
    col = labels[0].index("ascites")
    next(r for r in labels if r[0] == sid["label"])[col] = "2"
    _write_rows(ds / ph.LABELS_FILE, labels)

    _image(ds, sid["missing"]).unlink()
    raw = _image(ds, sid["truncated"]).read_bytes()
    _image(ds, sid["truncated"]).write_bytes(raw[: len(raw) * 6 // 10])
    _image(ds, sid["garbage"]).write_bytes(np.random.default_rng(0).bytes(4000))
    _rewrite(ds, sid["4d"], lambda d, a: (np.stack([d, d], axis=-1), a))
    _rewrite(ds, sid["spacing"], lambda d, a: (d, np.diag([0.01, 0.01, 0.01, 1.0]) @ a))
    _rewrite(ds, sid["sheared"], lambda d, a: (d, _sheared(a)))
    _rewrite(ds, sid["oblique"], lambda d, a: (d, _rotated_z(a, 35.0)))

    def with_nan(d, a):
        d = d.astype(np.float32)
        d[3, 4, 5] = np.nan
        return d, a

    _rewrite(ds, sid["nan"], with_nan)
    _rewrite(ds, sid["constant"], lambda d, a: (np.full_like(d, -1000), a))
    _rewrite(ds, sid["absurd"], lambda d, a: (d.astype(np.float32) * 100.0, a))  # e.g. a wrong scl_slope
    _rewrite(ds, sid["uncalibrated"], lambda d, a: ((d.astype(np.int32) + 1024).astype(np.uint16), a))

    blocking = {("missing_file", sid["missing"]), ("empty_report", sid["empty_report"]),
                ("bad_label", sid["label"]), ("duplicate_id", sid["duplicate"]), ("unknown_split", sid["split"]),
                ("truncated", sid["truncated"]), ("unreadable_header", sid["garbage"]), ("not_3d", sid["4d"]),
                ("bad_spacing", sid["spacing"]), ("sheared", sid["sheared"]), ("nan_voxels", sid["nan"]),
                ("constant_volume", sid["constant"]), ("absurd_hu", sid["absurd"])}
    warnings = {("oblique", sid["oblique"]), ("uncalibrated", sid["uncalibrated"])}
    return blocking, warnings


@pytest.fixture()
def faulty(tmp_path, phantom_dir):
    ds = tmp_path / "ds"
    shutil.copytree(phantom_dir, ds)
    return ds, *_plant_faults(ds)


def _run(data_dir, *flags):
    return subprocess.run([sys.executable, "-m", "vljax.validate", f"--data_dir={data_dir}", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _found(stdout: str) -> set:
    """(class, study id) of every problem line: `class  study_id  path: message`."""
    classes = set(validate.MANIFEST_CLASSES + validate.HEADER_CLASSES + validate.VOXEL_CLASSES)
    return {tuple(line.split()[:2]) for line in stdout.splitlines()
            if not line.startswith(" ") and line.split()[:1] and line.split()[0] in classes}


def test_deep_validation_finds_every_planted_fault_by_class_and_study(faulty, phantom_dir):
    ds, blocking, warnings = faulty
    assert len({kind for kind, _ in blocking}) >= 10  # ten and more distinct classes, one study each
    result = _run(ds, "--deep", "--workers=2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert _found(result.stdout) == blocking | warnings, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # Study ids and paths only: no report text (the first findings sentence of every study).
    texts = [r[1][:40] for r in _rows(phantom_dir / ph.REPORTS_FILE)[1:]]
    assert not any(t in result.stdout + result.stderr for t in texts)
    summary = result.stdout.splitlines()[-1]
    assert f"{len(blocking)} blocking problem(s), {len(warnings)} warning(s)" in summary, summary
    for kind, _ in blocking:
        assert f"  {kind:<17}     1  blocking" in result.stdout, kind


def test_a_clean_phantom_passes_deep_validation(phantom_dir):
    result = _run(phantom_dir, "--deep", "--workers=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 blocking problem(s), 0 warning(s)" in result.stdout


def test_headers_alone_find_truncation_without_reading_voxels(tmp_path, phantom_dir, monkeypatch):
    m = load_manifest(phantom_dir)
    gz, raw = m.records[0], m.records[1]
    short_gz = tmp_path / "short.nii.gz"
    short_gz.write_bytes(pathlib.Path(gz.image).read_bytes()[:-2000])
    img = nib.load(raw.image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), tmp_path / "short.nii")
    (tmp_path / "short.nii").write_bytes((tmp_path / "short.nii").read_bytes()[:-100])

    def no_voxels(*args, **kwargs):
        raise AssertionError("the header check read voxels")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_voxels)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", no_voxels)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", no_voxels)
    monkeypatch.setattr(ct, "_read_nifti", no_voxels)
    records = list(m.records) + [types.SimpleNamespace(study_id="GZ", image=str(short_gz)),
                                 types.SimpleNamespace(study_id="RAW", image=str(tmp_path / "short.nii"))]
    problems = validate.check_headers(records, workers=4)
    assert [(p.kind, p.study_id) for p in problems] == [("truncated", "GZ"), ("truncated", "RAW")]
    assert all(validate.is_blocking(p) for p in problems)
    with pytest.raises(validate.DatasetError, match="2 blocking problem.*truncated 2") as e:
        validate.raise_if_blocking(problems, str(phantom_dir))
    assert isinstance(e.value, ValueError) and "GZ" in str(e.value) and str(short_gz) in str(e.value)


def test_warnings_alone_do_not_block(tmp_path, phantom_dir):
    ds = tmp_path / "ds"
    shutil.copytree(phantom_dir, ds)
    sid = load_manifest(ds).records[2].study_id
    _rewrite(ds, sid, lambda d, a: (d, _rotated_z(a, 30.0)))
    n, problems = validate.validate_dataset(ds, deep=True, workers=1)
    assert n == len(load_manifest(ds)) and [(p.kind, p.study_id) for p in problems] == [("oblique", sid)]
    validate.raise_if_blocking(problems, str(ds))  # warnings only: no error
    # the kind travels with CTLoadError out of worker processes
    err = ct._ct_error(ct.NAN_VOXELS, "x")
    import pickle
    assert pickle.loads(pickle.dumps(err)).kind == ct.NAN_VOXELS


def test_an_unreadable_dataset_is_reported_not_raised(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run(tmp_path / "empty")
    assert result.returncode == 1 and "bad_table" in result.stdout and "no reports table" in result.stdout
    assert "Traceback" not in result.stderr
