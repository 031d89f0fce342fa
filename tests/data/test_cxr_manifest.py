"""Chest X-ray manifests: tiny fake MIMIC-CXR-JPG, CheXpert, ChestX-ray14 and JSONL layouts read into
exact study records; JSONL round trip, concatenation, and every validation error (study id named, report
text never shown)."""

from __future__ import annotations

import gzip
import json
import os
import zipfile

import pytest
from PIL import Image

from vljax.data import cxr_datasets, manifest
from vljax.data import cxr_manifest as cm
from vljax.data.cxr_manifest import CXRImage, CXRStudy
from vljax.data.manifest import ManifestError

SECRET = "Zanzibar"   # in every report: must never appear in an error message
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")
CHEXPERT_14 = CHEXPERT_HEADER.split(",")[5:]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def _image(path, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 128).save(path, fmt)
    return str(path)


def _write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _chexpert_row(path, view, ap_pa, **labels):
    cells = [labels.get(c.lower().replace(" ", "_"), "") for c in CHEXPERT_14]
    return ",".join([path, "Female", "60", view, ap_pa, *cells])


# ------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ------------------------------------------------------------------------------------------------
REPORT_1 = f"""                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough, r/o {SECRET}.

 FINDINGS:
 PA and lateral views of the chest.  Heart size is
 mildly enlarged.
 LUNGS: no effusion.

 IMPRESSION:  Mild cardiomegaly.
 NOTIFICATION:  Findings discussed with Dr. ___.
"""
REPORT_2 = f"IMPRESSION: No acute cardiopulmonary process. {SECRET}.\n"


def _mimic(tmp_path, reports="sibling"):
    """Two studies of patient 10000032 (one with PA + LATERAL), one of patient 11000011."""
    root = tmp_path / "mimic-cxr-jpg"
    studies = [("10000032", "50000001", [("d1", "PA"), ("d2", "LATERAL")], "train"),
               ("10000032", "50000002", [("d3", "AP")], "validate"),
               ("11000011", "50000003", [("d4", "")], "test")]
    meta, split = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns"], \
        ["dicom_id,study_id,subject_id,split"]
    for subject, study, views, s in studies:
        for dicom, view in views:
            meta.append(f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},4,4")
            split.append(f"{dicom},{study},{subject},{s}")
            _image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    _write(root / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta) + "\n", gz=True)
    _write(root / "mimic-cxr-2.0.0-split.csv.gz", "\n".join(split) + "\n", gz=True)
    labels = ["subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
              "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
              "Pneumothorax,Support Devices",
              "10000032,50000001,,1.0,,-1.0,,,,,,0.0,,,,",
              "10000032,50000002,,,,,,,,,1.0,,,,,",
              "11000011,50000003,,,,,,,,,,,,,,"]
    _write(root / "mimic-cxr-2.0.0-chexpert.csv", "\n".join(labels) + "\n")
    texts = {"p10/p10000032/s50000001.txt": REPORT_1, "p10/p10000032/s50000002.txt": REPORT_2,
             "p11/p11000011/s11111111.txt": REPORT_2}   # s50000003 has no report (and no labels)
    where = {"sibling": tmp_path / "mimic-cxr-reports" / "files", "inside": root / "files",
             "argument": tmp_path / "elsewhere" / "files"}.get(reports)
    if reports == "zip":
        with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w") as z:
            for rel, text in texts.items():
                z.writestr(f"files/{rel}", text)
    else:
        for rel, text in texts.items():
            _write(where / rel, text)
    return root


