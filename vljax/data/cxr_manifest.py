"""Chest X-ray studies (CXR-CLIP, DESIGN.md §2): one study = one or more views, report sections
(findings, impression) when there is a report, and class labels (1 / 0 / -1 uncertain) when the study
comes from an image-label dataset or has extracted labels.

`load_cxr_manifest(path)` reads one dataset and detects its layout:

  * vljax CXR JSONL: a `.jsonl` file, or a folder holding `manifest.jsonl` (format: notes/cxr_spec.md);
    image paths relative to the file's folder or absolute.
  * MIMIC-CXR-JPG: a folder with `mimic-cxr-2.0.0-metadata.csv(.gz)`, `-split.csv(.gz)` and optionally
    `-chexpert.csv(.gz)`; images at `files/p10/p10000032/s50414267/<dicom_id>.jpg`. Reports come from
    the MIMIC-CXR release (`mimic-cxr-reports.zip`, which unpacks to `files/p10/p10000032/s50414267.txt`):
    `reports_dir=` (the unpacked folder, its `files/`, or the zip), else `mimic-cxr-reports/files` or
    `mimic-cxr-reports.zip` inside the folder or beside it, else `.txt` files inside the JPG tree.
    Study ids are `s<study_id>`, patients `p<subject_id>` (as the folders are named); splits come from
    the split file (validate → val).
  * CheXpert (v1.0 or v1.0-small): a folder with `train.csv` / `valid.csv` (and `test.csv` if present);
    `Path` is relative to the folder's parent (a renamed folder works too). Rows are grouped into
    studies by patient and study folder (study id `patient00001_study1`); view from `Frontal/Lateral`
    and `AP/PA`; 1 / 0 / -1 kept, blank = missing. train.csv → train, valid.csv → val, test.csv → test.
  * ChestX-ray14 (NIH): a folder with `Data_Entry_2017*.csv`, `train_val_list.txt`, `test_list.txt`
    and images under `images/` or `images_*/images/`. Each image is a study (id = file stem); listed
    findings → 1, the other 13 findings and "no finding" → 0 ("No Finding": no finding 1, rest 0).

Splits by patient: `val_fraction` / `test_fraction` move CheXpert train.csv patients (and, with
`val_fraction` only, ChestX-ray14 train_val_list patients) to val / test by a seeded hash of the patient
id (`patient_split`): deterministic, independent of row order and of which other patients are present,
and never splitting a patient. The official splits are kept otherwise.

Class names are the prompt bank's (`cxr_prompts.load_bank()`); a label column or class outside it is
an error naming it. Validation collects every per-study problem (missing image file, unknown view, bad
label value, unknown split, duplicate study id, empty study, ...) and raises one `ManifestError` listing
them; `read_cxr_manifest` returns the good studies and the problems instead. Messages name study ids,
files, columns and label values, never report text.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import zipfile
from typing import Mapping, Sequence

from absl import logging

from vljax.data import manifest as manifest_lib
from vljax.data.cxr_prompts import load_bank
from vljax.data.manifest import (BAD_ENCODING, BAD_LABEL, BAD_ROW, BAD_TABLE, DUPLICATE_ID, MISSING_FILE,
                                 MISSING_ROW, UNKNOWN_SPLIT, ManifestError, Problem)

VIEWS = ("PA", "AP", "LATERAL", "LL", "UNKNOWN")   # LL: left lateral (MIMIC-CXR's ViewPosition)
CXR_SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {**manifest_lib.SPLIT_ALIASES, "validate": "val"}
SOURCES = ("phantom", "mimic-cxr", "chexpert", "chestx-ray14", "jsonl")

# Problem kinds beyond those of `manifest` (which this module reuses).
UNKNOWN_VIEW = "unknown_view"   # a view / ViewPosition value this module cannot map to VIEWS
EMPTY_STUDY = "empty_study"     # no images, or neither a report section nor a label

JSONL_NAME = "manifest.jsonl"
JSONL_KEYS = ("study_id", "split", "images", "findings", "impression", "labels", "source", "patient_id")
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


@dataclasses.dataclass(frozen=True)
class CXRImage:
    path: str   # absolute path of a PNG or JPEG file
    view: str   # one of VIEWS


@dataclasses.dataclass(frozen=True)
class CXRStudy:
    """One chest X-ray study. `labels` are (class, 1 | 0 | -1) pairs with the prompt bank's lower-case
    class names; None when the study is unlabelled. A study has a report section, labels, or both."""

    study_id: str
    split: str
    images: tuple[CXRImage, ...]
    findings: str | None = None
    impression: str | None = None
    labels: tuple[tuple[str, int], ...] | None = None
    source: str = ""
    patient_id: str | None = None

    def label_dict(self) -> dict[str, int]:
        return dict(self.labels or ())

    def sections(self) -> tuple[str, ...]:
        """The non-empty report sections, findings first."""
        return tuple(s for s in (self.findings, self.impression) if s and s.strip())

    @property
    def has_report(self) -> bool:
        return bool(self.sections())

    def retrieval_text(self) -> str | None:
        """CXR-CLIP's retrieval text: the longer of findings and impression (None without a report)."""
        sections = self.sections()
        return max(sections, key=len) if sections else None


