"""Manifest reading: Merlin layout, JSONL round trip, XLSX reports, and every validation error."""

from __future__ import annotations

import csv
import json
import shutil

import openpyxl
import pytest

from vljax.data import phantom as ph
from vljax.data.findings import FINDINGS
from vljax.data.manifest import ManifestError, load_manifest, write_jsonl
from vljax.summary import summarize

from tests.conftest import SMALL_PHANTOM
from tests.data.csv_rows import read_rows as _rows, write_rows as _write_rows


@pytest.fixture()
def dataset(tmp_path, phantom_dir):
    """A private, editable copy of the session phantom."""
    dst = tmp_path / "ds"
    shutil.copytree(phantom_dir, dst)
    return dst


def test_reads_the_merlin_layout_into_typed_records(phantom_dir):
    m = load_manifest(phantom_dir)
    assert len(m) == SMALL_PHANTOM.num_studies
    assert m.phenotype_codes == tuple(c for c, *_ in ph.PHECODES)
    for r in m.records:
        spec = ph.sample_spec(SMALL_PHANTOM, int(r.study_id[2:]))
        assert r.labels == tuple(spec.labels[f] for f in FINDINGS)
        assert r.split == spec.split and r.image.endswith(f"{r.study_id}.nii.gz")
        assert (r.findings, r.impression) == ph.report_for(spec)
        assert r.label("pleural effusion") == spec.labels["pleural effusion"]
    assert sum(len(m.split(s)) for s in ("train", "val", "test")) == len(m)
    s = summarize(m)
    assert sum(s["splits"].values()) == len(m)
    assert all(sum(v.values()) == len(m) for v in s["findings"].values())


def test_jsonl_round_trip(phantom_dir, tmp_path):
    m = load_manifest(phantom_dir)
    path = phantom_dir / "manifest.jsonl"
    try:
        write_jsonl(m, path)
        first = json.loads(path.read_text().splitlines()[0])
        assert first["image"].startswith("merlin_data/")  # relative to the manifest's folder
        m2 = load_manifest(path)
    finally:
        path.unlink()
    assert m2.records == m.records
    assert m2.phenotype_codes == m.phenotype_codes
    # and a JSONL written elsewhere keeps absolute image paths that still resolve
    write_jsonl(m, tmp_path / "elsewhere.jsonl")
    assert load_manifest(tmp_path / "elsewhere.jsonl").records == m.records


def test_reports_table_as_xlsx_with_real_column_names(dataset):
    header, *rows = _rows(dataset / "reports.csv")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["study id", "Findings", "Impression", "Split"])
    for r in rows:
        ws.append([r[0], r[1], r[2], {"val": "validation"}.get(r[3], r[3])])
    wb.save(dataset / "reports_final.xlsx")
    (dataset / "reports.csv").unlink()
    m = load_manifest(dataset)
    assert [r.study_id for r in m.records] == [r[0] for r in rows]
    assert [r.split for r in m.records] == [r[3] for r in rows]


def _expect_problem(path, *fragments, absent=()):
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, msg
    for frag in absent:
        assert frag not in msg, msg
    return e.value


def test_missing_image_file(dataset):
    sid = "PH000003"
    (dataset / ph.IMAGES_DIR / f"{sid}.nii.gz").unlink()
    err = _expect_problem(dataset, sid, "missing image file")
    assert len(err.problems) == 1


def test_unknown_split(dataset):
    rows = _rows(dataset / "reports.csv")
    rows[2][3] = "holdout"
    _write_rows(dataset / "reports.csv", rows)
    _expect_problem(dataset, rows[2][0], "unknown split 'holdout'")


def test_label_outside_allowed_values(dataset):
    rows = _rows(dataset / ph.LABELS_FILE)
    col = rows[0].index("ascites")
    rows[4][col] = "2"
    _write_rows(dataset / ph.LABELS_FILE, rows)
    _expect_problem(dataset, rows[4][0], "'ascites' is '2'", "must be 1 (positive), 0 (negative) or -1")


def test_duplicate_study_id(dataset):
    rows = _rows(dataset / "reports.csv")
    rows.append(rows[5])
    _write_rows(dataset / "reports.csv", rows)
    _expect_problem(dataset, rows[5][0], "duplicate study id")