def _mimic_expected(root):
    f = root / "files"
    return [CXRStudy("s50000001", "train",
                     (CXRImage(str(f / "p10/p10000032/s50000001/d1.jpg"), "PA"),
                      CXRImage(str(f / "p10/p10000032/s50000001/d2.jpg"), "LATERAL")),
                     findings="PA and lateral views of the chest. Heart size is mildly enlarged.",
                     impression="Mild cardiomegaly.",
                     labels=(("cardiomegaly", 1), ("pleural effusion", 0), ("edema", -1)),
                     source="mimic-cxr", patient_id="p10000032"),
            CXRStudy("s50000002", "val", (CXRImage(str(f / "p10/p10000032/s50000002/d3.jpg"), "AP"),),
                     impression=f"No acute cardiopulmonary process. {SECRET}.", labels=(("no finding", 1),),
                     source="mimic-cxr", patient_id="p10000032")]


@pytest.mark.parametrize("reports", ["sibling", "zip", "argument", "inside"])
def test_mimic_groups_views_into_studies_with_sections_labels_and_splits(tmp_path, reports):
    root = _mimic(tmp_path, reports)
    options = {"reports_dir": tmp_path / "elsewhere"} if reports == "argument" else {}
    m, problems = cm.read_cxr_manifest(root, **options)
    assert list(m.records) == _mimic_expected(root)
    assert m.classes == ("no finding", "cardiomegaly", "pleural effusion", "edema")   # bank order
    assert m.root == str(root)
    # s50000003: no report, all labels blank -> one empty-study problem; its report text is not shown
    assert [(p.kind, p.study_id) for p in problems] == [(cm.EMPTY_STUDY, "s50000003")]
    assert "s50000003.txt" in problems[0].message
    with pytest.raises(ManifestError, match="s50000003"):
        cm.load_cxr_manifest(root, **options)


def test_report_sections():
    assert cxr_datasets.report_sections(REPORT_1) == ("PA and lateral views of the chest. Heart size is mildly enlarged.",
                                            "Mild cardiomegaly.")
    assert cxr_datasets.report_sections("FINDINGS: a.\nIMPRESSION: b.\nFINDINGS: c.") == ("a. c.", "b.")
    assert cxr_datasets.report_sections("Comparison none. FINDINGS: Clear lungs.  IMPRESSION:  Normal.") == (
        "Clear lungs.", "Normal.")
    assert cxr_datasets.report_sections("FINDINGS AND IMPRESSION: Normal chest.") == ("Normal chest.", None)
    assert cxr_datasets.report_sections("FINDINGS:\n\nIMPRESSION: \nWET READ: x") == (None, None)
    assert cxr_datasets.report_sections("Findings: lower-case headers are not headers.") == (None, None)


# ------------------------------------------------------------------------------------------------
# CheXpert
# ------------------------------------------------------------------------------------------------
def _chexpert(tmp_path, name="CheXpert-v1.0-small"):
    root = tmp_path / name
    p = "CheXpert-v1.0-small"
    train = [CHEXPERT_HEADER,
             _chexpert_row(f"{p}/train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
                           cardiomegaly="1.0", edema="-1.0", pleural_effusion="0.0"),
             _chexpert_row(f"{p}/train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
                           cardiomegaly="1.0", edema="-1.0", pleural_effusion="0.0"),
             _chexpert_row(f"{p}/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", no_finding="1.0"),
             _chexpert_row(f"{p}/train/patient00002/study2/view1_lateral.jpg", "Lateral", "LL", fracture="1.0")]
    valid = [CHEXPERT_HEADER,
             _chexpert_row(f"{p}/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "",
                           **{c.lower().replace(" ", "_"): "0.0" for c in CHEXPERT_14})]
    _write(root / "train.csv", "\n".join(train) + "\n")
    _write(root / "valid.csv", "\n".join(valid) + "\n")
    for row in train[1:] + valid[1:]:
        _image(root.joinpath(*row.split(",")[0].split("/")[1:]))
    return root