@dataclasses.dataclass(frozen=True)
class CXRManifest:
    records: tuple[CXRStudy, ...]
    root: str
    classes: tuple[str, ...]   # the classes labelled anywhere in the manifest, in prompt-bank order

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> tuple[CXRStudy, ...]:
        if name not in CXR_SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {CXR_SPLITS}")
        return tuple(r for r in self.records if r.split == name)


# ------------------------------------------------------------------------------------------------
# Shared pieces: bank classes, report sections, patient split, tables
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def bank_classes() -> tuple[str, ...]:
    """The shipped prompt bank's classes, in bank order: the only class names a manifest may use."""
    return tuple(load_bank())


def _bank_class(name: str) -> str | None:
    """The bank class a label column / class name means ("Pleural Effusion", "pleural_effusion"), or None."""
    cls = " ".join(name.replace("_", " ").split()).lower()
    return cls if cls in bank_classes() else None


def _ordered_labels(labels: Mapping[str, int] | None) -> tuple[tuple[str, int], ...] | None:
    """Labels as (class, value) pairs in bank order; None when there are none."""
    if not labels:
        return None
    return tuple((c, int(labels[c])) for c in bank_classes() if c in labels)


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


def patient_split(patient_id: str, seed: int, val_fraction: float, test_fraction: float = 0.0) -> str:
    """"train" / "val" / "test" for a patient from a seeded hash of its id: u = first 8 bytes of
    sha256(f"{seed}:{patient_id}") / 2**64; val when u < val_fraction, test when u < val + test."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _read_bytes(path: pathlib.Path) -> bytes:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ManifestError(str(path), [f"{path.name}: not a readable gzip file ({e}); download it again"]
                                ) from None
    return raw


def _decode(raw: bytes, path: pathlib.Path, study_id: str = "") -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        who = f"{study_id}: " if study_id else ""
        raise ManifestError(str(path), [Problem(BAD_ENCODING, study_id, str(path),
                                                f"{who}{path.name} line {line} is not valid UTF-8 text; "
                                                "re-save the file as UTF-8")]) from None


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
# Study drafts and the checks every layout shares
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Draft:
    study_id: str
    where: str                                   # file (and line) named in messages
    split: str                                   # as written
    images: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (absolute path, view)
    findings: str | None = None
    impression: str | None = None
    labels: dict[str, int] | None = None
    source: str = ""
    patient_id: str | None = None
    bad: bool = False                            # a problem was already recorded for it
    no_text_hint: str = ""                       # why it has no report, for the empty-study message
    split_from: str = ""                         # the file the split is from, when not `where`


def _finish(drafts: Sequence[_Draft], root: pathlib.Path, check_images: bool,
            problems: list[Problem]) -> tuple[CXRStudy, ...]:
    """Checks split, images and content of each draft; the good ones as studies."""
    records = []
    for d in drafts:
        sid, ok = d.study_id, not d.bad
        split = SPLIT_ALIASES.get(d.split.strip().lower())
        if split is None:
            problems.append(Problem(UNKNOWN_SPLIT, sid, d.where, f"{sid}: unknown split {d.split!r} in "
                                    f"{d.split_from or d.where}; use one of {sorted(SPLIT_ALIASES)}"))
            ok = False
        if not d.images:
            problems.append(Problem(EMPTY_STUDY, sid, d.where, f"{sid}: no images in {d.where}; give at least one "
                                    "image or drop the study"))
            ok = False
        missing = [p for p, _ in d.images if check_images and not os.path.isfile(p)]
        if missing:
            shown = ", ".join(_shown(p, root) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            problems.append(Problem(MISSING_FILE, sid, missing[0], f"{sid}: missing image file(s) {shown} ({d.where}); "
                                    "fix the path or download the file, or pass check_images=False"))
            ok = False
        if ok and not (_text(d.findings) or _text(d.impression)) and not d.labels:
            problems.append(Problem(EMPTY_STUDY, sid, d.where, f"{sid}: no report section (FINDINGS / IMPRESSION) "
                                    f"and no labels{d.no_text_hint}; supply one or drop the study"))
            ok = False
        if ok:
            records.append(CXRStudy(sid, split, tuple(CXRImage(p, v) for p, v in d.images), _text(d.findings),
                                    _text(d.impression), _ordered_labels(d.labels), d.source, d.patient_id))
    return tuple(records)


def _text(section: str | None) -> str | None:
    return section if section and section.strip() else None


def _shown(path: str, root: pathlib.Path) -> str:
    try:
        return str(pathlib.Path(path).relative_to(root))
    except ValueError:
        return path


def _manifest(records: tuple[CXRStudy, ...], root: pathlib.Path) -> CXRManifest:
    labelled = {c for r in records for c, _ in (r.labels or ())}
    return CXRManifest(records, str(root), tuple(c for c in bank_classes() if c in labelled))


# ------------------------------------------------------------------------------------------------
# Loading: layout detection
# ------------------------------------------------------------------------------------------------
def load_cxr_manifest(path: str | os.PathLike, *, check_images: bool = True,
                      reports_dir: str | os.PathLike | None = None, val_fraction: float = 0.0,
                      test_fraction: float = 0.0, split_seed: int = 0) -> CXRManifest:
    """Read a chest X-ray dataset (layout detected, see the module docstring), validated: any problem
    raises one ManifestError listing them all. Options: see `read_cxr_manifest`."""
    manifest, problems = read_cxr_manifest(path, check_images=check_images, reports_dir=reports_dir,
                                           val_fraction=val_fraction, test_fraction=test_fraction,
                                           split_seed=split_seed)
    if problems:
        raise ManifestError(str(path), problems)
    return manifest


def read_cxr_manifest(path: str | os.PathLike, *, check_images: bool = True,
                      reports_dir: str | os.PathLike | None = None, val_fraction: float = 0.0,
                      test_fraction: float = 0.0, split_seed: int = 0) -> tuple[CXRManifest, list[Problem]]:
    """The good studies and every per-study problem, sorted by message.

    reports_dir: MIMIC-CXR only, where the reports are (folder or `mimic-cxr-reports.zip`).
    val_fraction, test_fraction, split_seed: move patients of CheXpert's train.csv (ChestX-ray14's
    train_val_list: val_fraction only) to val / test with `patient_split`.
    Raises ManifestError when the dataset cannot be read at all, FileNotFoundError when `path` does not
    exist, ValueError for options that do not apply to the layout found.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CXR dataset path {path} does not exist; pass a .jsonl manifest or the folder of a "
                                "MIMIC-CXR-JPG, CheXpert or ChestX-ray14 download")
    layout = _detect(path)
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction <= 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: need fractions >= 0 summing "
                         "to at most 1")
    allowed = {"chexpert": ("val_fraction", "test_fraction"), "chestx-ray14": ("val_fraction",),
               "mimic-cxr": ("reports_dir",)}.get(layout, ())
    given = [n for n, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction),
                            ("reports_dir", reports_dir is not None)) if v]
    refused = [n for n in given if n not in allowed]
    if refused:
        raise ValueError(f"{path}: option(s) {refused} do not apply to a {layout} dataset; drop them")
    problems: list[Problem] = []
    if layout == "jsonl":
        file = path if path.is_file() else path / JSONL_NAME
        records, root = _read_jsonl(file, check_images, problems), file.parent
    elif layout == "mimic-cxr":
        records, root = _read_mimic(path, reports_dir, check_images, problems), path
    elif layout == "chexpert":
        records, root = _read_chexpert(path, val_fraction, test_fraction, split_seed, check_images, problems), path
    else:
        records, root = _read_nih(path, val_fraction, split_seed, check_images, problems), path
    problems.sort(key=str)
    return _manifest(records, root), problems


