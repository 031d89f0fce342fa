"""Dataset manifests: the public Merlin layout (or a JSONL file) read into typed study records.

Directory layout (the Merlin release, and what the phantom writes):

    ROOT/merlin_data/<study_id>.nii.gz  (or .nii)
    ROOT/reports_final.xlsx | reports_final.csv | reports.csv   study id, findings, [impression], split
    ROOT/zero_shot_findings_disease_cls.csv                     study id + 30 findings, values 1 / 0 / -1
    ROOT/phenotypes.csv                                         optional: study id + phenotype codes, 0 / 1

JSONL form, one study per line (image paths relative to the file's folder, or absolute):

    {"study_id": "...", "image": "merlin_data/X.nii.gz", "findings": "...", "impression": "...",
     "split": "train", "labels": {"<finding>": 1, ...}, "phenotypes": {"<code>": 0, ...}}

Validation collects every problem before raising one `ManifestError` that lists them, each naming
the study id and the problem; report text never appears in errors. `read_manifest` returns the good
records and the problems instead (each a `Problem` with its class), for `python -m vljax.validate`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import pathlib
from typing import Iterable, Mapping, Sequence

from vljax.data.findings import FINDINGS

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
IMAGE_DIRS = ("merlin_data", "images")
REPORT_TABLES = ("reports_final.xlsx", "reports_final.csv", "reports.csv")
LABEL_TABLE = "zero_shot_findings_disease_cls.csv"
PHENOTYPE_TABLE = "phenotypes.csv"
ID_COLUMNS = ("study_id", "study id", "studyid", "study", "accession", "accession_id", "id")
FINDINGS_COLUMNS = ("findings", "findings text", "findings_text", "report", "text")
IMPRESSION_COLUMNS = ("impression", "impressions")
SPLIT_COLUMNS = ("split", "dataset split", "set", "partition")
MAX_LISTED = 25
# Merlin reports can be long; Python's csv refuses fields over 131,072 characters by default. Tables are
# read with this limit instead (a field this long is no report: the file is malformed).
MAX_FIELD_CHARS = 1 << 26

# Classes of manifest problems (`Problem.kind`); `vljax.validate` counts problems by them.
MISSING_FILE = "missing_file"  # the study's image file is not there
EMPTY_REPORT = "empty_report"
BAD_LABEL = "bad_label"  # a label value outside 1 / 0 / -1, an unknown or missing finding
DUPLICATE_ID = "duplicate_id"
UNKNOWN_SPLIT = "unknown_split"
MISSING_ROW = "missing_row"  # a study in one table but not in another
BAD_PHENOTYPE = "bad_phenotype"
BAD_ROW = "bad_row"  # a row or line without a study id, or not JSON
BAD_ENCODING = "bad_encoding"  # bytes that are not UTF-8
BAD_TABLE = "bad_table"  # the dataset cannot be read at all: a table, column or folder missing or empty


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem in a dataset: its class (`kind`), the study ("" when a whole file or line is at
    fault), the file it is in, and a message naming them; never report text."""

    kind: str
    study_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return self.message


