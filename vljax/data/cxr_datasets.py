"""Readers of the three public chest X-ray layouts (`read_mimic`, `read_chexpert`, `read_nih`), called
by `cxr_manifest.read_cxr_manifest` once it has detected the layout. Each appends per-study problems to
the list it is given and returns the good studies, built and checked by `cxr_manifest`'s shared helpers.

  * MIMIC-CXR-JPG: a folder with `mimic-cxr-2.0.0-metadata.csv(.gz)`, `-split.csv(.gz)` and optionally
    `-chexpert.csv(.gz)`; images at `files/p10/p10000032/s50414267/<dicom_id>.jpg`. Reports come from
    the MIMIC-CXR release (`mimic-cxr-reports.zip`, which unpacks to `files/p10/p10000032/s50414267.txt`):
    `reports_dir=` (the unpacked folder, its `files/`, or the zip), else `mimic-cxr-reports/files` or
    `mimic-cxr-reports.zip` inside the folder or beside it, else `.txt` files inside the JPG tree.
    Study ids are `s<study_id>`, patients `p<subject_id>` (as the folders are named); splits come from
    the split file (validate → val). Report text is cut into sections by `report_sections`.
  * CheXpert (v1.0 or v1.0-small): a folder with `train.csv` / `valid.csv` (and `test.csv` if present);
    `Path` is relative to the folder's parent (a renamed folder works too). Rows are grouped into
    studies by patient and study folder (study id `patient00001_study1`); view from `Frontal/Lateral`
    and `AP/PA`; 1 / 0 / -1 kept, blank = missing. train.csv → train, valid.csv → val, test.csv → test.
  * ChestX-ray14 (NIH): a folder with `Data_Entry_2017*.csv`, `train_val_list.txt`, `test_list.txt`
    and images under `images/` or `images_*/images/`. Each image is a study (id = file stem); listed
    findings → 1, the other 13 findings and "no finding" → 0 ("No Finding": no finding 1, rest 0).

Splits by patient: `val_fraction` / `test_fraction` move CheXpert train.csv patients (and, with
`val_fraction` only, ChestX-ray14 train_val_list patients) to val / test by a seeded hash of the patient
id (`cxr_manifest.patient_split`): deterministic, independent of row order and of which other patients
are present, and never splitting a patient. The official splits are kept otherwise.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import pathlib
import re
import zipfile
from typing import Mapping, Sequence

from absl import logging

from vljax.data.cxr_manifest import (UNKNOWN_VIEW, CXRStudy, _bank_class, _decode, _Draft, _finish, _mimic_table,
                                     _nih_table, _read_bytes, bank_classes, patient_split)
from vljax.data.manifest import (BAD_LABEL, BAD_ROW, BAD_TABLE, DUPLICATE_ID, MISSING_ROW, UNKNOWN_SPLIT,
                                 ManifestError, Problem)

# MIMIC-CXR ViewPosition (DICOM) values: the four of VIEWS, other known positions as UNKNOWN (oblique,
# decubitus, axial, swimmer's) or LATERAL (cross-table, right lateral). Anything else is a problem.
MIMIC_VIEWS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LL", "RL": "LATERAL",
               "XTABLE LATERAL": "LATERAL", "": "UNKNOWN", "AP AXIAL": "UNKNOWN", "PA AXIAL": "UNKNOWN",
               "AP LLD": "UNKNOWN", "AP RLD": "UNKNOWN", "PA LLD": "UNKNOWN", "PA RLD": "UNKNOWN",
               "LAO": "UNKNOWN", "RAO": "UNKNOWN", "LPO": "UNKNOWN", "RPO": "UNKNOWN", "SWIMMERS": "UNKNOWN"}
CHEXPERT_AP_PA = {"AP": "AP", "PA": "PA", "LL": "LL", "RL": "LATERAL"}
NIH_CLASSES = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "consolidation",
               "Edema": "edema", "Effusion": "pleural effusion", "Emphysema": "emphysema", "Fibrosis": "fibrosis",
               "Hernia": "hernia", "Infiltration": "infiltration", "Mass": "mass", "Nodule": "nodule",
               "Pleural_Thickening": "pleural thickening", "Pneumonia": "pneumonia",
               "Pneumothorax": "pneumothorax"}
NIH_NO_FINDING = "No Finding"


# ------------------------------------------------------------------------------------------------
# Shared pieces: report sections, tables
# ------------------------------------------------------------------------------------------------
# A header: upper-case words followed by ':' at the start of a line, or FINDINGS: / IMPRESSION: anywhere.
_HEADER = re.compile(r"^[ \t]*(?P<line>[A-Z][A-Z0-9 ,&/()'\-]*?)[ \t]*:(?!//)"
                     r"|\b(?P<inline>FINDINGS?|IMPRESSIONS?)[ \t]*:", re.MULTILINE)
_COMBINED = re.compile(r"^(FINDINGS?|IMPRESSIONS?)( AND |/| & )(FINDINGS?|IMPRESSIONS?)$")


def _section_of(header: str) -> str | None:
    name = " ".join(header.split())
    if name in ("FINDINGS", "FINDING") or _COMBINED.match(name):
        return "findings"
    if name in ("IMPRESSION", "IMPRESSIONS"):
        return "impression"
    return None


def report_sections(text: str) -> tuple[str | None, str | None]:
    """(findings, impression) of a free-text report; None where the section is absent or empty.

    A header is upper-case words followed by ':' at a line start ("FINDINGS:", "WET READ:"), or
    "FINDINGS:" / "IMPRESSION:" anywhere; a section runs to the next header. Several sections of one
    kind are joined; combined headers ("FINDINGS AND IMPRESSION:") count as findings. Whitespace is
    collapsed; the text is otherwise unchanged.
    """
    headers = list(_HEADER.finditer(text))
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    for i, m in enumerate(headers):
        section = _section_of(m.group("line") or m.group("inline"))
        if section is not None:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            body = " ".join(text[m.end():end].split())
            if body:
                parts[section].append(body)
    return (" ".join(parts["findings"]) or None, " ".join(parts["impression"]) or None)


def _read_table(path: pathlib.Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) rows of a UTF-8 CSV (`.gz` allowed), cells stripped and padded
    to the header's length; blank rows skipped."""
    text = _decode(_read_bytes(path), path)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, line = [], 0
    try:
        for row in reader:
            row = [c.strip() for c in row]
            if len(row) > 1 or (row and row[0]):
                rows.append((line + 1, row))
            line = reader.line_num
    except csv.Error as e:
        raise ManifestError(str(path), [f"{path.name} line {line + 1}: not a readable CSV record ({e})"]) from None
    if not rows:
        raise ManifestError(str(path), [f"{path.name}: the table is empty (no header row)"])
    header, width = rows[0][1], len(rows[0][1])
    return header, [(n, r if len(r) >= width else r + [""] * (width - len(r))) for n, r in rows[1:]]