def _mimic_table(root: pathlib.Path, kind: str) -> pathlib.Path | None:
    found = sorted(p for p in root.glob(f"mimic-cxr-2.*-{kind}.csv*") if p.name.endswith((".csv", ".csv.gz")))
    return found[0] if found else None


def _nih_table(root: pathlib.Path) -> pathlib.Path | None:
    found = sorted(root.glob("Data_Entry_2017*.csv"))
    return found[0] if found else None


def _detect(path: pathlib.Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return "jsonl"
        raise ManifestError(str(path), [f"{path.name}: a manifest file must be .jsonl; for MIMIC-CXR-JPG, CheXpert or "
                                        "ChestX-ray14 pass the dataset's folder"])
    found = _layout_of(path)
    if found:
        return found
    inside = [f"{p.name} ({_layout_of(p)})" for p in sorted(path.iterdir()) if p.is_dir() and _layout_of(p)]
    hint = f"; its subfolder(s) {inside} hold one: pass that folder" if inside else ""
    raise ManifestError(str(path), [f"{path}: no chest X-ray dataset found: expected {JSONL_NAME} (vljax JSONL), "
                                    "mimic-cxr-2.0.0-metadata.csv[.gz] (MIMIC-CXR-JPG), train.csv / valid.csv "
                                    f"(CheXpert) or Data_Entry_2017.csv (ChestX-ray14){hint}"])


def _layout_of(folder: pathlib.Path) -> str | None:
    if (folder / JSONL_NAME).is_file():
        return "jsonl"
    if _mimic_table(folder, "metadata"):
        return "mimic-cxr"
    if _nih_table(folder):
        return "chestx-ray14"
    if (folder / "train.csv").is_file() or (folder / "valid.csv").is_file():
        return "chexpert"
    return None


# ------------------------------------------------------------------------------------------------
# vljax JSONL
# ------------------------------------------------------------------------------------------------
def _read_jsonl(path: pathlib.Path, check_images: bool, problems: list[Problem]) -> tuple[CXRStudy, ...]:
    base = path.parent.absolute()
    drafts, seen = [], set()
    for n, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        where = f"{path.name} line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(BAD_ENCODING, "", str(path), f"{where}: not valid UTF-8 text; re-save it as UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(BAD_ROW, "", str(path), f"{where}: not valid JSON ({e.msg} at column {e.colno})"))
            continue
        sid = obj.get("study_id") if isinstance(obj, dict) else None
        if not isinstance(sid, (str, int)) or isinstance(sid, bool) or not str(sid).strip():
            problems.append(Problem(BAD_ROW, "", str(path), f"{where}: not a JSON object with a \"study_id\" string"))
            continue
        sid = str(sid).strip()
        if sid in seen:
            problems.append(Problem(DUPLICATE_ID, sid, str(path), f"{sid}: duplicate study id ({where}); study ids "
                                    "must be unique: rename or remove one"))
            continue
        seen.add(sid)
        drafts.append(_jsonl_draft(obj, sid, where, base, path, problems))
    return _finish(drafts, base, check_images, problems)


