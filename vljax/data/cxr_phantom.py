"""Seeded synthetic chest X-ray studies in the vljax CXR JSONL layout (CXR-CLIP's data, DESIGN.md §2).

    from vljax.data.cxr_phantom import CXRPhantomConfig, generate_cxr_phantom
    generate_cxr_phantom("/tmp/cxr", CXRPhantomConfig(num_studies=3000, workers=2))

writes

    OUT/images/<study_id>_<k>.png   8-bit grayscale radiographs (PA, AP, LATERAL), 1-3 per study
    OUT/manifest.jsonl              one study per line, image paths relative to OUT
    OUT/phantom.json                generator version, config, split counts, prevalences (written last)

Studies show the prompt bank's seven phantom findings (cardiomegaly, pleural effusion, pneumothorax,
consolidation, edema, atelectasis, nodule; "no finding" when none), drawn by `cxr_phantom_render`.
A fraction `label_only_fraction` are image-label studies (no report, labels 1 / 0 / -1 for all eight
classes); the others have a report (findings and impression, sometimes only one) written in our own
words, never the bank's sentences, with labels as a CheXpert-style labeller would extract them:
mentioned classes only in train, all eight classes in val and test (evaluation needs them).
Uncertain labels: 10 % of positives are drawn as a subtler version of the finding (half its size or
density), labelled -1 and, in a report, hedged ("possible small left effusion").

Same config -> byte-identical files for any worker count: every study draws from its own
`np.random.default_rng([seed, index, stream])` streams, and splits from one seeded permutation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import time

import numpy as np
from absl import logging
from PIL import Image

from vljax.data import cxr_phantom_render as render
from vljax.data.cxr_phantom_render import FINDINGS

GENERATOR_VERSION = 1
CLASSES = ("no finding", "cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "edema",
           "atelectasis", "nodule")   # prompt-bank order
IMAGES_DIR, MANIFEST_FILE, INFO_FILE, MARKER_FILE = "images", "manifest.jsonl", "phantom.json", ".vljax_cxr_phantom"
NORMAL_FRACTION = 0.25
# P(finding | abnormal study) before co-occurrence; marginals come out at ~17-25 % (phantom.json).
PREVALENCE = {"cardiomegaly": 0.24, "pleural effusion": 0.22, "pneumothorax": 0.2, "consolidation": 0.24,
              "edema": 0.17, "atelectasis": 0.2, "nodule": 0.22}
UNCERTAIN = 0.1   # fraction of positives drawn subtler and labelled -1
MENTION = {"cardiomegaly": 0.7, "pleural effusion": 0.7, "pneumothorax": 0.65, "consolidation": 0.6,
           "edema": 0.45, "atelectasis": 0.25, "nodule": 0.25}   # P(a negative is negated in the report)
VIEW_SETS = {1: ((("PA",), 0.5), (("AP",), 0.45), (("LATERAL",), 0.05)),
             2: ((("PA", "LATERAL"), 0.7), (("AP", "LATERAL"), 0.2), (("PA", "AP"), 0.1)),
             3: ((("PA", "LATERAL", "AP"), 0.6), (("PA", "LATERAL", "LATERAL"), 0.4))}
VIEW_COUNTS = ((1, 0.4), (2, 0.4), (3, 0.2))
SECTION_SETS = (("findings", "impression"), ("findings",), ("impression",))
SECTION_PROBS = (0.85, 0.075, 0.075)


@dataclasses.dataclass(frozen=True)
class CXRPhantomConfig:
    num_studies: int = 1000
    label_only_fraction: float = 0.3
    seed: int = 0
    image_size: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 1   # 0: os.cpu_count(); never changes the output

    def __post_init__(self):
        if self.num_studies < 1:
            raise ValueError(f"num_studies must be >= 1, got {self.num_studies}")
        if not 0.0 <= self.label_only_fraction <= 1.0:
            raise ValueError(f"label_only_fraction must be in [0, 1], got {self.label_only_fraction}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be "
                             ">= 0 and leave a training split")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def identity(self) -> dict:
        """The fields that determine the output (not `workers`)."""
        return dict(num_studies=self.num_studies, label_only_fraction=float(self.label_only_fraction),
                    seed=self.seed, image_size=self.image_size, val_fraction=float(self.val_fraction),
                    test_fraction=float(self.test_fraction), generator_version=GENERATOR_VERSION)


@dataclasses.dataclass(frozen=True)
class PhantomCXRStudy:
    """One drawn study. `states`: finding -> 1 (positive), 0.5 (uncertain: subtler, label -1) or 0."""

    index: int
    seed: int
    study_id: str
    split: str
    label_only: bool
    states: dict
    views: tuple[str, ...]
    sections: tuple[str, ...]

    def truth(self) -> dict[str, int]:
        """Ground-truth labels of all eight classes (1 / 0, -1 where uncertain), in bank order."""
        lab = {f: {1.0: 1, 0.5: -1}.get(self.states[f], 0) for f in FINDINGS}
        return {"no finding": int(not any(lab.values())), **lab}


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def study_id(index: int) -> str:
    return f"cxr{index:06d}"


def assignments(cfg: CXRPhantomConfig) -> tuple[list[str], list[bool]]:
    """Each study's split (exact counts, seeded permutation) and whether it is label-only."""
    n = cfg.num_studies
    rng = np.random.default_rng([cfg.seed, 2**32 - 1])
    n_val, n_test = round(n * cfg.val_fraction), round(n * cfg.test_fraction)
    splits = ["train"] * n
    for rank, i in enumerate(rng.permutation(n)):
        splits[i] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    label_only = [False] * n
    for i in rng.permutation(n)[:round(n * cfg.label_only_fraction)]:
        label_only[i] = True
    return splits, label_only