def _columns(header: list[str], path: pathlib.Path, names: Sequence[str],
             optional: Sequence[str] = ()) -> dict[str, int]:
    """Indices of the named columns (case-insensitive); a missing required column is an error."""
    lowered = [h.lower() for h in header]
    missing = [n for n in names if n.lower() not in lowered]
    if missing:
        raise ManifestError(str(path), [f"{path.name}: missing column(s) {missing}; found {header}. Is this the "
                                        "original file of the release?"])
    return {n: lowered.index(n.lower()) for n in (*names, *optional) if n.lower() in lowered}


def _label_columns(header: list[str], used: Sequence[int], path: pathlib.Path) -> dict[str, int]:
    """{bank class: column index} for every column not in `used`; an unknown class is an error."""
    out = {}
    for j, name in enumerate(header):
        if j in used or not name or name.lower().startswith("unnamed"):
            continue
        cls = _bank_class(name)
        if cls is None:
            raise ManifestError(str(path), [Problem(BAD_TABLE, "", str(path),
                                                    f"{path.name}: unknown label column {name!r}: not a class of the "
                                                    f"prompt bank {list(bank_classes())}; rename or drop the column")])
        out[cls] = j
    return out


_BAD = object()


def _label_value(cell: str):
    """1 / 0 / -1 for "1", "1.0", "-1.0", ...; None for a blank (missing); _BAD otherwise."""
    if cell == "" or cell.lower() == "nan":
        return None
    try:
        v = float(cell)
    except ValueError:
        return _BAD
    return int(v) if v in (1.0, 0.0, -1.0) else _BAD


