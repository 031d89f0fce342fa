"""The phantom generator: determinism, real affines, and every finding present in image and text."""

from __future__ import annotations

import hashlib
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest

from vljax.data import phantom as ph
from vljax.data.phantom import generator
from vljax.data.phantom import anatomy
from vljax.data.phantom import signs
from vljax.data.phantom import text
from vljax.data.findings import FINDING_SECTION, FINDINGS
from vljax.data.manifest import load_manifest
from vljax.data.reports import split_sections

from tests.conftest import SMALL_PHANTOM


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(tmp_path, phantom_dir):
    cfg2 = ph.PhantomConfig(num_studies=SMALL_PHANTOM.num_studies, seed=SMALL_PHANTOM.seed, workers=2)
    ph.generate_phantom(tmp_path / "b", cfg2, log=lambda *_: None)
    a, b = _digest(phantom_dir), _digest(tmp_path / "b")
    assert len(a) == SMALL_PHANTOM.num_studies + 7
    assert a == b


def test_different_seed_differs():
    s0 = ph.sample_spec(ph.PhantomConfig(seed=0), 0)
    s1 = ph.sample_spec(ph.PhantomConfig(seed=1), 0)
    v0, v1 = ph.render_study(s0)[0], ph.render_study(s1)[0]
    assert s0 != s1
    assert v0.shape != v1.shape or not np.array_equal(v0, v1)
    assert ph.report_for(s0) != ph.report_for(s1)


def test_reuse_keeps_files_and_another_config_is_refused_not_regenerated(tmp_path):
    cfg = ph.PhantomConfig(num_studies=3, seed=1, workers=1)
    ph.generate_phantom(tmp_path, cfg, log=lambda *_: None)
    before = _digest(tmp_path)
    msgs = []
    ph.generate_phantom(tmp_path, cfg, log=msgs.append)
    assert "reusing" in msgs[0] and _digest(tmp_path) == before
    # A complete phantom of another config (a user's own, given as --config.data.dir) is kept: one line
    # says what is there and what to do; it is a ValueError so the commands print it without a traceback.
    with pytest.raises(generator.PhantomFolderError) as e:
        ph.generate_phantom(tmp_path, ph.PhantomConfig(num_studies=1000, seed=0, workers=1), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError) and isinstance(e.value, FileExistsError)
    for part in ("complete phantom of 3 studies (seed 1)", "1000 studies, seed 0", "num_studies, seed",
                 "empty or new folder", "--config.data.dir", f"delete {tmp_path}"):
        assert part in msg, msg
    assert _digest(tmp_path) == before
    # An explicit request to regenerate (tools/make_phantom.py --force) replaces it.
    ph.generate_phantom(tmp_path, ph.PhantomConfig(num_studies=4, seed=1, workers=1), reuse=False,
                        log=lambda *_: None)
    assert len(list((tmp_path / ph.IMAGES_DIR).iterdir())) == 4


def test_an_interrupted_generation_is_regenerated(tmp_path):
    """Marker but no info file: a generation of ours that stopped part-way; it is redone in place."""
    cfg = ph.PhantomConfig(num_studies=2, seed=4, workers=1)
    (tmp_path / ph.IMAGES_DIR).mkdir()
    (tmp_path / ph.MARKER_FILE).write_text("written by vljax.data.phantom\n")
    (tmp_path / ph.IMAGES_DIR / "PH000000.nii.gz").write_bytes(b"half-written")
    (tmp_path / ph.INFO_FILE).write_text('{"config": {"num_st')  # cut short while being written
    info = ph.generate_phantom(tmp_path, cfg, log=lambda *_: None)
    assert info["config"] == cfg.identity()
    assert len(load_manifest(tmp_path)) == 2


def test_never_overwrites_a_folder_it_did_not_write(tmp_path):
    real = tmp_path / "merlin"
    (real / ph.IMAGES_DIR).mkdir(parents=True)
    (real / ph.IMAGES_DIR / "AC123.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not written by the phantom generator"):
        ph.generate_phantom(real, ph.PhantomConfig(num_studies=2, workers=1), log=lambda *_: None)
    assert (real / ph.IMAGES_DIR / "AC123.nii.gz").read_bytes() == b"precious"