def _pick(rng: np.random.Generator, options):
    return options[int(rng.choice(len(options), p=[p for _, p in options]))][0]


def sample_study(cfg: CXRPhantomConfig, index: int, split: str = "train", label_only: bool = False) -> PhantomCXRStudy:
    rng = _rng(cfg.seed, index, 0)
    # Every draw is made for every study (fixed order), so studies are independent of each other.
    normal = rng.uniform() < NORMAL_FRACTION
    pos = {f: bool(rng.uniform() < p) for f, p in PREVALENCE.items()}
    co = rng.uniform(size=3)
    pos["edema"] |= bool(pos["cardiomegaly"] and co[0] < 0.35)
    pos["pleural effusion"] |= bool((pos["cardiomegaly"] or pos["edema"]) and co[1] < 0.3)
    pos["atelectasis"] |= bool(pos["pleural effusion"] and co[2] < 0.3)
    forced = FINDINGS[int(rng.integers(len(FINDINGS)))]
    if not any(pos.values()):
        pos[forced] = True
    uncertain = rng.uniform(size=len(FINDINGS)) < UNCERTAIN
    states = {f: 0.0 if normal or not pos[f] else (0.5 if unc else 1.0) for f, unc in zip(FINDINGS, uncertain)}
    views = _pick(rng, VIEW_SETS[_pick(rng, VIEW_COUNTS)])
    sections = SECTION_SETS[int(rng.choice(len(SECTION_SETS), p=SECTION_PROBS))]
    return PhantomCXRStudy(index=index, seed=cfg.seed, study_id=study_id(index), split=split,
                           label_only=label_only, states=states, views=views, sections=sections)


def study_geometry(study: PhantomCXRStudy) -> tuple[dict, dict]:
    """The patient's anatomy and every finding's geometry (drawn whether or not it is present)."""
    return (render.sample_anatomy(_rng(study.seed, study.index, 1)),
            render.sample_findings(_rng(study.seed, study.index, 2)))


