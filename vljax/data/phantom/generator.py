"""Seeded phantom abdominal-CT dataset in the public Merlin layout (the embedded default).

    python tools/make_phantom.py --out /tmp/phantom --num-studies 1000 --seed 0

writes

    OUT/merlin_data/<study_id>.nii.gz          int16 HU volumes, real affines, varied spacing/orientation
    OUT/reports.csv                            study_id, findings, impression, split
    OUT/zero_shot_findings_disease_cls.csv     study_id + the 30 findings (1 / 0 / -1)
    OUT/phenotypes.csv, OUT/phecodes.csv        phenotype-code table (study x code, 0/1) and code names
    OUT/metadata.csv                           age, sex, phase, slice thickness, scanner
    OUT/phantom_info.json                      generator version, config, prevalences

Same config and seed -> byte-identical files, whatever the number of worker processes: every
study draws from its own `np.random.default_rng([seed, index, stream])` streams (anatomy, finding
geometry, report text, noise), so studies are independent of each other and of scheduling.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import time

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from vljax.data.phantom import anatomy
from vljax.data.phantom import signs as phantom_signs
from vljax.data.phantom import text
from vljax.data.findings import FINDINGS

GENERATOR_VERSION = 2
IMAGES_DIR = "merlin_data"
REPORTS_FILE = "reports.csv"
LABELS_FILE = "zero_shot_findings_disease_cls.csv"
PHENOTYPES_FILE = "phenotypes.csv"
PHECODES_FILE = "phecodes.csv"
METADATA_FILE = "metadata.csv"
INFO_FILE = "phantom_info.json"
MARKER_FILE = ".vljax_phantom"

# Prevalence of each finding (fraction of studies positive, before the age and co-occurrence
# adjustments below); prostatomegaly is per male study. Most findings are rare, as in real ED CT.
PREVALENCE: dict[str, float] = {
    "atherosclerosis": 0.32, "coronary calcification": 0.22, "renal cyst": 0.20, "atelectasis": 0.16,
    "hepatic steatosis": 0.16, "osteopenia": 0.15, "prostatomegaly": 0.14, "renal hypodensities": 0.12,
    "surgically absent gallbladder": 0.10, "pleural effusion": 0.09, "gallstones": 0.09,
    "hiatal hernia": 0.08, "lymphadenopathy": 0.08, "cardiomegaly": 0.08, "ascites": 0.07,
    "hepatomegaly": 0.07, "splenomegaly": 0.06, "aortic valve calcification": 0.06,
    "metastatic disease": 0.06, "pancreatic atrophy": 0.06, "hydronephrosis": 0.06, "fracture": 0.05,
    "submucosal edema": 0.05, "biliary ductal dilation": 0.05, "bowel obstruction": 0.04,
    "thrombosis": 0.04, "abdominal aortic aneurysm": 0.04, "anasarca": 0.04, "appendicitis": 0.04,
    "free air": 0.03,
}
# Findings whose risk rises with age: p = base * (0.4 + 1.2 * (age - 20) / 70), mean factor ~1.
AGE_LINKED = ("atherosclerosis", "coronary calcification", "aortic valve calcification", "osteopenia",
              "abdominal aortic aneurysm", "renal cyst", "prostatomegaly", "pancreatic atrophy")
# Probability that a negative finding is explicitly negated (label 0) rather than not mentioned (-1).
MENTION: dict[str, float] = {f: 0.45 for f in FINDINGS} | {
    "pleural effusion": 0.8, "ascites": 0.8, "free air": 0.75, "hydronephrosis": 0.8,
    "lymphadenopathy": 0.7, "bowel obstruction": 0.65, "appendicitis": 0.55, "fracture": 0.6,
    "gallstones": 0.5, "abdominal aortic aneurysm": 0.5, "splenomegaly": 0.55, "hepatomegaly": 0.5,
}
# Phenotype codes (PheWAS-style), each driven by some findings plus background prevalence.
PHECODES: tuple[tuple[str, str, tuple[str, ...], float], ...] = (
    ("401.1", "essential hypertension", ("atherosclerosis", "cardiomegaly", "abdominal aortic aneurysm"), 0.25),
    ("272.1", "hyperlipidemia", ("atherosclerosis", "coronary calcification"), 0.2),
    ("250.2", "type 2 diabetes", ("hepatic steatosis", "pancreatic atrophy"), 0.12),
    ("411.4", "coronary atherosclerosis", ("coronary calcification", "aortic valve calcification"), 0.06),
    ("428.2", "heart failure", ("cardiomegaly", "pleural effusion", "anasarca"), 0.05),
    ("571.81", "nonalcoholic fatty liver disease", ("hepatic steatosis", "hepatomegaly"), 0.04),
    ("574.1", "cholelithiasis", ("gallstones", "surgically absent gallbladder"), 0.03),
    ("198.0", "secondary malignant neoplasm", ("metastatic disease", "lymphadenopathy"), 0.03),
    ("585.3", "chronic kidney disease", ("hydronephrosis", "renal hypodensities", "anasarca"), 0.06),
    ("600.0", "benign prostatic hyperplasia", ("prostatomegaly",), 0.03),
    ("550.4", "diaphragmatic hernia", ("hiatal hernia",), 0.02),
    ("560.0", "intestinal obstruction", ("bowel obstruction",), 0.01),
    ("540.0", "appendicitis", ("appendicitis",), 0.005),
    ("442.1", "abdominal aortic aneurysm", ("abdominal aortic aneurysm",), 0.01),
    ("452.0", "venous embolism and thrombosis", ("thrombosis",), 0.02),
    ("743.1", "osteoporosis", ("osteopenia", "fracture"), 0.05),
)
ORIENTATIONS: tuple[tuple[str, float], ...] = (
    ("LPS", 0.35), ("RAS", 0.2), ("LAS", 0.15), ("RPI", 0.1), ("LPI", 0.1), ("PLS", 0.05), ("LSP", 0.05),
)
SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What to generate. `spacing` is the nominal (x, y, z) voxel size in mm; each study varies it
    (in-plane x0.85-1.15, slice x0.75/1/1.25). The default (6, 6, 8) mm gives ~70x70x50 voxels over
    a ~420 mm field of view: small enough for 2 CPU cores, large enough to show every finding."""

    num_studies: int = 1000
    seed: int = 0
    spacing: tuple[float, float, float] = (6.0, 6.0, 8.0)
    vary_orientation: bool = True
    signs: str = "designed"  # phantom.signs profile: "designed" (conspicuous) or "anatomic" (earlier rendering)
    workers: int = 0  # 0: os.cpu_count()

    def __post_init__(self):
        if self.num_studies < 1:
            raise ValueError(f"num_studies must be >= 1, got {self.num_studies}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0.3 or max(self.spacing) > 20:
            raise ValueError(f"spacing must be three values in (0.3, 20] mm, got {self.spacing}")
        phantom_signs.signs_for(self.signs)  # raises on an unknown profile
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def identity(self) -> dict:
        """The fields that determine the output (not `workers`)."""
        return dict(num_studies=self.num_studies, seed=self.seed, spacing=list(map(float, self.spacing)),
                    vary_orientation=self.vary_orientation, signs=self.signs,
                    signs_digest=phantom_signs.digest(self.signs), generator_version=GENERATOR_VERSION)


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Everything needed to render one study, drawn deterministically from (seed, index)."""

    index: int
    seed: int
    study_id: str
    split: str
    sex: str
    age: int
    labels: dict  # finding -> 1 / 0 / -1
    spacing: tuple[float, float, float]  # canonical RAS voxel size, mm
    shape: tuple[int, int, int]  # canonical RAS shape
    origin: tuple[float, float, float]  # world position of canonical voxel (0, 0, 0)
    axcodes: str  # storage orientation, e.g. "LPS"
    signs: str = "designed"  # phantom.signs profile

    @property
    def positives(self) -> tuple[str, ...]:
        return tuple(f for f in FINDINGS if self.labels[f] == 1)


def study_id(index: int) -> str:
    return f"PH{index:06d}"


def _rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream, *extra])


def sample_spec(cfg: PhantomConfig, index: int) -> StudySpec:
    rng = _rng(cfg.seed, index, 0)
    sex = "M" if rng.uniform() < 0.5 else "F"
    age = int(rng.integers(20, 91))
    split = str(rng.choice([s for s, _ in SPLITS], p=[p for _, p in SPLITS]))
    # Findings.
    pos = {}
    for f in FINDINGS:
        p = PREVALENCE[f]
        if f in AGE_LINKED:
            p *= 0.4 + 1.2 * (age - 20) / 70
        pos[f] = bool(rng.uniform() < p)
    if pos["anasarca"]:
        pos["ascites"] |= bool(rng.uniform() < 0.5)
        pos["pleural effusion"] |= bool(rng.uniform() < 0.5)
    if pos["pleural effusion"]:
        pos["atelectasis"] |= bool(rng.uniform() < 0.45)
    if sex == "F":
        pos["prostatomegaly"] = False
    if pos["surgically absent gallbladder"]:
        pos["gallstones"] = False
    labels = {}
    for f in FINDINGS:
        mentioned = rng.uniform() < MENTION[f]  # drawn for every finding: keeps streams aligned
        labels[f] = 1 if pos[f] else (0 if mentioned else -1)
    if sex == "F":
        labels["prostatomegaly"] = -1
    if pos["surgically absent gallbladder"]:
        labels["gallstones"] = -1
    # Grid: field of view, spacing, table offset and storage orientation.
    sxy = float(np.round(cfg.spacing[0] * rng.uniform(0.85, 1.15), 3))
    sz = float(np.round(cfg.spacing[2] * rng.choice([0.75, 1.0, 1.25]), 3))
    fov = float(rng.uniform(390, 450))
    z_top = 215.0 + float(rng.uniform(0, 25))
    z_bot = -225.0 - float(rng.uniform(0, 25))
    sy = sxy * cfg.spacing[1] / cfg.spacing[0]
    shape = (math.ceil(fov / sxy), math.ceil(fov / sy), math.ceil((z_top - z_bot) / sz))
    shift = rng.uniform(-12, 12, size=2)
    origin = (float(-(shape[0] - 1) * sxy / 2 + shift[0]), float(-(shape[1] - 1) * sy / 2 + shift[1]), z_bot)
    codes, probs = zip(*ORIENTATIONS)
    axcodes = str(rng.choice(codes, p=probs)) if cfg.vary_orientation else "RAS"
    return StudySpec(index=index, seed=cfg.seed, study_id=study_id(index), split=split, sex=sex, age=age,
                     labels=labels, spacing=(sxy, float(sy), sz), shape=shape, origin=origin, axcodes=axcodes,
                     signs=cfg.signs)


def render_canonical(spec: StudySpec, positives: tuple[str, ...] | None = None) -> np.ndarray:
    """HU volume (float32) on the canonical RAS grid. `positives` overrides the spec's findings
    (used by tests to toggle one finding on an otherwise identical study)."""
    positives = spec.positives if positives is None else positives
    anat, fparams = _geometry(spec)
    xs, ys, zs = (spec.origin[i] + spec.spacing[i] * np.arange(spec.shape[i], dtype=np.float64) for i in range(3))
    canvas = anatomy.Canvas(xs=xs, ys=ys, zs=zs, vol=np.full(spec.shape, anatomy.HU["air"], np.float32),
                            voxel=float(np.mean(spec.spacing)))
    anatomy.render_anatomy(canvas, anat, {f: True for f in positives}, fparams)
    noise = _rng(spec.seed, spec.index, 3).standard_normal(spec.shape, dtype=np.float32)
    return canvas.vol + np.float32(anat["noise"]) * noise


def canonical_affine(spec: StudySpec) -> np.ndarray:
    aff = np.diag([*spec.spacing, 1.0])
    aff[:3, 3] = spec.origin
    return aff


def to_storage(volume_ras: np.ndarray, affine_ras: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Re-store a RAS-ordered array in another orientation, with the affine that keeps every voxel
    at the same world position (what a DICOM->NIfTI converter produces for that acquisition)."""
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(axcodes)))
    data = nio.apply_orientation(volume_ras, transform)
    affine = affine_ras @ nio.inv_ornt_aff(transform, volume_ras.shape)
    return np.ascontiguousarray(data), affine