def _jsonl_draft(obj: dict, sid: str, where: str, base: pathlib.Path, path: pathlib.Path,
                 problems: list[Problem]) -> _Draft:
    def bad(kind: str, message: str) -> None:
        problems.append(Problem(kind, sid, str(path), f"{sid}: {message} ({where})"))
        d.bad = True

    d = _Draft(sid, where, str(obj.get("split", "")), source=str(obj.get("source") or "jsonl"))
    unknown = sorted(k for k in obj if k not in JSONL_KEYS)
    if unknown:
        bad(BAD_ROW, f"unknown key(s) {unknown}; allowed keys are {list(JSONL_KEYS)}")
    for key in ("findings", "impression"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            bad(BAD_ROW, f"{key!r} must be a string or null")
        else:
            setattr(d, key, value)
    if obj.get("patient_id") is not None:
        d.patient_id = str(obj["patient_id"])
    images = obj.get("images")
    if not isinstance(images, list):
        bad(BAD_ROW, "\"images\" must be a list of {\"path\": ..., \"view\": ...} objects")
        images = []
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("path"), str) or not image["path"]:
            bad(BAD_ROW, "each image must be an object with a non-empty \"path\" string")
            continue
        view = str(image.get("view") or "UNKNOWN").strip().upper()
        if view not in VIEWS:
            bad(UNKNOWN_VIEW, f"unknown view {image.get('view')!r} of image {image['path']}; use one of {list(VIEWS)}")
        d.images.append((os.path.normpath(base / image["path"]), view))
    labels = obj.get("labels")
    if labels is not None and not isinstance(labels, dict):
        bad(BAD_LABEL, "\"labels\" must be an object {class: 1 | 0 | -1} or null")
    elif labels:
        unknown = sorted(c for c in labels if _bank_class(c) != c)
        values = sorted(f"{c!r} is {v!r}" for c, v in labels.items()
                        if v is not None and (isinstance(v, bool) or v not in (1, 0, -1)))
        if unknown:
            bad(BAD_LABEL, f"unknown label class(es) {unknown}; use the prompt bank's classes {list(bank_classes())}")
        if values:
            bad(BAD_LABEL, f"bad label value(s) {', '.join(values)}; use 1, 0, -1 or null (missing)")
        if not (unknown or values):
            d.labels = {c: int(v) for c, v in labels.items() if v is not None}
    return d