def test_empty_findings_names_the_study_but_not_the_text(dataset):
    rows = _rows(dataset / "reports.csv")
    other_text = rows[2][1]
    rows[1][1] = "   "
    _write_rows(dataset / "reports.csv", rows)
    # one more broken row: every problem is listed, and no report text leaks into the message
    rows[2][3] = "nope"
    _write_rows(dataset / "reports.csv", rows)
    err = _expect_problem(dataset, rows[1][0], "empty findings", rows[2][0], absent=(other_text[:30],))
    assert len(err.problems) == 2


def test_unknown_label_column_and_missing_label_row(dataset):
    rows = _rows(dataset / ph.LABELS_FILE)
    _write_rows(dataset / ph.LABELS_FILE, [rows[0] + ["kidney stones"]] + [r + ["0"] for r in rows[1:]])
    _expect_problem(dataset, "unknown label column 'kidney stones'")
    _write_rows(dataset / ph.LABELS_FILE, rows[:3] + rows[4:])
    _expect_problem(dataset, rows[3][0], "no row in zero_shot_findings_disease_cls.csv")


def test_jsonl_errors_name_line_and_study(phantom_dir, tmp_path):
    m = load_manifest(phantom_dir)
    path = tmp_path / "m.jsonl"
    write_jsonl(m, path)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["labels"]["gallstones"] = 3
    worse = json.loads(lines[2])
    worse["labels"]["kidney stones"] = 1
    lines[1], lines[2] = json.dumps(bad), json.dumps(worse)
    lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    err = _expect_problem(path, bad["study_id"], "labels not in {1,0,-1}: ['gallstones']",
                          worse["study_id"], "unknown label(s) ['kidney stones']", "not valid JSON")
    assert len(err.problems) == 3


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _expect_problem(tmp_path / "empty", "no reports table")


def test_non_utf8_reports_name_file_line_and_study_without_a_traceback(dataset):
    rows = _rows(dataset / "reports.csv")
    rows[3][1] = "Liver: caf\udce9 au lait " + rows[3][1]  # a Latin-1 byte (0xE9) in a findings cell
    with open(dataset / "reports.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    # the physical line of row 3: reports contain no newlines, so header line 1, row 3 -> line 4
    err = _expect_problem(dataset, "reports.csv line 4", rows[3][0], "not valid UTF-8",
                          absent=("Traceback", "UnicodeDecodeError", "lait", "position"))
    assert [(p.kind, p.study_id) for p in err.details] == [("bad_encoding", rows[3][0])]


def test_non_utf8_jsonl_line_is_one_problem(phantom_dir, tmp_path):
    path = tmp_path / "m.jsonl"
    write_jsonl(load_manifest(phantom_dir), path)
    lines = path.read_bytes().splitlines(keepends=True)
    sid = json.loads(lines[2])["study_id"]
    lines[2] = lines[2].replace(b'"findings": "', b'"findings": "\xe9')
    path.write_bytes(b"".join(lines))
    err = _expect_problem(path, sid, "line 3 is not valid UTF-8", absent=("Traceback", "Decode"))
    assert len(err.problems) == 1


def test_reports_longer_than_the_csv_default_field_limit_are_read(dataset):
    default = csv.field_size_limit()
    rows = _rows(dataset / "reports.csv")
    long_text = ("Liver: normal in size. " * 8000)[:200_000]  # past csv's default 131,072 characters
    rows[1][1] = long_text
    _write_rows(dataset / "reports.csv", rows)
    m = load_manifest(dataset)
    assert m.by_id()[rows[1][0]].findings == long_text.strip()
    assert csv.field_size_limit() == default  # the process-wide limit is put back


def test_read_manifest_returns_good_records_and_classified_problems(dataset):
    from vljax.data import manifest as manifest_lib

    rows = _rows(dataset / "reports.csv")
    rows[1][1], rows[2][3] = "", "holdout"
    rows.append(rows[5])
    _write_rows(dataset / "reports.csv", rows)
    (dataset / ph.IMAGES_DIR / f"{rows[7][0]}.nii.gz").unlink()
    m, problems = manifest_lib.read_manifest(dataset)
    assert {(p.kind, p.study_id) for p in problems} == {
        ("empty_report", rows[1][0]), ("unknown_split", rows[2][0]), ("duplicate_id", rows[5][0]),
        ("missing_file", rows[7][0])}
    assert len(m) == SMALL_PHANTOM.num_studies - 3
    assert next(p for p in problems if p.kind == "missing_file").path.endswith(f"{rows[7][0]}.nii.gz")