def render_study(spec: StudySpec) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU array in storage order, 4x4 affine) for one study."""
    hu = render_canonical(spec)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return to_storage(hu, canonical_affine(spec), spec.axcodes)


def nifti_image(data: np.ndarray, affine: np.ndarray, slice_thickness: float) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)  # scanner anatomical
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = f"vljax phantom v{GENERATOR_VERSION} thk={slice_thickness:g}".encode()
    return img


def _geometry(spec: StudySpec) -> tuple[dict, dict]:
    """The study's anatomy and every finding's drawn geometry (sizes, HU, counts from its signs)."""
    anat = anatomy.sample_anatomy(_rng(spec.seed, spec.index, 1), spec.sex)
    fparams = phantom_signs.sample_finding_params(_rng(spec.seed, spec.index, 2), anat,
                                                  phantom_signs.signs_for(spec.signs))
    return anat, fparams


def report_for(spec: StudySpec) -> tuple[str, str]:
    anat, fparams = _geometry(spec)
    return text.render_report(spec.labels, fparams, spec.sex, _rng(spec.seed, spec.index, 4),
                              phantom_signs.drawn_sizes_cm(anat, fparams))


def phenotypes_for(spec: StudySpec) -> list[int]:
    rng = _rng(spec.seed, spec.index, 5)
    out = []
    for _code, _name, drivers, base in PHECODES:
        p = base + sum(0.55 for d in drivers if spec.labels[d] == 1)
        out.append(int(rng.uniform() < min(p, 0.95)))
    return out


def _write_study(args: tuple[PhantomConfig, int, str]) -> int:
    cfg, index, images_dir = args
    spec = sample_spec(cfg, index)
    data, affine = render_study(spec)
    path = os.path.join(images_dir, f"{spec.study_id}.nii.gz")
    nib.save(nifti_image(data, affine, spec.spacing[2]), path)
    return os.path.getsize(path)


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _read_info(info_path: pathlib.Path) -> dict | None:
    """The info of a complete phantom, or None (absent, or cut short while being written)."""
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("config"), dict) else None


def _other_phantom_message(out: pathlib.Path, info: dict, cfg: PhantomConfig) -> str:
    have, want = info["config"], cfg.identity()
    differs = [k for k in want if have.get(k) != want[k]]
    return (f"{out} holds a complete phantom of {info.get('num_studies', have.get('num_studies'))} studies "
            f"(seed {have.get('seed')}) that differs from the one asked for ({cfg.num_studies} studies, "
            f"seed {cfg.seed}; differs in {', '.join(differs)}); it is not regenerated in place: choose an "
            f"empty or new folder (--config.data.dir) or delete {out} to make the new phantom there")


class PhantomFolderError(FileExistsError, ValueError):
    """The output folder holds data this call must not replace. A ValueError too, so that the
    commands' usual error handling prints its one line instead of a traceback."""