def write_cxr_jsonl(manifest: CXRManifest, path: str | os.PathLike) -> None:
    """Write `manifest` as a vljax CXR JSONL file that `load_cxr_manifest` reads back to the same
    studies; image paths under the file's folder are written relative to it, others absolute."""
    path = pathlib.Path(path)
    base = os.path.abspath(path.parent)
    lines = []
    for r in manifest.records:
        images = []
        for image in r.images:
            p = os.path.abspath(image.path)
            images.append({"path": os.path.relpath(p, base) if p.startswith(base + os.sep) else p, "view": image.view})
        lines.append(json.dumps({"study_id": r.study_id, "split": r.split, "images": images, "findings": r.findings,
                                 "impression": r.impression, "labels": dict(r.labels) if r.labels else None,
                                 "source": r.source or "jsonl", "patient_id": r.patient_id}, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


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


def _read_mimic(root: pathlib.Path, reports_dir, check_images: bool, problems: list[Problem]) -> tuple[CXRStudy, ...]:
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


def _read_chexpert(root: pathlib.Path, val_fraction: float, test_fraction: float, seed: int, check_images: bool,
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
def _read_nih(root: pathlib.Path, val_fraction: float, seed: int, check_images: bool,
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


# ------------------------------------------------------------------------------------------------
# Several sources
# ------------------------------------------------------------------------------------------------
def load_cxr_manifests(paths: Sequence[str | os.PathLike], *, check_images: bool = True) -> CXRManifest:
    """Several datasets as one manifest (each loaded and validated by `load_cxr_manifest`), in the given
    order. A study id found in more than one of them becomes "<source>:<id>" (its record's source name;
    "<source><k>:<id>" with k the dataset's 0-based position when two of them share a source name); classes are
    the union, in bank order; root is the datasets' common folder."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("load_cxr_manifests takes a list of paths; use load_cxr_manifest for one")
    manifests = [load_cxr_manifest(p, check_images=check_images) for p in paths]
    if not manifests:
        raise ValueError("load_cxr_manifests: no paths given")
    owners = collections.Counter(sid for m in manifests for sid in {r.study_id for r in m.records})
    sources = [{r.source for r in m.records if owners[r.study_id] > 1} for m in manifests]
    shared = collections.Counter(s for group in sources for s in group)
    records = []
    for k, m in enumerate(manifests):
        for r in m.records:
            if owners[r.study_id] > 1:
                prefix = r.source or "source"
                prefix += str(k) if shared[r.source] > 1 else ""
                r = dataclasses.replace(r, study_id=f"{prefix}:{r.study_id}")
            records.append(r)
    dup = [sid for sid, n in collections.Counter(r.study_id for r in records).items() if n > 1]
    if dup:  # only when ids like "chexpert:x" already existed
        raise ManifestError(", ".join(map(str, paths)), [Problem(DUPLICATE_ID, sid, "", f"{sid}: duplicate study id "
                                                                 "after prefixing; rename it") for sid in dup])
    return _manifest(tuple(records), pathlib.Path(os.path.commonpath([os.path.abspath(m.root) for m in manifests])))