def render_view(study: PhantomCXRStudy, k: int, size: int, states: dict | None = None,
                pose: dict | None = None) -> np.ndarray:
    """Image k of a study, float32 [size, size] in [0, 1]. `states` overrides the findings (tests toggle
    one); `pose` overrides the image's drawn rotation/scale/shift/exposure/noise."""
    anat, geom = study_geometry(study)
    rng = _rng(study.seed, study.index, 10 + k)
    drawn = render.sample_pose(rng)   # then the noise, from the same stream
    return render.render(study.views[k], anat, geom, study.states if states is None else states,
                         drawn if pose is None else pose, size, noise_rng=rng)


# --- reports -------------------------------------------------------------------------------------------
# Our own wording (never a prompt-bank sentence: zero-shot evaluation uses those). Slots are filled from
# the drawn geometry: {size}/{adv} severity, {side}, {where}, {cpa}, {lobe}, {zone}, {cm}, {ctr}, {s}/{a}/{is}
# plural agreement, {bronch} optional air bronchograms; a capitalised slot capitalises the word.
POSITIVE = {
    "cardiomegaly": ("The cardiac silhouette is {adv} enlarged.",
                     "The heart is enlarged, with a cardiothoracic ratio of about {ctr}.",
                     "There is {size} enlargement of the cardiac silhouette.", "{Adv} enlarged heart."),
    "pleural effusion": ("There {is} {a}{size} {side} pleural effusion{s}.",
                         "{Size} {side} pleural effusion{s} blunting the {cpa}.",
                         "Blunting of the {cpa} with a meniscus, in keeping with {a}{size} pleural effusion{s}.",
                         "{Size} amount of pleural fluid at {where}."),
    "pneumothorax": ("There is a {size} {side} pneumothorax at the apex.",
                     "A {side} apical pleural line is seen with no lung markings beyond it, consistent with a {size} "
                     "pneumothorax.",
                     "{Size} pneumothorax at the {side} apex.", "{Size} {side} apical pneumothorax is present."),
    "consolidation": ("Dense airspace consolidation in the {lobe} lobe{bronch}.",
                      "There is consolidation of the {lobe} lobe{bronch}.",
                      "Lobar consolidation is seen in the {lobe} lobe{bronch}.",
                      "Focal consolidation involving the {lobe} lobe{bronch}."),
    "edema": ("{Size} perihilar haziness in keeping with pulmonary edema.",
              "Bilateral perihilar opacities in a bat-wing pattern, consistent with {size} pulmonary edema.",
              "There is {size} pulmonary edema.", "Pulmonary vascular congestion with {size} interstitial edema."),
    "atelectasis": ("Linear atelectasis at {where}.", "Plate-like atelectasis at {where} with mild volume loss.",
                    "Streaky opacity at {where}, compatible with subsegmental atelectasis.",
                    "Discoid atelectasis is present at {where}."),
    "nodule": ("A {cm} cm nodule in the {zone}.", "There is a {cm} cm rounded nodule projecting over the {zone}.",
               "A {cm} cm pulmonary nodule is seen in the {zone}; CT is recommended for further characterization.",
               "Well-circumscribed {cm} cm nodular density in the {zone}."),
}
HEDGED = {
    "cardiomegaly": ("The heart size is at the upper limit of normal to mildly enlarged.",
                     "Possible mild cardiomegaly.", "Borderline enlargement of the cardiac silhouette."),
    "pleural effusion": ("Possible small {side} pleural effusion{s}.",
                         "Blunting of the {cpa} could reflect a trace effusion.",
                         "A small pleural effusion at {where} is not excluded."),
    "pneumothorax": ("Questionable {side} apical pleural line, possibly a tiny pneumothorax.",
                     "A tiny {side} apical pneumothorax cannot be excluded.", "Possible small {side} pneumothorax."),
    "consolidation": ("Hazy airspace disease in the {lobe} lobe may represent early consolidation.",
                      "Possible consolidation in the {lobe} lobe.",
                      "Ill-defined density in the {lobe} lobe, consolidation not excluded."),
    "edema": ("Perihilar haziness could represent mild pulmonary edema.", "Possible early pulmonary edema.",
              "Mild vascular indistinctness, edema not excluded."),
    "atelectasis": ("Streaky opacity at {where}, probably atelectasis.", "Minor atelectasis at {where} is possible.",
                    "Subtle linear density at {where} may be atelectasis."),
    "nodule": ("A faint nodular density in the {zone} may be a nipple shadow.", "Possible small nodule in the {zone}.",
               "Questionable nodule in the {zone}."),
}
NEGATED = {
    "cardiomegaly": ("Normal heart size.", "The cardiac silhouette is not enlarged.",
                     "Heart size is within normal limits.", "The size of the cardiac silhouette is normal."),
    "pleural effusion": ("No effusion on either side.", "Both costophrenic angles are sharp.",
                         "No evidence of pleural effusion.", "There is no pleural fluid."),
    "pneumothorax": ("No pneumothorax is seen.", "There is no evidence of pneumothorax.",
                     "No pneumothorax on either side.", "No pneumothorax is present."),
    "consolidation": ("No focal airspace consolidation.", "There is no lobar consolidation.",
                      "No consolidation is identified.", "No confluent consolidation."),
    "edema": ("No pulmonary edema is seen.", "No signs of pulmonary edema.", "No evidence of pulmonary edema.",
              "Pulmonary vascularity is within normal limits."),
    "atelectasis": ("No atelectasis is seen.", "No linear atelectasis.", "No evidence of atelectasis."),
    "nodule": ("No discrete pulmonary nodule.", "No suspicious pulmonary nodules are seen.", "No nodular densities."),
}
IMPRESSION = {   # finding -> (positive, hedged) phrasings
    "cardiomegaly": (("{Size} cardiomegaly.", "Enlarged cardiac silhouette."), ("Mild cardiomegaly is possible.",)),
    "pleural effusion": (("{Size} {side} pleural effusion{s} blunting the {cpa}.", "Pleural fluid at {where}, {size}."),
                         ("Possible {side} pleural effusion{s}.",)),
    "pneumothorax": (("{Size} {side} pneumothorax.", "{Side} apical pneumothorax."),
                     ("Possible tiny {side} pneumothorax.",)),
    "consolidation": (("{Lobe} lobe consolidation.", "Airspace consolidation, {lobe} lobe."),
                      ("Possible {lobe} lobe consolidation.",)),
    "edema": (("{Size} pulmonary edema.", "Findings of {size} pulmonary edema."),
              ("Perihilar haziness, possibly mild edema.",)),
    "atelectasis": (("Atelectasis at {where}.",), ("Possible atelectasis at {where}.",)),
    "nodule": (("{Cm} cm nodule in the {zone}; CT is recommended.", "Pulmonary nodule in the {zone}."),
               ("Possible nodule in the {zone}.",)),
}
NORMAL_IMPRESSION = ("No acute cardiopulmonary disease.", "No acute intrathoracic abnormality.",
                     "No radiographic evidence of acute cardiopulmonary disease.")
