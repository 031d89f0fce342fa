"""The chest X-ray phantom: byte-identical output for any worker count, the JSONL format, every finding
visible at 64x64 where it belongs (and nowhere else), reports that name exactly their labelled classes
in our own words, label-only studies with uncertain labels, view counts, splits and folder reuse."""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from vljax.data import cxr_phantom as cp
from vljax.data import cxr_phantom_render as cr
from vljax.data.cxr_prompts import load_bank

FINDINGS = ("cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "edema", "atelectasis", "nodule")
CLASSES = ("no finding",) + FINDINGS
QUIET = dict(log=lambda *_: None)


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(manifest: str) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(manifest).read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = cp.CXRPhantomConfig(num_studies=10, seed=3, image_size=64, workers=1)
    out = tmp_path_factory.mktemp("cxr")
    return cfg, out, cp.generate_cxr_phantom(out, cfg, **QUIET)


def test_output_is_byte_identical_for_one_and_two_workers(small, tmp_path):
    cfg, out, _ = small
    cp.generate_cxr_phantom(tmp_path, cp.CXRPhantomConfig(**{**cfg.__dict__, "workers": 2}), **QUIET)
    a, b = _digest(out), _digest(tmp_path)
    assert len(a) == 3 + sum(len(r["images"]) for r in _lines(out / cp.MANIFEST_FILE))  # + manifest, info, marker
    assert a == b


def test_manifest_lines_follow_the_cxr_jsonl_format(small):
    cfg, out, manifest = small
    assert manifest == str(out / "manifest.jsonl")
    records = _lines(manifest)
    assert [r["study_id"] for r in records] == [f"cxr{i:06d}" for i in range(10)]
    assert collections.Counter(r["split"] for r in records) == {"train": 8, "val": 1, "test": 1}
    assert sum(r["findings"] is None and r["impression"] is None for r in records) == 3   # round(0.3 * 10)
    for r in records:
        assert list(r) == ["study_id", "split", "images", "findings", "impression", "labels", "source", "patient_id"]
        assert r["source"] == "phantom" and r["patient_id"] is None
        assert 1 <= len(r["images"]) <= 3
        for k, image in enumerate(r["images"]):
            assert image["path"] == f"images/{r['study_id']}_{k}.png" and image["view"] in ("PA", "AP", "LATERAL")
            with Image.open(out / image["path"]) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
                pixels = np.asarray(im)
            assert 20 < pixels.mean() < 200 and pixels.std() > 25   # a radiograph, not a blank
        assert r["labels"] and set(r["labels"]) <= set(CLASSES) and set(r["labels"].values()) <= {1, 0, -1}
        assert list(r["labels"]) == [c for c in CLASSES if c in r["labels"]]   # bank order
        if r["split"] != "train" or r["findings"] is r["impression"] is None:
            assert list(r["labels"]) == list(CLASSES)
        if r["findings"] is not None or r["impression"] is not None:
            assert any(isinstance(s, str) and s.strip() for s in (r["findings"], r["impression"]))
    info = json.loads((out / "phantom.json").read_text())
    assert info["config"] == cfg.identity() and info["num_images"] == sum(len(r["images"]) for r in records)


# --- every finding visible at the trainer's 64x64 input, where it belongs -------------------------------

def _region(x0, x1, y0, y1, n=64):
    """Pixels of a 64x64 image (identity pose, 40 cm field of view) inside a box given in cm."""
    c = (np.arange(n) + 0.5) * (cr.FOV_CM / n) - cr.FOV_CM / 2
    return (c[None, :] >= x0) & (c[None, :] <= x1) & (c[:, None] >= y0) & (c[:, None] <= y1)


def _side_box(side, y0, y1, inner=1.5, outer=16.0):
    return _region(-outer, -inner, y0, y1) if side == "right" else _region(inner, outer, y0, y1)


def _expected(finding, geom):
    """(where the finding must change the frontal image, where it must not, sign of the change)."""
    g = geom[finding]
    if finding == "cardiomegaly":
        return _region(-10, 12, -5, 11), _region(-20, 20, -20, -7), 1
    if finding == "pleural effusion":
        where = np.logical_or.reduce([_side_box(s, -4, 12) for s in g["sides"]])
        return where, ~np.logical_or.reduce([_side_box(s, -5, 20, inner=0) for s in g["sides"]]), 1
    if finding == "pneumothorax":
        return _side_box(g["sides"][0], -16, 1), ~_side_box(g["sides"][0], -20, 2, inner=0), -1
    if finding == "consolidation":
        side = cr.LOBES[g["lobe"]][0]
        where = _side_box(side, -15, 3) if "upper" in g["lobe"] else _side_box(side, -5, 12)
        return where, ~_side_box(side, -20, 20, inner=0), 1
    if finding == "edema":
        return _region(-12, 12, -12, 8), _region(-20, 20, -20, -13) | _region(-20, 20, 9, 20), 1
    if finding == "atelectasis":
        where = np.logical_or.reduce([_side_box(s, -3, 11) for s in g["sides"]])
        other_side = ~np.logical_or.reduce([_side_box(s, -20, 20, inner=0) for s in g["sides"]])
        return where, _region(-20, 20, -20, -4) | other_side, 1
    return _side_box(g["sides"][0], -15, 3), ~_side_box(g["sides"][0], -16, 4, inner=0), 1


def _at_64(img):
    return img.reshape(64, 2, 64, 2).mean(axis=(1, 3))


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_is_visible_at_64px_where_it_belongs_and_nowhere_else(finding):
    cfg = cp.CXRPhantomConfig(seed=5)
    for index in range(3):   # three patients, each with its own drawn side / lobe / size
        study = cp.sample_study(cfg, index)
        study = cp.PhantomCXRStudy(**{**study.__dict__, "views": ("PA",)})
        _, geom = cp.study_geometry(study)
        flat = dict.fromkeys(FINDINGS, 0.0)
        base = cp.render_view(study, 0, 128, states=flat, pose=cr.IDENTITY_POSE)
        full = cp.render_view(study, 0, 128, states={**flat, finding: 1.0}, pose=cr.IDENTITY_POSE)
        subtle = cp.render_view(study, 0, 128, states={**flat, finding: 0.5}, pose=cr.IDENTITY_POSE)
        d = _at_64(full) - _at_64(base)
        where, elsewhere, sign = _expected(finding, geom)
        # Visible: >= 6 px (a nodule: 3) change by >= 15 gray levels at 64x64; the change lies where the
        # finding belongs (>= 90 % of it) with the expected sign; nothing changes where it must not.
        assert (np.abs(d) >= 15 / 255).sum() >= (3 if finding == "nodule" else 6), (index, np.abs(d).max())
        assert np.abs(d[where]).sum() >= 0.9 * np.abs(d).sum(), index
        assert sign * d[where].sum() > 0, index
        assert np.abs(d[elsewhere]).max() < 1 / 255, (index, np.abs(d[elsewhere]).max())
        if finding == "nodule":
            assert (np.abs(d) >= 0.02).sum() <= 25   # small and round, ~1-2 cm
        # The uncertain (-1) version is subtler, but still there.
        ds = np.abs(_at_64(subtle) - _at_64(base)).sum()
        assert 0.1 * np.abs(d).sum() < ds < 0.95 * np.abs(d).sum(), index


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_also_shows_on_the_lateral_view(finding):
    study = cp.sample_study(cp.CXRPhantomConfig(seed=5), 1)
    study = cp.PhantomCXRStudy(**{**study.__dict__, "views": ("LATERAL",)})
    flat = dict.fromkeys(FINDINGS, 0.0)
    base = _at_64(cp.render_view(study, 0, 128, states=flat, pose=cr.IDENTITY_POSE))
    d = _at_64(cp.render_view(study, 0, 128, states={**flat, finding: 1.0}, pose=cr.IDENTITY_POSE)) - base
    assert (np.abs(d) >= 10 / 255).sum() >= (2 if finding == "nodule" else 6), np.abs(d).max()
    rows = np.abs(d).sum(axis=1)
    centre = (rows * np.arange(64)).sum() / rows.sum() * cr.FOV_CM / 64 - cr.FOV_CM / 2   # cm, + = down
    upper = "upper" in cp.study_geometry(study)[1]["consolidation"]["lobe"]
    expected = {"pleural effusion": (2, 12), "atelectasis": (2, 12), "pneumothorax": (-16, -4), "edema": (-6, 2),
                "cardiomegaly": (-4, 8), "consolidation": (-16, 0) if upper else (-2, 12), "nodule": (-15, 4)}[finding]
    assert expected[0] <= centre <= expected[1], centre


def test_ap_magnifies_the_heart_and_two_views_of_a_study_differ():
    cfg = cp.CXRPhantomConfig(seed=2)
    study = next(s for s in (cp.sample_study(cfg, i) for i in range(200)) if s.views == ("PA", "LATERAL", "LATERAL"))
    flat = dict.fromkeys(FINDINGS, 0.0)
    pa = cp.render_view(study, 0, 128, states=flat, pose=cr.IDENTITY_POSE)
    ap = cp.render_view(cp.PhantomCXRStudy(**{**study.__dict__, "views": ("AP",)}), 0, 128, states=flat,
                        pose=cr.IDENTITY_POSE)
    d = _at_64(ap) - _at_64(pa)
    assert d.sum() > 0.5 and np.abs(d[_region(-20, 20, -20, -7)]).max() < 1 / 255   # a larger heart, same lungs
    lat1, lat2 = cp.render_view(study, 1, 128), cp.render_view(study, 2, 128)   # drawn pose, exposure, noise
    assert np.abs(lat1 - lat2).mean() > 0.02


# --- reports and labels -----------------------------------------------------------------------------

KEYWORDS = {"cardiomegaly": ("heart", "cardiac", "cardiomegaly", "cardiothoracic"),
            "pleural effusion": ("effusion", "pleural fluid", "costophrenic"),
            "pneumothorax": ("pneumothorax", "pleural line"),
            "consolidation": ("consolidation", "airspace", "air bronchogram"),
            "edema": ("edema", "perihilar", "vascular", "bat-wing"),
            "atelectasis": ("atelectasis", "plate-like", "volume loss"),
            "nodule": ("nodule", "nodular"),
            "no finding": ("acute cardiopulmonary", "acute intrathoracic")}
OTHER_BANK_CLASSES = ("pneumonia", "mass", "lung opacity", "lesion", "infiltrat", "emphysema", "fibrosis",
                      "thickening", "hernia", "fracture", "support device", "tube", "cardiomediastinum")
HEDGES = ("possibl", "may ", "could", "not excluded", "cannot be excluded", "questionable", "probably", "borderline",
          "upper limit")


def _sentences(text):
    return [s for s in re.split(r"(?<=\.) ", text) if s] if text else []


def _classes_named(sentence):
    low = sentence.lower()
    return {c for c, words in KEYWORDS.items() if any(w in low for w in words)}


def _negated(sentence):
    low = sentence.lower()
    return low.startswith(("no ", "there is no ", "normal ")) or any(
        p in low for p in ("not enlarged", "are sharp", "within normal limits", "is normal"))


def _report_records(n, seed=0, split="train"):
    cfg = cp.CXRPhantomConfig(seed=seed)
    return [(cp.sample_study(cfg, i, split), cp.manifest_record(cfg, cp.sample_study(cfg, i, split))) for i in range(n)]


def test_reports_name_their_positives_and_only_labelled_classes():
    uncertain = sections = 0
    for study, r in _report_records(400):
        labels = r["labels"]
        sentences = _sentences(r["findings"]) + _sentences(r["impression"])
        assert sentences and labels
        named = collections.defaultdict(list)
        for s in sentences:
            assert not any(w in s.lower() for w in OTHER_BANK_CLASSES), s
            for c in _classes_named(s):
                assert c in labels, (s, labels)   # never a class the labels leave out
                named[c].append(s)
        truth = study.truth()
        for c, v in labels.items():
            if c == "no finding":
                assert v == 1 and truth == {**dict.fromkeys(FINDINGS, 0), "no finding": 1}
                continue
            assert named[c] and v == truth[c], (c, v, sentences)
            if v == 1:
                assert all(not _negated(s) and not any(h in s.lower() for h in HEDGES) for s in named[c]), named[c]
            elif v == -1:
                assert all(any(h in s.lower() for h in HEDGES) for s in named[c]), named[c]
                uncertain += 1
            else:
                assert all(_negated(s) for s in named[c]), named[c]
        assert all(truth[f] == 0 or f in labels for f in FINDINGS)   # every positive or uncertain is reported
        sections += (r["findings"] is None) + (r["impression"] is None)
    assert uncertain >= 10 and 20 <= sections <= 100   # hedges; ~15 % of reports with one section


def test_reports_paraphrase_and_never_copy_the_prompt_bank():
    bank = load_bank()
    bank_sentences = {s.lower() for p in bank.values() for s in (*p.pos, *p.neg, *p.unc)}
    seen = collections.defaultdict(set)
    for study, r in _report_records(1500, seed=1):
        for s in _sentences(r["findings"]) + _sentences(r["impression"]):
            assert s.lower() not in bank_sentences, s
            for c in _classes_named(s):
                seen[(c, r["labels"][c])].add(re.sub(r"\d+(\.\d+)?|right|left|bilateral|both|small|moderate|large|"
                                                     r"mild|marked|upper|middle|lower", "#", s))
    for c in FINDINGS:
        assert len(seen[(c, 1)]) >= 3 and len(seen[(c, 0)]) >= 3 and len(seen[(c, -1)]) >= 2, c


def test_val_and_test_report_studies_carry_all_eight_labels():
    for split in ("val", "test"):
        for study, r in _report_records(30, seed=2, split=split):
            assert r["findings"] or r["impression"]
            assert r["labels"] == study.truth() and list(r["labels"]) == list(CLASSES)


def test_label_only_studies_have_no_report_and_some_uncertain_labels():
    cfg = cp.CXRPhantomConfig(seed=4)
    records = [cp.manifest_record(cfg, cp.sample_study(cfg, i, "train", label_only=True)) for i in range(80)]
    values = collections.Counter()
    for r in records:
        assert r["findings"] is None and r["impression"] is None
        assert list(r["labels"]) == list(CLASSES)
        others = [r["labels"][f] for f in FINDINGS]
        assert r["labels"]["no finding"] == int(all(v == 0 for v in others))
        values.update(others)
    assert values[-1] >= 3 and values[1] >= 10 * values[-1] / 3   # -1: ~10 % of positives


def test_views_prevalence_and_co_occurrence():
    cfg = cp.CXRPhantomConfig(seed=0)
    studies = [cp.sample_study(cfg, i) for i in range(1500)]
    n_views = collections.Counter(len(s.views) for s in studies)
    assert set(n_views) == {1, 2, 3}
    assert all(abs(n_views[k] / 1500 - p) < 0.05 for k, p in ((1, 0.4), (2, 0.4), (3, 0.2))), n_views
    assert all(set(s.views) <= {"PA", "AP", "LATERAL"} for s in studies)
    truth = [s.truth() for s in studies]
    prevalence = {c: sum(t[c] != 0 for t in truth) / 1500 for c in CLASSES}
    assert 0.2 <= prevalence["no finding"] <= 0.32, prevalence
    assert all(0.14 <= prevalence[f] <= 0.32 for f in FINDINGS), prevalence
    with_cm = [t for t in truth if t["cardiomegaly"] == 1]
    assert sum(t["edema"] != 0 for t in with_cm) / len(with_cm) > prevalence["edema"] + 0.1   # co-occurrence
    splits, label_only = cp.assignments(cp.CXRPhantomConfig(num_studies=1000, seed=0))
    assert collections.Counter(splits) == {"train": 800, "val": 100, "test": 100} and sum(label_only) == 300


# --- the folder ------------------------------------------------------------------------------------------

def test_reuse_keeps_files_and_another_config_is_refused(small, tmp_path):
    cfg, out, manifest = small
    before, messages = _digest(out), []
    assert cp.generate_cxr_phantom(out, cfg, log=messages.append) == manifest
    assert "reusing" in messages[0] and _digest(out) == before
    with pytest.raises(cp.CXRPhantomFolderError) as e:
        cp.generate_cxr_phantom(out, cp.CXRPhantomConfig(num_studies=10, seed=4, image_size=64), **QUIET)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    for part in ("10 studies (seed 3)", "differs in seed", "empty or new folder"):
        assert part in str(e.value), str(e.value)
    assert _digest(out) == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.csv").write_text("x\n")
    with pytest.raises(cp.CXRPhantomFolderError, match="not written by"):
        cp.generate_cxr_phantom(tmp_path / "foreign", cfg, **QUIET)
    # Interrupted (marker, no phantom.json): redone in place.
    part = tmp_path / "part"
    (part / "images").mkdir(parents=True)
    (part / cp.MARKER_FILE).write_text("")
    (part / "images" / "stale.png").write_bytes(b"x")
    small_cfg = cp.CXRPhantomConfig(num_studies=2, seed=3, image_size=64)
    assert len(_lines(cp.generate_cxr_phantom(part, small_cfg, **QUIET))) == 2
    assert not (part / "images" / "stale.png").exists() and (part / "phantom.json").is_file()


def test_config_validation():
    for bad in (dict(num_studies=0), dict(label_only_fraction=1.5), dict(image_size=16),
                dict(val_fraction=0.5, test_fraction=0.5), dict(workers=-1)):
        with pytest.raises(ValueError):
            cp.CXRPhantomConfig(**bad)