def generate_phantom(out_dir: str | os.PathLike, cfg: PhantomConfig = PhantomConfig(), *,
                     reuse: bool = True, log=print) -> dict:
    """Write the phantom dataset to `out_dir` and return its info dict.

    With `reuse`, an existing complete dataset generated with the same config is kept as it is
    (its `phantom_info.json` is written last, so a half-written dataset is never reused), and a
    complete phantom of another config is refused: a user's phantom (e.g. 24 studies from
    tools/make_phantom.py, passed as --config.data.dir) is never silently replaced. Only an
    interrupted generation (marker, no info file) is regenerated. `reuse=False` is an explicit
    request to regenerate (tools/make_phantom.py --force) and replaces a complete phantom too.
    Never writes into a non-empty folder this generator did not make."""
    out = pathlib.Path(out_dir)
    info_path = out / INFO_FILE
    existing = _read_info(info_path)
    if reuse and existing is not None and existing.get("config") == cfg.identity():
        log(f"phantom: reusing {cfg.num_studies} studies in {out}")
        return existing
    marker = out / MARKER_FILE
    if out.exists() and any(out.iterdir()) and not marker.exists():
        # Never delete what this generator did not write (e.g. a real Merlin folder).
        raise PhantomFolderError(f"{out} is not empty and was not written by the phantom generator; "
                                 "choose an empty or new directory")
    if reuse and existing is not None:
        raise PhantomFolderError(_other_phantom_message(out, existing, cfg))
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by vljax.data.phantom; the folder may be regenerated\n")
    info_path.unlink(missing_ok=True)
    images = out / IMAGES_DIR
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    t0 = time.perf_counter()
    specs = [sample_spec(cfg, i) for i in range(cfg.num_studies)]
    workers = cfg.workers or os.cpu_count() or 1
    jobs = [(cfg, i, str(images)) for i in range(cfg.num_studies)]
    if workers == 1:
        sizes = [_write_study(j) for j in jobs]
    else:  # spawn: callers may have imported JAX, which must not be forked
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            sizes = list(pool.map(_write_study, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers)))))
    t_images = time.perf_counter() - t0

    reports = [report_for(s) for s in specs]
    _write_csv(out / REPORTS_FILE, ["study_id", "findings", "impression", "split"],
               [[s.study_id, f, imp, s.split] for s, (f, imp) in zip(specs, reports)])
    _write_csv(out / LABELS_FILE, ["study_id", *FINDINGS], [[s.study_id, *(s.labels[f] for f in FINDINGS)] for s in specs])
    _write_csv(out / PHENOTYPES_FILE, ["study_id", *(c for c, *_ in PHECODES)],
               [[s.study_id, *phenotypes_for(s)] for s in specs])
    _write_csv(out / PHECODES_FILE, ["phecode", "description"], [[c, n] for c, n, *_ in PHECODES])
    _write_csv(out / METADATA_FILE, ["study_id", "age", "sex", "phase", "slice_thickness_mm", "orientation"],
               [[s.study_id, s.age, s.sex, "portal venous", f"{s.spacing[2]:g}", s.axcodes] for s in specs])

    n = len(specs)
    prevalence = {f: dict(pos=sum(s.labels[f] == 1 for s in specs), neg=sum(s.labels[f] == 0 for s in specs),
                          unmentioned=sum(s.labels[f] == -1 for s in specs)) for f in FINDINGS}
    info = dict(
        config=cfg.identity(), num_studies=n,
        splits={name: sum(s.split == name for s in specs) for name, _ in SPLITS},
        prevalence=prevalence, total_bytes=int(sum(sizes)),
        target_prevalence=PREVALENCE,
    )
    info_path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    log(f"phantom: wrote {n} studies ({sum(sizes) / 2**20:.1f} MiB) to {out} in {t_images:.1f} s "
        f"with {workers} worker(s)")
    return info