# Sentences naming no class: (topic, text); CLEAR_LUNGS only when no lung or pleural finding is drawn.
NEUTRAL = ((0, "The trachea is midline."), (0, "The mediastinal contours are unremarkable."),
           (3, "No acute osseous abnormality."), (3, "Soft tissues are unremarkable."),
           (3, "The visualized upper abdomen is unremarkable."))
CLEAR_LUNGS = ("Both lungs are clear.", "The lungs are well expanded and clear.")
TOPIC = {"cardiomegaly": 0, "consolidation": 1, "edema": 1, "atelectasis": 1, "nodule": 1, "pleural effusion": 2,
         "pneumothorax": 2}


def _slots(study: PhantomCXRStudy, geom: dict) -> dict:
    words = render.severity_words(geom, study.states)
    slots = {f: {"size": words.get(f, "")} for f in FINDINGS}
    adv = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[words["cardiomegaly"]]
    slots["cardiomegaly"].update(adv=adv, ctr=f"{words['ctr']:.2f}")
    for f in ("pleural effusion", "atelectasis"):
        sides = geom[f]["sides"]
        both = len(sides) == 2
        slots[f].update(side="bilateral" if both else sides[0],
                        where="both lung bases" if both else f"the {sides[0]} lung base",
                        cpa="both costophrenic angles" if both else f"{sides[0]} costophrenic angle",
                        s="s" if both else "", a="" if both else "a ", **{"is": "are" if both else "is"})
    slots["pneumothorax"]["side"] = geom["pneumothorax"]["sides"][0]
    g = geom["consolidation"]
    slots["consolidation"].update(lobe=g["lobe"], bronch=" with air bronchograms" if g["bronchograms"] and study.states[
        "consolidation"] >= 1 else "")
    g = geom["nodule"]
    slots["nodule"].update(cm=f"{words['nodule_cm']:.1f}",
                           zone=f"{g['sides'][0]} {'upper lung zone' if g['tv'] < 0.4 else 'midlung zone'}")
    return slots