def _row_labels(row: list[str], columns: Mapping[str, int], sid: str, where: str, path: pathlib.Path,
                problems: list[Problem]) -> dict[str, int] | None:
    """A row's labels (blanks left out); None after recording a problem for a bad value."""
    labels, bad = {}, []
    for cls, j in columns.items():
        v = _label_value(row[j])
        if v is _BAD:
            bad.append(f"{cls!r} is {row[j]!r}")
        elif v is not None:
            labels[cls] = v
    if bad:
        problems.append(Problem(BAD_LABEL, sid, str(path), f"{sid}: bad label value(s) in {where}: {', '.join(bad)}; "
                                "labels must be 1 (positive), 0 (negative), -1 (uncertain) or blank (missing)"))
        return None
    return labels


# ------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ------------------------------------------------------------------------------------------------
class _Reports:
    """MIMIC-CXR report files `p10/p10000032/s50414267.txt` under a `files` folder or in the zip."""

    def __init__(self, root: pathlib.Path, reports_dir: str | os.PathLike | None):
        self.zip = None
        if reports_dir is not None:
            given = pathlib.Path(reports_dir)
            if not given.exists():
                raise FileNotFoundError(f"reports_dir {given} does not exist; pass the unpacked mimic-cxr-reports "
                                        "folder (or its files/ folder) or mimic-cxr-reports.zip")
            if given.is_file() and not zipfile.is_zipfile(given):
                raise ValueError(f"reports_dir {given} is a file but not a zip archive; pass mimic-cxr-reports.zip or "
                                 "the folder it unpacks to")
            candidates = [given] if given.is_file() else [given / "files", given]
        else:
            candidates = [d / "mimic-cxr-reports" / "files" for d in (root, root.parent)]
            candidates += [d / "mimic-cxr-reports.zip" for d in (root, root.parent)] + [root / "files"]
        where = next((c for c in candidates if c.is_dir() or (c.is_file() and c.suffix == ".zip")), candidates[-1])
        self.where = where
        if where.is_file():
            try:
                self.zip = zipfile.ZipFile(where)
            except zipfile.BadZipFile as e:
                raise ManifestError(str(where), [f"{where.name}: not a readable zip archive ({e}); download it "
                                                 "again or unpack it"]) from None
            names = [n for n in self.zip.namelist() if n.endswith(".txt")]
            # members are "files/p10/p10000032/s50414267.txt", possibly under one more folder
            self.members = {"/".join(n.split("/")[-3:]): n for n in names}

    def read(self, subject: str, study: str) -> bytes | None:
        rel = f"p{subject[:2]}/p{subject}/s{study}.txt"
        if self.zip is not None:
            name = self.members.get(rel)
            return None if name is None else self.zip.read(name)
        try:
            with open(os.path.join(self.where, rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def read_mimic(root: pathlib.Path, reports_dir, check_images: bool, problems: list[Problem]) -> tuple[CXRStudy, ...]:
    root = root.absolute()
    meta_path, split_path = _mimic_table(root, "metadata"), _mimic_table(root, "split")
    if split_path is None:
        raise ManifestError(str(root), [f"{root}: no split table mimic-cxr-2.0.0-split.csv[.gz]; it ships with "
                                        "MIMIC-CXR-JPG: download it into this folder"])
    header, rows = _read_table(meta_path)
    c = _columns(header, meta_path, ("dicom_id", "subject_id", "study_id"), ("ViewPosition",))
    files = os.path.join(root, "files")
    drafts: dict[str, _Draft] = {}
    subjects: dict[str, str] = {}
    dicoms: dict[str, str] = {}
    for n, row in rows:
        dicom, subject, study = row[c["dicom_id"]], row[c["subject_id"]], row[c["study_id"]]
        where = f"{meta_path.name} line {n}"
        if not (dicom and subject.isdigit() and study.isdigit()):
            problems.append(Problem(BAD_ROW, f"s{study}" if study else "", str(meta_path),
                                    f"{where}: needs a dicom_id and numeric subject_id and study_id"))
            continue
        sid = f"s{study}"
        d = drafts.setdefault(sid, _Draft(sid, meta_path.name, "", source="mimic-cxr", patient_id=f"p{subject}"))
        subjects.setdefault(sid, subject)
        if dicom in dicoms:
            problems.append(Problem(DUPLICATE_ID, sid, str(meta_path), f"{sid}: image {dicom} listed twice ({where}); "
                                    "remove the repeated row"))
            d.bad = True
            continue
        dicoms[dicom] = sid
        if subjects[sid] != subject:
            problems.append(Problem(BAD_ROW, sid, str(meta_path), f"{sid}: its images have different subject_ids "
                                    f"({subjects[sid]}, {subject}; {where})"))
            d.bad = True
        raw_view = row[c["ViewPosition"]].upper() if "ViewPosition" in c else ""
        view = MIMIC_VIEWS.get(" ".join(raw_view.split()))
        if view is None:
            problems.append(Problem(UNKNOWN_VIEW, sid, str(meta_path), f"{sid}: unknown ViewPosition {raw_view!r} of "
                                    f"image {dicom} ({where}); known values: {sorted(k for k in MIMIC_VIEWS if k)}"))
            d.bad, view = True, "UNKNOWN"
        d.images.append((os.path.join(files, f"p{subject[:2]}", f"p{subject}", sid, f"{dicom}.jpg"), view))

    _mimic_splits(split_path, drafts, dicoms, problems)
    labels_path = _mimic_table(root, "chexpert")
    labels = _mimic_labels(labels_path, problems) if labels_path else {}
    for sid in sorted(labels.keys() - drafts.keys()):
        problems.append(Problem(MISSING_ROW, sid, str(labels_path), f"{sid}: has a row in {labels_path.name} but no "
                                f"image in {meta_path.name}; drop the row or use the release's metadata table"))
    reports = _Reports(root, reports_dir)
    try:
        found = _attach_reports(drafts, subjects, labels, labels_path, reports, problems)
    finally:
        reports.close()
    if drafts and not found:
        logging.warning("MIMIC-CXR: no report found in %s for any of %d studies; they are label-only. Pass "
                        "reports_dir= (the unpacked mimic-cxr-reports folder or mimic-cxr-reports.zip).",
                        reports.where, len(drafts))
    return _finish(list(drafts.values()), root, check_images, problems)


def _attach_reports(drafts: dict[str, _Draft], subjects: dict[str, str], labels: dict, labels_path: pathlib.Path | None,
                    reports: _Reports, problems: list[Problem]) -> int:
    """Labels and report sections of each study; the number of studies whose report was found."""
    found = 0
    for sid, d in drafts.items():
        if sid in labels:
            d.labels = labels[sid]
            d.bad |= d.labels is None
        raw = reports.read(subjects[sid], sid[1:])
        if raw is None:
            d.no_text_hint = f" (no report s{sid[1:]}.txt in {reports.where}; pass reports_dir=)"
        else:
            found += 1
            report = pathlib.Path(reports.where) / f"p{subjects[sid][:2]}/p{subjects[sid]}/{sid}.txt"
            try:
                d.findings, d.impression = report_sections(_decode(raw, report, sid))
            except ManifestError as e:
                problems.extend(e.details)
                d.bad = True
        if labels_path and sid not in labels:
            d.no_text_hint += f" (no row in {labels_path.name})"
    return found


def _mimic_splits(path: pathlib.Path, drafts: dict[str, _Draft], dicoms: dict[str, str],
                  problems: list[Problem]) -> None:
    """Each study's split from its images' rows; a study missing there or split across splits is a problem."""
    header, rows = _read_table(path)
    c = _columns(header, path, ("dicom_id", "split"))
    splits: dict[str, set[str]] = collections.defaultdict(set)
    for n, row in rows:
        sid = dicoms.get(row[c["dicom_id"]])
        if sid is None:
            problems.append(Problem(MISSING_ROW, "", str(path), f"{path.name} line {n}: image {row[c['dicom_id']]} "
                                    "is not in the metadata table"))
            continue
        splits[sid].add(row[c["split"]])
    for sid, d in drafts.items():
        if len(splits[sid]) != 1:
            problems.append(Problem(MISSING_ROW if not splits[sid] else UNKNOWN_SPLIT, sid, str(path),
                                    f"{sid}: no row in {path.name}" if not splits[sid] else
                                    f"{sid}: its images are in different splits {sorted(splits[sid])} in {path.name}"))
            d.bad = True
        else:
            d.split, d.split_from = next(iter(splits[sid])), path.name


def _mimic_labels(path: pathlib.Path, problems: list[Problem]) -> dict[str, dict[str, int] | None]:
    header, rows = _read_table(path)
    c = _columns(header, path, ("subject_id", "study_id"))
    columns = _label_columns(header, list(c.values()), path)
    out: dict[str, dict[str, int] | None] = {}
    for n, row in rows:
        sid = f"s{row[c['study_id']]}"
        if sid in out:
            problems.append(Problem(DUPLICATE_ID, sid, str(path), f"{sid}: two rows in {path.name} (line {n}); "
                                    "remove one"))
            out[sid] = None
            continue
        out[sid] = _row_labels(row, columns, sid, f"{path.name} line {n}", path, problems)
    return out


# ------------------------------------------------------------------------------------------------
# CheXpert
# ------------------------------------------------------------------------------------------------
CHEXPERT_TABLES = (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test"))


def read_chexpert(root: pathlib.Path, val_fraction: float, test_fraction: float, seed: int, check_images: bool,
                   problems: list[Problem]) -> tuple[CXRStudy, ...]:
    root = root.absolute()
    drafts: dict[str, _Draft] = {}
    for name, split in CHEXPERT_TABLES:
        path = root / name
        if not path.is_file():
            continue
        header, rows = _read_table(path)
        c = _columns(header, path, ("Path", "Frontal/Lateral", "AP/PA"), ("Sex", "Age"))
        columns = _label_columns(header, list(c.values()), path)
        in_table: set[str] = set()
        for n, row in rows:
            where = f"{name} line {n}"
            parts = pathlib.PurePosixPath(row[c["Path"]].replace("\\", "/")).parts
            if len(parts) < 3:
                problems.append(Problem(BAD_ROW, "", str(path), f"{where}: Path {row[c['Path']]!r} is not "
                                        ".../<patient>/<study>/<view>.jpg"))
                continue
            patient, sid = parts[-3], f"{parts[-3]}_{parts[-2]}"
            if sid in drafts and sid not in in_table:
                problems.append(Problem(DUPLICATE_ID, sid, str(path), f"{sid}: study appears in {drafts[sid].where} "
                                        f"and {name}; keep it in one table"))
                drafts[sid].bad = True
                continue
            if sid not in drafts:
                study_split = split
                if split == "train" and (val_fraction or test_fraction):
                    study_split = patient_split(patient, seed, val_fraction, test_fraction)
                drafts[sid] = _Draft(sid, name, study_split, source="chexpert", patient_id=patient)
                in_table.add(sid)
            d = drafts[sid]
            image = _chexpert_image(root, parts)
            if image in (p for p, _ in d.images):
                problems.append(Problem(DUPLICATE_ID, sid, str(path), f"{sid}: image {parts[-1]} listed twice "
                                        f"({where}); remove the repeated row"))
                d.bad = True
                continue
            view = _chexpert_view(row[c["Frontal/Lateral"]], row[c["AP/PA"]])
            if view is None:
                problems.append(Problem(UNKNOWN_VIEW, sid, str(path), f"{sid}: unknown view Frontal/Lateral="
                                        f"{row[c['Frontal/Lateral']]!r}, AP/PA={row[c['AP/PA']]!r} ({where}); "
                                        f"expected Frontal or Lateral and AP/PA in {sorted(CHEXPERT_AP_PA)} or blank"))
                d.bad, view = True, "UNKNOWN"
            d.images.append((image, view))
            labels = _row_labels(row, columns, sid, where, path, problems)
            if labels is None:
                d.bad = True
            elif d.labels is None:
                d.labels = labels
            elif labels != d.labels:
                differ = sorted(k for k in labels.keys() | d.labels.keys() if labels.get(k) != d.labels.get(k))
                problems.append(Problem(BAD_LABEL, sid, str(path), f"{sid}: its views disagree on label(s) {differ} "
                                        f"({where}); give every row of a study the same labels"))
                d.bad = True
    return _finish(list(drafts.values()), root, check_images, problems)


def _chexpert_image(root: pathlib.Path, parts: tuple[str, ...]) -> str:
    """`CheXpert-v1.0-small/train/...` is relative to the folder's parent; a renamed folder or a path
    without the dataset folder (`train/...`) resolves inside the folder."""
    if parts[0] == root.name:
        return str(root.parent.joinpath(*parts))
    if parts[0].lower().startswith("chexpert"):
        return str(root.joinpath(*parts[1:]))
    return str(root.joinpath(*parts))


def _chexpert_view(frontal_lateral: str, ap_pa: str) -> str | None:
    kind, position = frontal_lateral.strip().lower(), ap_pa.strip().upper()
    if kind not in ("frontal", "lateral") or (position and position not in CHEXPERT_AP_PA):
        return None
    if position:
        return CHEXPERT_AP_PA[position]
    return "LATERAL" if kind == "lateral" else "UNKNOWN"


# ------------------------------------------------------------------------------------------------
# ChestX-ray14 (NIH)
# ------------------------------------------------------------------------------------------------
def read_nih(root: pathlib.Path, val_fraction: float, seed: int, check_images: bool,
              problems: list[Problem]) -> tuple[CXRStudy, ...]:
    root = root.absolute()
    table = _nih_table(root)
    lists = {}
    for name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        if not (root / name).is_file():
            raise ManifestError(str(root), [f"{root}: no {name}; it ships with ChestX-ray14 (NIH): put it beside "
                                            f"{table.name}"])
        for line in _decode(_read_bytes(root / name), root / name).split():
            lists.setdefault(line, set()).add(split)
    # images/<name>.png, or the Kaggle copy's images_001/images/<name>.png ... images_012/images/
    index = {}
    for folder in sorted(root.glob("images_*/images")):
        index.update({e.name: e.path for e in os.scandir(folder)})
    header, rows = _read_table(table)
    c = _columns(header, table, ("Image Index", "Finding Labels", "Patient ID"), ("View Position",))
    drafts, seen = [], set()
    for n, row in rows:
        name, where = row[c["Image Index"]], f"{table.name} line {n}"
        sid = pathlib.PurePath(name).stem
        if not sid:
            problems.append(Problem(BAD_ROW, "", str(table), f"{where}: empty Image Index"))
            continue
        if sid in seen:
            problems.append(Problem(DUPLICATE_ID, sid, str(table), f"{sid}: image listed twice ({where}); remove "
                                    "the repeated row"))
            continue
        seen.add(sid)
        patient = row[c["Patient ID"]] or None
        in_lists = lists.get(name, set())
        split = next(iter(in_lists)) if len(in_lists) == 1 else "train"
        if split == "train" and val_fraction:
            split = patient_split(patient or sid, seed, val_fraction)
        d = _Draft(sid, where, split, source="chestx-ray14", patient_id=patient)
        if len(in_lists) != 1:
            problems.append(Problem(UNKNOWN_SPLIT, sid, str(root), f"{sid}: {name} is in "
                                    + ("both train_val_list.txt and test_list.txt" if in_lists else
                                       "neither train_val_list.txt nor test_list.txt") + "; list it in exactly one"))
            d.bad = True
        raw_view = row[c["View Position"]].strip().upper() if "View Position" in c else ""
        view = {"PA": "PA", "AP": "AP", "": "UNKNOWN"}.get(raw_view)
        if view is None:
            problems.append(Problem(UNKNOWN_VIEW, sid, str(table), f"{sid}: unknown View Position {raw_view!r} "
                                    f"({where}); expected PA or AP"))
            d.bad, view = True, "UNKNOWN"
        d.images.append((index.get(name, str(root / "images" / name)), view))
        d.labels = _nih_labels(row[c["Finding Labels"]], sid, where, table, problems)
        d.bad |= d.labels is None
        drafts.append(d)
    return _finish(drafts, root, check_images, problems)


def _nih_labels(cell: str, sid: str, where: str, table: pathlib.Path, problems: list[Problem]) -> dict[str, int] | None:
    names = [x.strip() for x in cell.split("|") if x.strip()]
    unknown = [x for x in names if x not in NIH_CLASSES and x != NIH_NO_FINDING]
    if unknown or not names or (NIH_NO_FINDING in names and len(names) > 1):
        why = (f"unknown finding(s) {unknown}; expected {sorted(NIH_CLASSES)} or {NIH_NO_FINDING!r}" if unknown else
               f"{NIH_NO_FINDING!r} together with findings" if names else "no Finding Labels")
        problems.append(Problem(BAD_LABEL, sid, str(table), f"{sid}: {why} ({where}); fix the Finding Labels cell"))
        return None
    labels = {cls: int(name in names) for name, cls in NIH_CLASSES.items()}
    labels["no finding"] = int(names == [NIH_NO_FINDING])
    return labels