def test_files_are_int16_hu_with_real_affines_and_varied_geometry(phantom_dir):
    m = load_manifest(phantom_dir)
    cfg = SMALL_PHANTOM
    codes, spacings = set(), set()
    for r in m.records[:12]:
        img = nib.load(r.image)
        assert img.get_data_dtype() == np.int16
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        spec = ph.sample_spec(cfg, int(r.study_id[2:]))
        codes.add("".join(nib.aff2axcodes(img.affine)))
        assert "".join(nib.aff2axcodes(img.affine)) == spec.axcodes
        spacings.add(tuple(np.round(img.header.get_zooms(), 3)))
        # Re-orienting the stored file to RAS gives back the canonical rendering at the same world
        # positions: the affine is consistent with the voxel order.
        can = nib.as_closest_canonical(img)
        np.testing.assert_allclose(can.affine, ph.canonical_affine(spec), atol=1e-4)
        hu = np.asarray(can.dataobj)
        expected = np.clip(np.rint(ph.render_canonical(spec)), -1024, 3071).astype(np.int16)
        np.testing.assert_array_equal(hu, expected)
        assert hu.min() < -900 and hu.max() > 600  # air outside, bone inside
    assert len(codes) >= 3 and len(spacings) >= 3


def _changed_centroid(spec, finding):
    base = ph.render_canonical(spec, positives=())
    pos = ph.render_canonical(spec, positives=(finding,))
    diff = np.abs(pos - base)
    changed = diff > 40.0
    idx = np.argwhere(changed)
    world = np.asarray(spec.origin) + idx * np.asarray(spec.spacing)
    return int(changed.sum()), world.mean(axis=0) if len(idx) else None, float(diff.max())


def _male_spec(signs: str = "designed"):
    cfg = ph.PhantomConfig(seed=3, signs=signs)
    i = next(i for i in range(50) if ph.sample_spec(cfg, i).sex == "M")
    return ph.sample_spec(cfg, i)


# Where on the body each finding must change the image (world RAS mm; zd = diaphragm height).
REGION = {
    "lower_thorax": lambda c, zd: c[2] > zd - 30,
    "liver": lambda c, zd: c[0] > 0 and zd - 170 < c[2] < zd + 40,
    "gallbladder": lambda c, zd: c[0] > 20 and c[2] < zd - 40,
    "spleen": lambda c, zd: c[0] < -40,
    "pancreas": lambda c, zd: abs(c[2] - (zd - 90)) < 40,
    "kidneys": lambda c, zd: c[1] < 0 and c[2] < zd - 60,
    "bowel": lambda c, zd: True,  # hiatal hernia is above, appendicitis below: checked per finding
    "peritoneum": lambda c, zd: c[2] < zd + 10,
    "pelvic": lambda c, zd: c[2] < -130,
    "circulatory": lambda c, zd: abs(c[0]) < 70 and c[2] < zd,
    "lymph_nodes": lambda c, zd: c[2] < zd - 60,
    "musculoskeletal": lambda c, zd: c[1] < 0 or abs(c[0]) > 60,
}


@pytest.mark.parametrize("signs", ["designed", "anatomic"])
@pytest.mark.parametrize("finding", FINDINGS)
def test_every_finding_changes_the_volume_where_expected(finding, signs):
    spec = _male_spec(signs)
    zd = anatomy.sample_anatomy(generator._rng(spec.seed, spec.index, 1), spec.sex)["zd"]
    n, centroid, peak = _changed_centroid(spec, finding)
    voxel_mm3 = float(np.prod(spec.spacing))
    # At least ~4 cm^3 of tissue visibly changed (> 40 HU), or a small but very dense change
    # (stones, calcifications, clips: > 300 HU).
    assert n * voxel_mm3 > 4000 or (n >= 2 and peak > 300), (finding, n, peak)
    assert REGION[FINDING_SECTION[finding]](centroid, zd), (finding, centroid, zd)
    if finding == "hiatal hernia":
        assert centroid[2] > zd
    if finding == "appendicitis":
        assert centroid[0] > 40 and centroid[2] < -60


def _pattern(template: str, negated: bool = False) -> re.Pattern:
    parts = re.split(r"\{[A-Za-z]+\}", template)
    body = r"(?:[^.]|\.\d)+?".join(re.escape(p) for p in parts)  # a filled value: no sentence end
    # whole sentences only; a positive sentence never starts with "No"
    return re.compile(r"(?:^|(?<=[.:] ))" + ("" if negated else r"(?!no )") + body, re.IGNORECASE)


PATTERNS = {f: ([_pattern(t) for t in pos], [_pattern(t, negated=True) for t in neg]) for f, (pos, neg) in text.PHRASES.items()}