def test_chexpert_groups_rows_keeps_uncertain_and_leaves_blanks_missing(tmp_path):
    root = _chexpert(tmp_path)
    m = cm.load_cxr_manifest(root)
    t = str(root / "train")
    assert list(m.records[:3]) == [
        CXRStudy("patient00001_study1", "train", (CXRImage(f"{t}/patient00001/study1/view1_frontal.jpg", "AP"),
                                                  CXRImage(f"{t}/patient00001/study1/view2_lateral.jpg", "LATERAL")),
                 labels=(("cardiomegaly", 1), ("pleural effusion", 0), ("edema", -1)), source="chexpert",
                 patient_id="patient00001"),
        CXRStudy("patient00002_study1", "train", (CXRImage(f"{t}/patient00002/study1/view1_frontal.jpg", "PA"),),
                 labels=(("no finding", 1),), source="chexpert", patient_id="patient00002"),
        CXRStudy("patient00002_study2", "train", (CXRImage(f"{t}/patient00002/study2/view1_lateral.jpg", "LL"),),
                 labels=(("fracture", 1),), source="chexpert", patient_id="patient00002")]
    val = m.records[3]
    assert (val.study_id, val.split, val.images[0].view) == ("patient64541_study1", "val", "UNKNOWN")
    assert val.label_dict() == {cm._bank_class(c): 0 for c in CHEXPERT_14} and len(val.labels) == 14
    assert not any(r.has_report for r in m.records)
    # a renamed folder still resolves the release's paths
    renamed = tmp_path / "chexpert_renamed"
    os.rename(root, renamed)
    assert cm.load_cxr_manifest(renamed).records[0].images[0].path == str(
        renamed / "train/patient00001/study1/view1_frontal.jpg")