def _fill(template: str, slots: dict) -> str:
    caps = {k[0].upper() + k[1:]: (v[0].upper() + v[1:] if v else v) for k, v in slots.items()}
    return template.format(**slots, **caps)


def write_report(study: PhantomCXRStudy, geom: dict, rng: np.random.Generator) -> tuple[str | None, str | None, dict]:
    """(findings, impression, labels a CheXpert-style labeller would extract from them)."""
    slots = _slots(study, geom)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    sentences, labels = [], {}
    for f in FINDINGS:   # every draw made for every finding, in a fixed order
        state, mention = study.states[f], rng.uniform() < MENTION[f]
        positive, hedged, negated = pick(POSITIVE[f]), pick(HEDGED[f]), pick(NEGATED[f])
        if state:
            sentences.append((TOPIC[f], _fill(positive if state >= 1 else hedged, slots[f])))
        elif mention:
            sentences.append((TOPIC[f], negated))
    lungs_clear = not any(study.states[f] for f in FINDINGS if TOPIC[f] >= 1)
    clear, neutral = pick(CLEAR_LUNGS), [NEUTRAL[i] for i in rng.permutation(len(NEUTRAL))[:int(rng.integers(1, 3))]]
    if lungs_clear and rng.uniform() < 0.7:
        sentences.append((1, clear))
    sentences += neutral
    tie = rng.permutation(len(sentences))   # random order within a topic: heart, lungs, pleura, the rest
    in_order = sorted(range(len(sentences)), key=lambda i: (sentences[i][0], tie[i]))
    findings_text = " ".join(sentences[i][1] for i in in_order)
    imp = [_fill(pick(IMPRESSION[f][0 if study.states[f] >= 1 else 1]), slots[f]) for f in FINDINGS if study.states[f]]
    normal = pick(NORMAL_IMPRESSION)
    impression_text = " ".join(imp[i] for i in rng.permutation(len(imp))) if imp else normal
    findings = findings_text if "findings" in study.sections else None
    impression = impression_text if "impression" in study.sections else None
    truth = study.truth()
    for f in FINDINGS:
        if study.states[f]:
            labels[f] = truth[f]
        elif findings is not None and any(s in NEGATED[f] for _, s in sentences):
            labels[f] = 0
    if not any(study.states.values()):
        labels["no finding"] = 1
    return findings, impression, {c: labels[c] for c in CLASSES if c in labels}


def manifest_record(cfg: CXRPhantomConfig, study: PhantomCXRStudy) -> dict:
    """The study's JSONL object (image paths relative to the output folder)."""
    images = [{"path": f"{IMAGES_DIR}/{study.study_id}_{k}.png", "view": v} for k, v in enumerate(study.views)]
    if study.label_only:
        findings = impression = None
        labels = study.truth()
    else:
        findings, impression, labels = write_report(study, study_geometry(study)[1], _rng(cfg.seed, study.index, 3))
        if study.split != "train":   # evaluation needs every class
            labels = study.truth()
    return {"study_id": study.study_id, "split": study.split, "images": images, "findings": findings,
            "impression": impression, "labels": labels, "source": "phantom", "patient_id": None}


