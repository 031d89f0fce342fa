"""Chest X-ray studies (CXR-CLIP, DESIGN.md §2): one study = one or more views, report sections
(findings, impression) when there is a report, and class labels (1 / 0 / -1 uncertain) when the study
comes from an image-label dataset or has extracted labels.

`load_cxr_manifest(path)` reads one dataset and detects its layout:

  * vljax CXR JSONL: a `.jsonl` file, or a folder holding `manifest.jsonl` (format: notes/cxr_spec.md);
    image paths relative to the file's folder or absolute. Read and written (`write_cxr_jsonl`) here.
  * MIMIC-CXR-JPG: a folder with `mimic-cxr-2.0.0-metadata.csv(.gz)`; reports from `reports_dir=` or
    found beside it.
  * CheXpert (v1.0 or v1.0-small): a folder with `train.csv` / `valid.csv` (and `test.csv`).
  * ChestX-ray14 (NIH): a folder with `Data_Entry_2017*.csv`, `train_val_list.txt`, `test_list.txt`.

The three public layouts are read by `cxr_datasets`, whose docstring details each one and how
`val_fraction` / `test_fraction` re-split their training patients (`patient_split`). This module holds
the study records, the checks every layout shares, layout detection and the JSONL format;
`load_cxr_manifests` joins several datasets.

Class names are the prompt bank's (`cxr_prompts.load_bank()`); a label column or class outside it is
an error naming it. Validation collects every per-study problem (missing image file, unknown view, bad
label value, unknown split, duplicate study id, empty study, ...) and raises one `ManifestError` listing
them; `read_cxr_manifest` returns the good studies and the problems instead. Messages name study ids,
files, columns and label values, never report text.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import pathlib
from typing import Mapping, Sequence

from vljax.data import manifest as manifest_lib
from vljax.data.cxr_prompts import load_bank
from vljax.data.manifest import (BAD_ENCODING, BAD_LABEL, BAD_ROW, DUPLICATE_ID, MISSING_FILE, UNKNOWN_SPLIT,
                                 ManifestError, Problem)

VIEWS = ("PA", "AP", "LATERAL", "LL", "UNKNOWN")   # LL: left lateral (MIMIC-CXR's ViewPosition)
CXR_SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {**manifest_lib.SPLIT_ALIASES, "validate": "val"}
SOURCES = ("phantom", "mimic-cxr", "chexpert", "chestx-ray14", "jsonl")

# Problem kinds beyond those of `manifest` (which this module reuses).
UNKNOWN_VIEW = "unknown_view"   # a view / ViewPosition value this module cannot map to VIEWS
EMPTY_STUDY = "empty_study"     # no images, or neither a report section nor a label

JSONL_NAME = "manifest.jsonl"
JSONL_KEYS = ("study_id", "split", "images", "findings", "impression", "labels", "source", "patient_id")


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
# Shared pieces: bank classes, patient split, file reading
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
    from vljax.data import cxr_datasets   # here, not at the top: the readers import this module
    problems: list[Problem] = []
    if layout == "jsonl":
        file = path if path.is_file() else path / JSONL_NAME
        records, root = _read_jsonl(file, check_images, problems), file.parent
    elif layout == "mimic-cxr":
        records, root = cxr_datasets.read_mimic(path, reports_dir, check_images, problems), path
    elif layout == "chexpert":
        records, root = cxr_datasets.read_chexpert(path, val_fraction, test_fraction, split_seed, check_images,
                                                   problems), path
    else:
        records, root = cxr_datasets.read_nih(path, val_fraction, split_seed, check_images, problems), path
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