def test_every_finding_is_written_in_its_section_with_paraphrases_and_negations():
    cfg = ph.PhantomConfig(seed=11)
    seen_pos = {f: set() for f in FINDINGS}
    seen_neg = {f: 0 for f in FINDINGS}
    for i in range(400):
        spec = ph.sample_spec(cfg, i)
        findings, impression = ph.report_for(spec)
        secs = split_sections(findings, spec.study_id)
        assert not secs.unknown_headers or set(secs.unknown_headers) <= {h for h in text.UNKNOWN_HEADERS}
        for f in FINDINGS:
            section = secs.sections[FINDING_SECTION[f]]
            pos_pats, neg_pats = PATTERNS[f]
            label = spec.labels[f]
            hit_pos = [k for k, p in enumerate(pos_pats) if p.search(section)]
            hit_neg = [k for k, p in enumerate(neg_pats) if p.search(section)]
            if label == 1:
                assert hit_pos, (spec.study_id, f)
                seen_pos[f].update(hit_pos)
                assert _pattern(text.PHRASES[f][0][0]).search(impression)
            elif label == 0:
                assert hit_neg and not hit_pos, (spec.study_id, f)
                seen_neg[f] += 1
            else:
                assert not hit_pos and not hit_neg, (spec.study_id, f)
                assert not any(p.search(findings) for p in pos_pats + neg_pats), (spec.study_id, f)
    for f in FINDINGS:
        assert len(seen_pos[f]) >= 2, f"{f}: fewer than two paraphrases used"
        assert seen_neg[f] > 0, f"{f}: never negated"


def test_prevalences_are_imbalanced_like_real_data(phantom_dir):
    cfg = ph.PhantomConfig(seed=5)
    specs = [ph.sample_spec(cfg, i) for i in range(3000)]
    rate = {f: np.mean([s.labels[f] == 1 for s in specs]) for f in FINDINGS}
    assert max(rate.values()) < 0.45 and min(rate.values()) > 0.01
    assert sum(r < 0.1 for r in rate.values()) >= 18  # most findings rare
    # label -1 (not mentioned) is common, as in Merlin's regex-derived labels
    assert np.mean([s.labels[f] == -1 for s in specs for f in FINDINGS]) > 0.3
    assert all(s.labels["prostatomegaly"] == -1 for s in specs if s.sex == "F")
    splits = [s.split for s in specs]
    assert abs(splits.count("train") / 3000 - 0.6) < 0.05


def test_config_validation():
    with pytest.raises(ValueError, match="num_studies"):
        ph.PhantomConfig(num_studies=0)
    with pytest.raises(ValueError, match="spacing"):
        ph.PhantomConfig(spacing=(0.0, 1.0, 1.0))


@pytest.mark.parametrize("finding", FINDINGS)
def test_every_anatomic_finding_survives_preprocessing_at_a_finer_geometry(finding):
    """The anatomic profile at 7x7x10 mm -> 64x64x48, window [-1000, 1000] (an accelerator-size input)."""
    from vljax.data.ct import CTPreprocessConfig, preprocess_volume

    spec = _male_spec("anatomic")
    cfg = CTPreprocessConfig(spacing=(7.0, 7.0, 10.0), shape=(64, 64, 48))
    out = []
    for positives in ((), (finding,)):
        hu = ph.render_canonical(spec, positives=positives)
        data, affine = ph.to_storage(np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
                                     ph.canonical_affine(spec), spec.axcodes)
        out.append(preprocess_volume(data.astype(np.float32), affine, cfg))
    diff = np.abs(out[1] - out[0])
    # > 20 HU (0.01 of the window) over several voxels, or a dense focal change (> 150 HU)
    assert (diff > 0.01).sum() >= 8 or diff.max() > 0.075, (finding, int((diff > 0.01).sum()), float(diff.max()))


# ------------------------------------------------------------------------------------------------
# The signs table (vljax/data/phantom/signs.py): one table drives what is drawn and what is written.
# ------------------------------------------------------------------------------------------------
def _default_geometry_volume(spec, positives):
    """What the phantom default's model sees: 18x18x24 mm voxels, 24x24x16, window [-200, 300]."""
    from vljax.data.ct import CTPreprocessConfig, preprocess_volume

    cfg = CTPreprocessConfig(spacing=(18.0, 18.0, 24.0), shape=(24, 24, 16), hu_window=(-200.0, 300.0))
    hu = ph.render_canonical(spec, positives=positives)
    data, affine = ph.to_storage(np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
                                 ph.canonical_affine(spec), spec.axcodes)
    return preprocess_volume(data.astype(np.float32), affine, cfg)