def test_seeded_patient_split_is_deterministic_and_keeps_patients_together(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rows = [CHEXPERT_HEADER] + [_chexpert_row(f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/view1_frontal.jpg",
                                              "Frontal", "PA", no_finding="1.0") for p in range(60) for s in (1, 2)]
    _write(root / "train.csv", "\n".join(rows) + "\n")
    m = cm.load_cxr_manifest(root, check_images=False, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    by_patient = {}
    for r in m.records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
        assert r.split == cm.patient_split(r.patient_id, 3, 0.2, 0.2)
    assert all(len(s) == 1 for s in by_patient.values())
    counts = {s: len(m.split(s)) // 2 for s in cm.CXR_SPLITS}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert [r.split for r in cm.load_cxr_manifest(root, check_images=False).records] == ["train"] * 120
    with pytest.raises(ValueError, match="reports_dir"):
        cm.load_cxr_manifest(root, check_images=False, reports_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# ChestX-ray14 (NIH)
# ------------------------------------------------------------------------------------------------
def _nih(tmp_path):
    root = tmp_path / "chestx-ray14"
    rows = [NIH_HEADER, "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143,",
            "00000001_001.png,No Finding,1,1,58,M,AP,2894,2729,0.143,0.143,",
            "00000002_000.png,Pleural_Thickening|Infiltration|Nodule,0,2,81,F,PA,2500,2048,0.171,0.171,"]
    _write(root / "Data_Entry_2017_v2020.csv", "\n".join(rows) + "\n")
    _write(root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n")
    _write(root / "test_list.txt", "00000002_000.png\n")
    _image(root / "images_001" / "images" / "00000001_000.png", "PNG")
    _image(root / "images_001" / "images" / "00000001_001.png", "PNG")
    _image(root / "images_002" / "images" / "00000002_000.png", "PNG")
    return root


def test_chestxray14_pipe_labels_no_finding_and_split_lists(tmp_path):
    root = _nih(tmp_path)
    m = cm.load_cxr_manifest(root)
    nih = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion", "emphysema", "fibrosis",
           "hernia", "infiltration", "mass", "nodule", "pleural thickening", "pneumonia", "pneumothorax"]
    assert m.classes == tuple(c for c in cm.bank_classes() if c in nih + ["no finding"])
    a, b, c = m.records
    assert (a.study_id, a.split, a.patient_id, a.source) == ("00000001_000", "train", "1", "chestx-ray14")
    assert a.images == (CXRImage(str(root / "images_001/images/00000001_000.png"), "PA"),)
    assert {k for k, v in a.labels if v == 1} == {"cardiomegaly", "pleural effusion"} and len(a.labels) == 15
    assert b.label_dict()["no finding"] == 1 and sum(dict(b.labels).values()) == 1 and b.images[0].view == "AP"
    assert {k for k, v in c.labels if v == 1} == {"pleural thickening", "infiltration", "nodule"}
    assert c.split == "test" and c.label_dict()["no finding"] == 0
    # val by patient: both images of patient 1 move together, test stays test
    for seed in range(20):
        splits = [r.split for r in cm.load_cxr_manifest(root, val_fraction=0.5, split_seed=seed).records]
        assert splits[0] == splits[1] and splits[2] == "test"
    with pytest.raises(ValueError, match="test_fraction"):
        cm.load_cxr_manifest(root, test_fraction=0.1)


# ------------------------------------------------------------------------------------------------
# JSONL: reading, round trip, concatenation
# ------------------------------------------------------------------------------------------------
def _jsonl(folder, studies, name="manifest.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(s) + "\n" for s in studies))
    return folder / name


def _study(sid, *views, folder=None, **fields):
    images = [{"path": f"images/{sid}_{k}.png", "view": v} for k, v in enumerate(views)]
    if folder is not None:
        for image in images:
            _image(folder / image["path"], "PNG")
    return {"study_id": sid, "split": "train", "images": images, "findings": None, "impression": None,
            "labels": None, "source": "phantom", "patient_id": None, **fields}


def test_jsonl_reads_the_spec_format(tmp_path):
    d = tmp_path / "ph"
    outside = _image(tmp_path / "elsewhere.png", "PNG")
    rows = [_study("p0001", "PA", "LATERAL", folder=d, findings="Heart normal.", impression="Normal.",
                   labels={"edema": -1, "cardiomegaly": 1, "mass": None}),
            {**_study("p0002", folder=d, split="validation", impression="Clear.", patient_id=7),
             "images": [{"path": outside, "view": "ap"}]}]
    path = _jsonl(d, rows)
    for where in (path, d):   # the file, or the folder holding manifest.jsonl
        m = cm.load_cxr_manifest(where)
        assert m.records == (
            CXRStudy("p0001", "train", (CXRImage(str(d / "images/p0001_0.png"), "PA"),
                                        CXRImage(str(d / "images/p0001_1.png"), "LATERAL")),
                     "Heart normal.", "Normal.", (("cardiomegaly", 1), ("edema", -1)), "phantom"),
            CXRStudy("p0002", "val", (CXRImage(outside, "AP"),), None, "Clear.", None, "phantom", "7"))
        assert m.classes == ("cardiomegaly", "edema") and m.root == str(d)
    assert m.records[0].retrieval_text() == "Heart normal."


def test_write_cxr_jsonl_round_trips_every_layout(tmp_path):
    sources = [_mimic(tmp_path / "a"), _chexpert(tmp_path / "b"), _nih(tmp_path / "c")]
    for k, src in enumerate(sources):
        m, _ = cm.read_cxr_manifest(src)
        for out in (src / "vljax.jsonl", tmp_path / f"out{k}" / "m.jsonl"):   # relative, then absolute paths
            out.parent.mkdir(exist_ok=True)
            cm.write_cxr_jsonl(m, out)
            back = cm.load_cxr_manifest(out)
            assert back.records == m.records and back.classes == m.classes
    first = json.loads((sources[0] / "vljax.jsonl").read_text().splitlines()[0])
    assert first["images"][0]["path"] == "files/p10/p10000032/s50000001/d1.jpg"
    assert first["labels"] == {"cardiomegaly": 1, "pleural effusion": 0, "edema": -1}


def test_load_cxr_manifests_concatenates_and_prefixes_colliding_ids(tmp_path):
    a = _jsonl(tmp_path / "a", [_study("p1", "PA", folder=tmp_path / "a", labels={"edema": 1}),
                                _study("p2", "PA", folder=tmp_path / "a", impression="x")])
    b = _jsonl(tmp_path / "b", [_study("p1", "AP", folder=tmp_path / "b", labels={"cardiomegaly": 0})])
    c = _chexpert(tmp_path)
    m = cm.load_cxr_manifests([a, b, c])
    assert [r.study_id for r in m.records[:3]] == ["phantom0:p1", "p2", "phantom1:p1"]
    assert m.records[3].study_id == "patient00001_study1" and len(m) == 3 + 4
    assert m.classes == tuple(c for c in cm.bank_classes() if c in set(m.classes))
    assert {"edema", "cardiomegaly", "fracture", "no finding"} <= set(m.classes)
    assert m.root == str(tmp_path)
    d = _jsonl(tmp_path / "d", [{**_study("p1", "PA", folder=tmp_path / "d", labels={"edema": 1}), "source": "x"}])
    assert [r.study_id for r in cm.load_cxr_manifests([a, d]).records] == ["phantom:p1", "p2", "x:p1"]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _assert_problems(exc_or_problems, expected):
    problems = exc_or_problems.details if isinstance(exc_or_problems, ManifestError) else exc_or_problems
    assert sorted((p.kind, p.study_id) for p in problems) == sorted(expected)
    for p in problems:
        assert p.study_id in p.message and SECRET not in p.message
    if isinstance(exc_or_problems, ManifestError):
        assert SECRET not in str(exc_or_problems)


def test_jsonl_errors_are_collected_with_study_ids_and_no_report_text(tmp_path):
    d = tmp_path / "bad"
    ok = dict(findings=f"{SECRET} findings.", impression=f"{SECRET}.")
    rows = [_study("good", "PA", folder=d, **ok),
            _study("missing", "PA", **ok),                                        # image never written
            _study("view", "OBLIQUE", folder=d, **ok),
            _study("label", "PA", folder=d, labels={"edema": 2, "cardiomegaly": "yes"}),
            _study("klass", "PA", folder=d, labels={"unicorn": 1}),
            _study("split", "PA", folder=d, split="holdout", **ok),
            _study("good", "PA", folder=d, **ok),                                 # duplicate id
            _study("noimage", folder=d, **ok),
            _study("notext", "PA", folder=d, findings=" ", labels={}),
            {**_study("typo", "PA", folder=d, **ok), "impresion": f"{SECRET}"}]
    path = _jsonl(d, rows)
    with pytest.raises(ManifestError) as e:
        cm.load_cxr_manifest(path)
    expected = [(cm.MISSING_FILE, "missing"), (cm.UNKNOWN_VIEW, "view"), (cm.BAD_LABEL, "label"),
                (cm.BAD_LABEL, "klass"), (cm.UNKNOWN_SPLIT, "split"), (cm.DUPLICATE_ID, "good"),
                (cm.EMPTY_STUDY, "noimage"), (cm.EMPTY_STUDY, "notext"), (cm.BAD_ROW, "typo")]
    _assert_problems(e.value, expected)
    text = str(e.value)
    assert "'unicorn'" in text and "'edema' is 2" in text and "OBLIQUE" in text and "holdout" in text
    m, problems = cm.read_cxr_manifest(path)
    assert [r.study_id for r in m.records] == ["good"] and len(problems) == len(expected)
    assert cm.MISSING_FILE not in {p.kind for p in cm.read_cxr_manifest(path, check_images=False)[1]}


def test_mimic_errors_name_the_study_and_the_file(tmp_path):
    root = _mimic(tmp_path)
    meta = gzip.decompress((root / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()).decode()
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(gzip.compress(meta.replace(",AP,", ",OBLIQUE,").encode()))
    split = gzip.decompress((root / "mimic-cxr-2.0.0-split.csv.gz").read_bytes()).decode()
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(split.replace("test", "holdout").encode()))
    labels = (root / "mimic-cxr-2.0.0-chexpert.csv").read_text()
    extra_row = "12000000,59999999,,,,,,,,,,,,,,\n"                                 # labels without images
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(labels.replace("-1.0", "2.0") + extra_row)
    os.remove(root / "files/p10/p10000032/s50000001/d2.jpg")
    report = tmp_path / "mimic-cxr-reports/files/p10/p10000032/s50000002.txt"
    report.write_bytes(b"IMPRESSION: \xff" + SECRET.encode())                    # not UTF-8
    with pytest.raises(ManifestError) as e:
        cm.load_cxr_manifest(root)
    _assert_problems(e.value, [(cm.MISSING_FILE, "s50000001"), (cm.BAD_LABEL, "s50000001"),
                               (cm.UNKNOWN_VIEW, "s50000002"), (cm.BAD_ENCODING, "s50000002"),
                               (cm.UNKNOWN_SPLIT, "s50000003"), (manifest.MISSING_ROW, "s59999999")])
    text = str(e.value)
    assert "d2.jpg" in text and "'edema' is '2.0'" in text and "'OBLIQUE'" in text and "'holdout'" in text


def test_unknown_label_columns_and_classes_are_named(tmp_path):
    root = _chexpert(tmp_path)
    train = (root / "train.csv").read_text().replace("Support Devices", "Unicorn Horn")
    (root / "train.csv").write_text(train)
    with pytest.raises(ManifestError, match="unknown label column 'Unicorn Horn'"):
        cm.load_cxr_manifest(root)
    nih = _nih(tmp_path)
    table = nih / "Data_Entry_2017_v2020.csv"
    table.write_text(table.read_text().replace("Cardiomegaly|Effusion", "Cardiomegaly|Unicorn")
                     .replace("Pleural_Thickening|Infiltration", "No Finding|Infiltration"))
    os.remove(nih / "images_001/images/00000001_001.png")
    with pytest.raises(ManifestError) as e:
        cm.load_cxr_manifest(nih)
    _assert_problems(e.value, [(cm.BAD_LABEL, "00000001_000"), (cm.MISSING_FILE, "00000001_001"),
                               (cm.BAD_LABEL, "00000002_000")])
    assert "['Unicorn']" in str(e.value) and "'No Finding' together with findings" in str(e.value)


def test_chexpert_duplicates_views_and_disagreeing_rows(tmp_path):
    root = _chexpert(tmp_path)
    rows = (root / "train.csv").read_text().splitlines()
    rows[3] = rows[3].replace(",PA,", ",XX,")                                    # unknown view
    rows.append(rows[1])                                                          # the same image twice
    rows.append(rows[2].replace("view2", "view3").replace("-1.0", "1.0"))        # views disagree on edema
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    valid = (root / "valid.csv").read_text().replace("patient64541/study1", "patient00002/study2")
    (root / "valid.csv").write_text(valid)                                        # a study in both tables
    _, problems = cm.read_cxr_manifest(root, check_images=False)
    _assert_problems(problems, [(cm.UNKNOWN_VIEW, "patient00002_study1"), (cm.DUPLICATE_ID, "patient00001_study1"),
                                (cm.BAD_LABEL, "patient00001_study1"), (cm.DUPLICATE_ID, "patient00002_study2")])


def test_unrecognised_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        cm.load_cxr_manifest(tmp_path / "nope")
    _chexpert(tmp_path / "wrapper")
    with pytest.raises(ManifestError, match=r"CheXpert-v1.0-small \(chexpert\).*pass that folder"):
        cm.load_cxr_manifest(tmp_path / "wrapper")
    with pytest.raises(ManifestError, match="must be .jsonl"):
        cm.load_cxr_manifest(_write(tmp_path / "x.csv", "a\n"))