# --- generation --------------------------------------------------------------------------------------

def _write_studies(args: tuple[CXRPhantomConfig, list[tuple[int, str, bool]], str]) -> list[dict]:
    cfg, items, out = args
    records = []
    for index, split, label_only in items:
        study = sample_study(cfg, index, split, label_only)
        record = manifest_record(cfg, study)
        for k, image in enumerate(record["images"]):
            pixels = render.to_uint8(render_view(study, k, cfg.image_size))
            Image.fromarray(pixels).save(os.path.join(out, image["path"]), format="PNG", compress_level=1)
        records.append(record)
    return records


class CXRPhantomFolderError(FileExistsError, ValueError):
    """The output folder holds data this call must not replace (a ValueError too, for one-line errors)."""


def _read_info(path: pathlib.Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("config"), dict) else None


def generate_cxr_phantom(out_dir: str | os.PathLike, config: CXRPhantomConfig = CXRPhantomConfig(),
                         log=None) -> str:
    """Write the phantom to `out_dir` and return the path of its manifest.jsonl.

    A complete phantom of the same config (its phantom.json is written last) is reused as it is; one of
    another config is refused, never replaced; a folder this generator did not write is never touched.
    Only an interrupted generation (marker file, no phantom.json) is redone in place."""
    log = log or logging.info
    out = pathlib.Path(out_dir)
    manifest, info_path, marker = out / MANIFEST_FILE, out / INFO_FILE, out / MARKER_FILE
    existing = _read_info(info_path)
    if existing is not None and marker.exists() and existing["config"] == config.identity() and manifest.is_file():
        log(f"cxr phantom: reusing {config.num_studies} studies in {out}")
        return str(manifest)
    if existing is not None and marker.exists() and existing["config"] != config.identity():
        have = existing["config"]
        differs = [k for k, v in config.identity().items() if have.get(k) != v]
        raise CXRPhantomFolderError(
            f"{out} holds a complete chest X-ray phantom of {have.get('num_studies')} studies "
            f"(seed {have.get('seed')}) that differs from the one asked for ({config.num_studies} studies, "
            f"seed {config.seed}; differs in {', '.join(differs)}); choose an empty or new folder, or delete {out} "
            "to make the new phantom there")
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise CXRPhantomFolderError(f"{out} is not empty and was not written by the chest X-ray phantom generator; "
                                    "choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by vljax.data.cxr_phantom; the folder may be regenerated\n")
    info_path.unlink(missing_ok=True)
    if (out / IMAGES_DIR).exists():
        shutil.rmtree(out / IMAGES_DIR)
    (out / IMAGES_DIR).mkdir()
    t0 = time.perf_counter()
    splits, label_only = assignments(config)
    items = [(i, splits[i], label_only[i]) for i in range(config.num_studies)]
    workers = config.workers or os.cpu_count() or 1
    chunk = max(1, min(64, len(items) // (4 * workers)))
    jobs = [(config, items[i:i + chunk], str(out)) for i in range(0, len(items), chunk)]
    if workers == 1:
        records = [r for job in jobs for r in _write_studies(job)]
    else:  # spawn: callers may have imported JAX, which must not be forked
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            records = [r for rs in pool.map(_write_studies, jobs) for r in rs]
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, manifest)
    truths = [sample_study(config, i).truth() for i in range(config.num_studies)]
    info = dict(generator="vljax.data.cxr_phantom", config=config.identity(), num_studies=config.num_studies,
                num_images=sum(len(r["images"]) for r in records),
                splits={s: splits.count(s) for s in ("train", "val", "test")}, label_only=sum(label_only),
                prevalence={c: {str(v): sum(t[c] == v for t in truths) for v in (1, 0, -1)} for c in CLASSES})
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    log(f"cxr phantom: wrote {config.num_studies} studies ({info['num_images']} images, {config.image_size} px) "
        f"to {out} in {time.perf_counter() - t0:.1f} s with {workers} worker(s)")
    return str(manifest)