class ManifestError(ValueError):
    """The dataset description is inconsistent; `problems` lists every (study id, problem) found,
    as messages; `details` holds the same as `Problem`s (class, study id, file)."""

    def __init__(self, source: str, problems: Sequence[str | Problem]):
        self.source = source
        self.details = [p if isinstance(p, Problem) else Problem(BAD_TABLE, "", source, p) for p in problems]
        self.problems = [str(p) for p in self.details]
        shown = "\n  ".join(self.problems[:MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the dataset manifest:\n  {shown}{more}\n"
                         "Fix the listed files/rows (or remove the studies) and load again.")


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """One CT study: its volume, report text, split and labels (30 findings in `FINDINGS` order)."""

    study_id: str
    image: str
    findings: str
    split: str
    labels: tuple[int, ...]
    impression: str = ""
    phenotypes: tuple[int, ...] | None = None

    def label(self, finding: str) -> int:
        return self.labels[FINDINGS.index(finding)]


@dataclasses.dataclass(frozen=True)
class Manifest:
    records: tuple[StudyRecord, ...]
    root: str
    phenotype_codes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> tuple[StudyRecord, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return tuple(r for r in self.records if r.split == name)

    def by_id(self) -> dict[str, StudyRecord]:
        return {r.study_id: r for r in self.records}


# ------------------------------------------------------------------------------------------------
# Table readers
# ------------------------------------------------------------------------------------------------
def _read_table(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV or XLSX table, all cells as stripped strings."""
    if path.suffix.lower() == ".xlsx":
        try:
            import openpyxl
        except ImportError as e:  # pragma: no cover - openpyxl is a dependency
            raise ManifestError(str(path), ["reading .xlsx needs openpyxl: pip install openpyxl"]) from e
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        rows = [["" if c is None else str(c).strip() for c in row] for row in wb.worksheets[0].iter_rows(values_only=True)]
        wb.close()
    else:
        rows = _read_csv(path)
    rows = [r for r in rows if any(r)]
    if not rows:
        raise ManifestError(str(path), ["the table is empty (no header row)"])
    return rows[0], rows[1:]


@contextlib.contextmanager
def _field_size_limit(limit: int):
    """csv's field limit is process-wide: raised for one read, then put back."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_csv(path: pathlib.Path) -> list[list[str]]:
    """Rows of a UTF-8 CSV. Bytes that are not UTF-8 raise one ManifestError naming the file, the line
    each bad record starts on and, when it can be read, its study id (never the text)."""
    raw = path.read_bytes()
    try:
        text, bad = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:  # read on to find every bad record; surrogates mark the bad bytes
        text, bad = raw.decode("utf-8-sig", errors="surrogateescape"), True
    rows, starts = [], []
    with _field_size_limit(MAX_FIELD_CHARS):
        reader = csv.reader(io.StringIO(text, newline=""))
        line = 0
        try:
            for row in reader:
                rows.append([c.strip() for c in row])
                starts.append(line + 1)
                line = reader.line_num
        except csv.Error as e:  # csv's messages name the limit or character class, not the text
            raise ManifestError(str(path), [f"{path.name} line {line + 1}: not a readable CSV record ({e})"]) from None
    if bad:
        lowered = [h.lower() for h in next((r for r in rows if any(r)), [])]
        i_id = next((lowered.index(n) for n in ID_COLUMNS if n in lowered), None)
        problems = []
        for row, start in zip(rows, starts):
            if all(_is_utf8(c) for c in row):
                continue
            sid = row[i_id] if i_id is not None and i_id < len(row) and _is_utf8(row[i_id]) else ""
            where = f"{path.name} line {start}"
            problems.append(Problem(BAD_ENCODING, sid, str(path),
                                    (f"{sid}: {where} is" if sid else f"{where}:") + " not valid UTF-8 text; "
                                    "re-save the file as UTF-8 (e.g. from Latin-1 / Windows-1252)"))
        raise ManifestError(str(path), problems)
    return rows


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte
        return False
    return True


def _find_column(header: list[str], names: Iterable[str], path: pathlib.Path, what: str, required: bool = True):
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    if required:
        raise ManifestError(str(path), [f"no {what} column; expected one of {list(names)}, found {header}"])
    return None


def _parse_int(value: str) -> int | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f == int(f) else None


def _find_image(images_dir: pathlib.Path, study_id: str) -> pathlib.Path | None:
    for ext in (".nii.gz", ".nii"):
        p = images_dir / f"{study_id}{ext}"
        if p.exists():
            return p
    return None


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_manifest(path: str | os.PathLike, *, check_images: bool = True) -> Manifest:
    """Read a dataset directory (Merlin layout) or a `.jsonl` manifest, validated: any problem
    raises one ManifestError listing them all."""
    manifest, problems = read_manifest(path, check_images=check_images)
    if problems:
        raise ManifestError(str(path), problems)
    return manifest


def read_manifest(path: str | os.PathLike, *, check_images: bool = True) -> tuple[Manifest, list[Problem]]:
    """The good records and every problem with a study or row, for reporting them all at once.

    Raises ManifestError only when the dataset cannot be read at all (a table, column or folder
    missing, text that is not UTF-8), FileNotFoundError when `path` does not exist.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist; pass the folder that holds "
                                f"{LABEL_TABLE} and the reports table, or a .jsonl manifest")
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise ManifestError(str(path), ["a manifest file must be .jsonl; for the Merlin layout pass its folder"])
        return _read_jsonl(path, check_images=check_images)
    return _read_merlin_dir(path, check_images=check_images)


def load_merlin_dir(root: pathlib.Path, *, check_images: bool = True) -> Manifest:
    return load_manifest(pathlib.Path(root), check_images=check_images)


def _read_merlin_dir(root: pathlib.Path, *, check_images: bool = True) -> tuple[Manifest, list[Problem]]:
    root = pathlib.Path(root)
    reports_path = next((root / n for n in REPORT_TABLES if (root / n).exists()), None)
    if reports_path is None:
        raise ManifestError(str(root), [f"no reports table; expected one of {list(REPORT_TABLES)}"])
    images_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if images_dir is None:
        raise ManifestError(str(root), [f"no image folder; expected one of {list(IMAGE_DIRS)}"])
    labels_path = root / LABEL_TABLE
    if not labels_path.exists():
        raise ManifestError(str(root), [f"no label table {LABEL_TABLE}"])

    problems: list[Problem] = []
    header, rows = _read_table(reports_path)
    i_id = _find_column(header, ID_COLUMNS, reports_path, "study id")
    i_find = _find_column(header, FINDINGS_COLUMNS, reports_path, "findings")
    i_imp = _find_column(header, IMPRESSION_COLUMNS, reports_path, "impression", required=False)
    i_split = _find_column(header, SPLIT_COLUMNS, reports_path, "split")
    reports: dict[str, dict] = {}
    for n, row in enumerate(rows, start=2):
        row = row + [""] * (len(header) - len(row))
        sid = row[i_id]
        if not sid:
            problems.append(Problem(BAD_ROW, "", str(reports_path), f"{reports_path.name} line {n}: empty study id"))
            continue
        if sid in reports:
            problems.append(Problem(DUPLICATE_ID, sid, str(reports_path),
                                    f"{sid}: duplicate study id in {reports_path.name} (line {n})"))
            continue
        reports[sid] = dict(findings=row[i_find], impression=row[i_imp] if i_imp is not None else "", split=row[i_split])

    labels = _read_labels(labels_path, problems)
    phenotype_codes: tuple[str, ...] = ()
    phenotypes: dict[str, tuple[int, ...]] = {}
    if (root / PHENOTYPE_TABLE).exists():
        phenotype_codes, phenotypes = _read_phenotypes(root / PHENOTYPE_TABLE, problems)

    for sid in sorted(labels.keys() - reports.keys()):
        problems.append(Problem(MISSING_ROW, sid, str(reports_path),
                                f"{sid}: has labels in {LABEL_TABLE} but no row in {reports_path.name}"))
    records = []
    for sid, rep in reports.items():
        image = _find_image(images_dir, sid) if check_images else images_dir / f"{sid}.nii.gz"
        if image is None:
            problems.append(Problem(MISSING_FILE, sid, str(images_dir / f"{sid}.nii.gz"),
                                    f"{sid}: missing image file {images_dir.name}/{sid}.nii.gz (or .nii)"))
            continue
        if sid not in labels:
            problems.append(Problem(MISSING_ROW, sid, str(labels_path), f"{sid}: no row in {LABEL_TABLE}"))
            continue
        if labels[sid] is None:  # invalid label values, already reported
            continue
        if phenotype_codes and sid not in phenotypes:
            problems.append(Problem(MISSING_ROW, sid, str(root / PHENOTYPE_TABLE),
                                    f"{sid}: no row in {PHENOTYPE_TABLE}"))
            continue
        rec = _make_record(sid, str(image), rep["findings"], rep["impression"], rep["split"], labels[sid],
                           phenotypes.get(sid), problems, reports_path)
        if rec is not None:
            records.append(rec)
    problems.sort(key=str)
    return Manifest(records=tuple(records), root=str(root), phenotype_codes=phenotype_codes), problems


def _read_labels(path: pathlib.Path, problems: list[Problem]) -> dict[str, tuple[int, ...] | None]:
    header, rows = _read_table(path)
    i_id = _find_column(header, ID_COLUMNS, path, "study id")
    lowered = [h.strip().lower() for h in header]
    cols = {}
    for j, h in enumerate(lowered):
        if j == i_id or h == "" or h.startswith("unnamed"):
            continue
        if h not in FINDINGS:
            raise ManifestError(str(path), [f"unknown label column {header[j]!r}: expected the 30 findings "
                                            f"{list(FINDINGS)} (rename or drop the column)"])
        cols[h] = j
    missing = [f for f in FINDINGS if f not in cols]
    if missing:
        raise ManifestError(str(path), [f"missing label column(s) {missing}"])
    out: dict[str, tuple[int, ...] | None] = {}
    for n, row in enumerate(rows, start=2):
        row = row + [""] * (len(header) - len(row))
        sid = row[i_id]
        if sid in out:
            problems.append(Problem(DUPLICATE_ID, sid, str(path),
                                    f"{sid}: duplicate study id in {path.name} (line {n})"))
            continue
        values = []
        for f in FINDINGS:
            v = _parse_int(row[cols[f]])
            if v not in (1, 0, -1):
                problems.append(Problem(BAD_LABEL, sid, str(path),
                                        f"{sid}: label {f!r} is {row[cols[f]]!r} in {path.name} line {n}; "
                                        "labels must be 1 (positive), 0 (negative) or -1 (not mentioned)"))
                v = None
            values.append(v)
        out[sid] = None if None in values else tuple(values)  # None: invalid, reported above
    return out


def _read_phenotypes(path: pathlib.Path, problems: list[Problem]) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    header, rows = _read_table(path)
    i_id = _find_column(header, ID_COLUMNS, path, "study id")
    code_cols = [j for j in range(len(header)) if j != i_id and header[j]]
    out = {}
    for n, row in enumerate(rows, start=2):
        row = row + [""] * (len(header) - len(row))
        vals = [_parse_int(row[j]) for j in code_cols]
        bad = [header[j] for j, v in zip(code_cols, vals) if v not in (0, 1)]
        if bad:
            problems.append(Problem(BAD_PHENOTYPE, row[i_id], str(path),
                                    f"{row[i_id]}: phenotype value(s) not 0/1 for {bad[:5]} in {path.name} line {n}"))
            continue
        out[row[i_id]] = tuple(vals)
    return tuple(header[j] for j in code_cols), out


def _make_record(sid, image, findings, impression, split, labels, phenotypes, problems, source) -> StudyRecord | None:
    split_norm = SPLIT_ALIASES.get(str(split).strip().lower())
    ok = True
    if split_norm is None:
        problems.append(Problem(UNKNOWN_SPLIT, sid, str(source),
                                f"{sid}: unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)}"))
        ok = False
    if not isinstance(findings, str) or not findings.strip():
        problems.append(Problem(EMPTY_REPORT, sid, str(source), f"{sid}: empty findings text"))
        ok = False
    if not ok:
        return None
    return StudyRecord(study_id=sid, image=image, findings=findings, split=split_norm, labels=tuple(labels),
                       impression=impression or "", phenotypes=phenotypes)


def load_jsonl(path: pathlib.Path, *, check_images: bool = True) -> Manifest:
    return load_manifest(pathlib.Path(path), check_images=check_images)


def _read_jsonl(path: pathlib.Path, *, check_images: bool = True) -> tuple[Manifest, list[Problem]]:
    path = pathlib.Path(path)
    base = path.parent
    src = str(path)
    problems: list[Problem] = []
    records: list[StudyRecord] = []
    seen: set[str] = set()
    codes: tuple[str, ...] | None = None

    def problem(kind: str, sid: str, message: str, where: str = src) -> None:
        problems.append(Problem(kind, sid, where, message))

    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one problem, not a traceback
        for n, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                sid = _jsonl_study_id(raw_line.decode("utf-8", errors="surrogateescape"))
                problem(BAD_ENCODING, sid, f"{sid}: line {n} is not valid UTF-8 text" if sid else
                        f"line {n}: not valid UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem(BAD_ROW, "", f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problem(BAD_ROW, "", f"line {n}: not a JSON object")
                continue
            sid = str(obj.get("study_id", "")).strip()
            if not sid:
                problem(BAD_ROW, "", f"line {n}: missing study_id")
                continue
            if sid in seen:
                problem(DUPLICATE_ID, sid, f"{sid}: duplicate study id (line {n})")
                continue
            seen.add(sid)
            image = pathlib.Path(str(obj.get("image", "")))
            image = image if image.is_absolute() else base / image
            if not obj.get("image") or (check_images and not image.exists()):
                problem(MISSING_FILE, sid, f"{sid}: missing image file {obj.get('image', '')!s}", str(image))
                continue
            raw = obj.get("labels")
            if not isinstance(raw, Mapping):
                problem(BAD_LABEL, sid, f"{sid}: 'labels' must be an object mapping the 30 findings to 1/0/-1")
                continue
            unknown = sorted(set(raw) - set(FINDINGS))
            if unknown:
                problem(BAD_LABEL, sid, f"{sid}: unknown label(s) {unknown}; expected the 30 findings")
                continue
            missing = [x for x in FINDINGS if x not in raw]
            bad = [x for x in FINDINGS if x in raw and raw[x] not in (1, 0, -1)]
            if missing or bad:
                problem(BAD_LABEL, sid, f"{sid}: " + (f"missing label(s) {missing}" if missing else "")
                        + (f"labels not in {{1,0,-1}}: {bad}" if bad else ""))
                continue
            ph = obj.get("phenotypes")
            phen = None
            if ph is not None:
                if codes is None and isinstance(ph, Mapping):
                    codes = tuple(ph)
                if not isinstance(ph, Mapping) or tuple(ph) != codes or any(v not in (0, 1) for v in ph.values()):
                    problem(BAD_PHENOTYPE, sid,
                            f"{sid}: phenotypes must use the same codes on every line with 0/1 values")
                    continue
                phen = tuple(int(ph[c]) for c in codes)
            rec = _make_record(sid, str(image), obj.get("findings", ""), obj.get("impression", ""),
                               obj.get("split", ""), tuple(int(raw[x]) for x in FINDINGS), phen, problems, path)
            if rec is not None:
                records.append(rec)
    return Manifest(records=tuple(records), root=str(base), phenotype_codes=codes or ()), problems


def _jsonl_study_id(line: str) -> str:
    """The study id of a line with undecodable bytes, when the id itself is clean ("" otherwise)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return ""
    sid = str(obj.get("study_id", "")).strip() if isinstance(obj, dict) else ""
    return sid if _is_utf8(sid) else ""


def write_jsonl(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write `manifest` as JSONL; image paths are written relative to the file's folder when possible."""
    path = pathlib.Path(path)
    base = path.parent.resolve()
    with open(path, "w", encoding="utf-8") as f:
        for r in manifest.records:
            image = pathlib.Path(r.image).resolve()
            try:
                image_str = str(image.relative_to(base))
            except ValueError:
                image_str = str(image)
            obj = dict(study_id=r.study_id, image=image_str, findings=r.findings, impression=r.impression,
                       split=r.split, labels=dict(zip(FINDINGS, r.labels)))
            if r.phenotypes is not None:
                obj["phenotypes"] = dict(zip(manifest.phenotype_codes, r.phenotypes))
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