def test_signs_table_covers_every_finding_in_both_profiles():
    assert set(signs.DESIGNED) == set(signs.ANATOMIC) == set(FINDINGS)
    for f in FINDINGS:
        d, a = signs.DESIGNED[f], signs.ANATOMIC[f]
        assert d.drawn == a.drawn  # the same change, only larger / denser / more of it
        assert abs(d.hu_change[0]) >= abs(a.hu_change[0]) or d.hu_change == a.hu_change, f
    with pytest.raises(ValueError, match="signs profile"):
        ph.PhantomConfig(signs="cartoon")


def test_designed_findings_are_visible_at_the_phantom_default_geometry():
    """Every designed finding changes several voxels by > 0.1 (50 HU in the window) in every study
    at 18 mm voxels, and changes the input more than its anatomic rendering does."""
    l1 = {p: {f: [] for f in FINDINGS} for p in ("designed", "anatomic")}
    for profile in l1:
        cfg = ph.PhantomConfig(seed=3, signs=profile)
        specs = [s for s in (ph.sample_spec(cfg, i) for i in range(30)) if s.sex == "M"][:4]
        for spec in specs:
            base = _default_geometry_volume(spec, ())
            for f in FINDINGS:
                d = np.abs(_default_geometry_volume(spec, (f,)) - base)
                l1[profile][f].append(float(d.sum()))
                if profile == "designed":
                    assert (d > 0.1).sum() >= 2, (f, spec.study_id, int((d > 0.1).sum()))
    for f in FINDINGS:
        assert np.mean(l1["designed"][f]) > np.mean(l1["anatomic"][f]) * 0.99, (f, l1["designed"][f], l1["anatomic"][f])


def _mentioned_positive(findings_text: str, study_id: str) -> set[str]:
    secs = split_sections(findings_text, study_id)
    return {f for f in FINDINGS if any(p.search(secs.sections[FINDING_SECTION[f]]) for p in PATTERNS[f][0])}


@pytest.mark.parametrize("profile", ["designed", "anatomic"])
def test_what_is_drawn_is_written_in_its_section_and_vice_versa(profile):
    """For each study: the findings whose removal changes the image are exactly the findings the
    report describes as present, each in its own section, and quoted sizes are the drawn ones."""
    cfg = ph.PhantomConfig(seed=21, signs=profile)
    table = signs.signs_for(profile)
    checked, quotes = set(), 0
    for i in range(40):
        spec = ph.sample_spec(cfg, i)
        if not spec.positives:
            continue
        full = ph.render_canonical(spec)
        # Removing a finding that is not positive leaves the same arguments, so the same image: only the
        # positives need rendering without themselves.
        drawn = {f for f in spec.positives
                 if not np.array_equal(ph.render_canonical(spec, positives=tuple(g for g in spec.positives if g != f)), full)}
        findings_text, _ = ph.report_for(spec)
        assert drawn == set(spec.positives) == _mentioned_positive(findings_text, spec.study_id), spec.study_id
        anat, fp = generator._geometry(spec)
        sizes = signs.drawn_sizes_cm(anat, fp)
        checked.update(spec.positives)
        for f in set(spec.positives) & {"renal cyst", "prostatomegaly", "abdominal aortic aneurysm", "lymphadenopathy"}:
            lo, hi = table[f].size_mm  # diameters: the drawn size is within the table's range
            assert lo / 10 - 1e-9 <= sizes[f] <= hi / 10 + 1e-9, (f, sizes[f])
        # every size a report quotes is the drawn size of one of its positive findings
        quoted = set(re.findall(r"(\d+\.\d) cm", findings_text))
        assert quoted <= {f"{sizes[f]:.1f}" for f in spec.positives if f in sizes}, (spec.study_id, quoted)
        quotes += len(quoted)
    assert len(checked) >= 15 and quotes >= 3


def test_build_notes_hold_the_designed_signs_table():
    notes = pathlib.Path(__file__).resolve().parents[2] / "BUILD_NOTES.md"
    assert signs.markdown_table("designed") in notes.read_text(), (
        "BUILD_NOTES.md must hold the current table: python -c 'from vljax.data.phantom import signs as s; "
        "print(s.markdown_table())'")
