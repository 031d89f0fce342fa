"""Chest X-ray prompt banks: the format's validation, the shipped bank, and label → text expansion
(sentences from the right lists, shuffled, deterministic per seed, two independent draws)."""

from __future__ import annotations

import collections
import fnmatch
import itertools
import json
import pathlib
import re
import tomllib

import numpy as np
import pytest

from vljax.data import cxr_prompts
from vljax.data.cxr_prompts import labels_to_text, load_bank, parse_bank, two_draws, validation_text

PHANTOM_CLASSES = ("cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "edema", "atelectasis",
                   "nodule", "no finding")
KIND_OF_LABEL = {1: "pos", 0: "neg", -1: "unc"}


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text)


def _toy_bank(n_classes=5, n_sentences=4, **kw):
    """Classes c0, c1, ...; sentence k of list `kind` of class c is "C{c} {kind} {k}."."""
    return parse_bank({f"c{c}": {kind: [f"C{c} {kind} {k}." for k in range(n_sentences)]
                                 for kind in ("pos", "neg", "unc")} for c in range(n_classes)}, **kw)


def test_shipped_bank_covers_the_phantom_classes_with_paraphrases():
    bank = load_bank()
    assert set(PHANTOM_CLASSES) <= set(bank)
    owner = collections.Counter()
    for cls, prompts in bank.items():
        assert len(set(prompts.pos)) >= 3 and len(set(prompts.neg)) >= 3, cls
        own_unc = prompts.unc != prompts.pos  # not the fallback (counted once, as "pos")
        for kind in ("pos", "neg", "unc") if own_unc else ("pos", "neg"):
            for s in getattr(prompts, kind):
                # Report-style sentences that split back out of a joined text (see `_sentences`).
                assert s[0].isupper() and s.endswith(".") and ". " not in s, (cls, kind, s)
                owner[s] += 1
    assert max(owner.values()) == 1, [s for s, n in owner.items() if n > 1]  # each sentence names one label
    assert bank["no finding"].unc == bank["no finding"].pos  # no "unc" list in the file: the fallback


def test_shipped_bank_is_package_data():
    """The wheel carries the JSON only if pyproject's package-data matches it (setuptools does not add
    non-Python files on its own)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert (root / "vljax" / "data" / cxr_prompts.DEFAULT_BANK_FILE).is_file()
    assert any(fnmatch.fnmatch(cxr_prompts.DEFAULT_BANK_FILE, g) for g in package_data["vljax.data"])


GOOD = {"pos": ["A."], "neg": ["B."]}


@pytest.mark.parametrize("bank, message", [
    ({}, "non-empty JSON object"),
    ([["edema", GOOD]], "non-empty JSON object"),
    ({"": GOOD}, "class names must be non-empty strings"),
    ({"edema": ["A."]}, "class 'edema': expected an object"),
    ({"edema": {"neg": ["B."]}}, "class 'edema': 'pos' is missing or empty"),
    ({"edema": {"pos": ["A."], "neg": []}}, "class 'edema': 'neg' is missing or empty"),
    ({"edema": {**GOOD, "uncertain": ["C."]}}, r"class 'edema': unknown key\(s\) \['uncertain'\]"),
    ({"edema": {"pos": "A.", "neg": ["B."]}}, "class 'edema': 'pos' must be a list of non-empty sentences"),
    ({"edema": {"pos": ["A.", 3], "neg": ["B."]}}, "class 'edema': 'pos' must be a list"),
    ({"edema": {"pos": ["A."], "neg": ["  "]}}, "class 'edema': 'neg' must be a list"),
    ({"edema": {**GOOD, "unc": None}}, "class 'edema': 'unc' must be a list"),
    ({"cardiomegaly": GOOD, "edema": {"pos": ["A."]}}, "class 'edema'"),
])
def test_bank_format_errors_name_the_class(bank, message):
    with pytest.raises(ValueError, match=message):
        parse_bank(bank)


@pytest.mark.parametrize("text, message", [
    ('{"edema": {"pos": ["A."], "neg": ["B."]}, "edema": {"pos": ["C."], "neg": ["D."]}}',
     r"bank\.json: key 'edema' appears more than once"),
    ('{"edema": {"pos": ["A."], "neg": ["B."], "pos": ["C."]}}', r"class 'edema': key 'pos' appears more than once"),
    ('{"edema": {"pos": ["A."], "neg": ["B."]}', r"bank\.json: not valid JSON \(line 1"),
    ('["edema"]', "non-empty JSON object"),
    ('{"edema": {"pos": [{"text": "A."}], "neg": ["B."]}}', "class 'edema': 'pos' must be a list"),
])
def test_bank_file_errors(tmp_path, text, message):
    path = tmp_path / "bank.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_bank(path)


def test_a_bank_file_round_trips(tmp_path):
    raw = {"edema": {"pos": [" Edema. "], "neg": ["No edema."], "unc": ["Possible edema."]},
           "nodule": {"pos": ["A nodule."], "neg": ["No nodule."]}}
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(raw))
    bank = load_bank(path)
    assert list(bank) == ["edema", "nodule"]
    assert bank["edema"] == (("Edema.",), ("No edema.",), ("Possible edema.",))


def test_missing_or_empty_unc_uses_the_documented_fallback():
    raw = {"a": {"pos": ["A yes."], "neg": ["A no."]}, "b": {"pos": ["B yes."], "neg": ["B no."], "unc": []},
           "c": {"pos": ["C yes."], "neg": ["C no."], "unc": ["C maybe."]}}
    bank = parse_bank(raw)
    assert (bank["a"].unc, bank["b"].unc, bank["c"].unc) == (("A yes.",), ("B yes.",), ("C maybe.",))
    bank = parse_bank(raw, unc_fallback="neg")
    assert (bank["a"].unc, bank["b"].unc, bank["c"].unc) == (("A no.",), ("B no.",), ("C maybe.",))
    assert labels_to_text({"a": -1}, bank, np.random.default_rng(0)) == "A no."
    with pytest.raises(ValueError, match="unc_fallback='skip'"):
        parse_bank(raw, unc_fallback="skip")


def test_each_sentence_comes_from_its_labels_list():
    bank = _toy_bank(n_classes=6)
    used = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        labels = {f"c{c}": [1, 0, -1, None, float("nan")][rng.integers(5)] for c in range(6)}
        labels["c0"] = 1  # at least one labelled class
        text = labels_to_text(labels, bank, np.random.default_rng(1000 + seed))
        expected = {c: KIND_OF_LABEL[v] for c, v in labels.items() if v is not None and v == v}
        got = {}
        for s in _sentences(text):
            cls_num, kind, k = re.fullmatch(r"C(\d) (pos|neg|unc) (\d)\.", s).groups()
            assert f"c{cls_num}" not in got, text  # one sentence per class
            got[f"c{cls_num}"] = kind
            used.add(s)
        assert got == expected, (labels, text)
    assert len(used) == 4 + 5 * 3 * 4  # every sentence of every list is picked (c0 is always positive)


def test_each_sentence_comes_from_its_labels_list_in_the_shipped_bank():
    bank = load_bank()
    where = {s: (cls, kind) for cls, p in bank.items() for kind in ("pos", "neg", "unc")
             for s in getattr(p, kind) if not (kind == "unc" and p.unc == p.pos)}
    labels = {"cardiomegaly": 1, "pleural effusion": 0, "pneumothorax": -1, "edema": None, "nodule": 0}
    for seed in range(50):
        a, b = two_draws(labels, bank, seed, 7, 3)
        for text in (a, b):
            assert sorted(where[s] for s in _sentences(text)) == sorted(
                (c, KIND_OF_LABEL[v]) for c, v in labels.items() if v is not None)


def test_draws_are_a_function_of_seed_study_and_step():
    bank = load_bank()
    labels = {"cardiomegaly": 1, "pleural effusion": 0, "pneumothorax": -1, "consolidation": 0, "edema": 1}
    reordered = dict(reversed(list(labels.items())))
    assert two_draws(labels, bank, 3, 11, 5) == two_draws(reordered, bank, 3, 11, 5)
    assert labels_to_text(labels, bank, np.random.default_rng(9)) == labels_to_text(labels, bank,
                                                                                    np.random.default_rng(9))
    base = two_draws(labels, bank, 3, 11, 5)
    for args in ((4, 11, 5), (3, 12, 5), (3, 11, 6)):  # each of the three seeds matters
        assert two_draws(labels, bank, *args) != base, args
    texts = {two_draws(labels, bank, 0, 0, step)[0] for step in range(50)}
    assert len(texts) >= 45


def test_the_two_draws_are_independent():
    """One class with four sentences: over 2000 studies the (T1, T2) pairs are uniform over the 16
    combinations (chi-square, 15 degrees of freedom: 37.7 is the 0.999 quantile)."""
    bank = _toy_bank(n_classes=1)
    counts = collections.Counter(two_draws({"c0": 1}, bank, 0, study, 2) for study in range(2000))
    assert len(counts) == 16
    expected = 2000 / 16
    chi2 = sum((n - expected) ** 2 / expected for n in counts.values())
    assert chi2 < 37.7, counts
    same = sum(n for (a, b), n in counts.items() if a == b) / 2000
    assert 0.2 < same < 0.3


def test_the_chosen_sentences_are_shuffled():
    bank = _toy_bank(n_classes=4)
    labels = {f"c{c}": 1 for c in range(4)}
    orders = collections.Counter()
    for seed in range(480):
        text = labels_to_text(labels, bank, np.random.default_rng(seed))
        orders[tuple(s[1] for s in _sentences(text))] += 1
    assert set(orders) == set(itertools.permutations("0123"))  # all 24 orders occur
    first = collections.Counter(order[0] for order in orders.elements())
    assert all(80 < first[c] < 160 for c in "0123"), first  # each class leads about a quarter of the time


def test_validation_text_is_fixed():
    bank = _toy_bank(n_classes=4)
    labels = {"c3": 1, "c0": -1, "c2": 0, "c1": None}
    assert validation_text(labels, bank) == "C0 unc 0. C2 neg 0. C3 pos 0."
    shipped = load_bank()
    labels = {"pneumothorax": 0, "cardiomegaly": 1, "no finding": 0}
    text = validation_text(labels, shipped)
    assert text == " ".join([shipped["no finding"].neg[0], shipped["cardiomegaly"].pos[0],
                             shipped["pneumothorax"].neg[0]])
    assert text == validation_text(dict(reversed(list(labels.items()))), load_bank())


@pytest.mark.parametrize("labels, message", [
    ({"cardiomegaly": 1, "Pleural Effusion": 1}, "label class 'Pleural Effusion' is not in the prompt bank"),
    ({"edema": 2}, "label of class 'edema' is 2:"),
    ({"edema": 0.5}, "label of class 'edema' is 0.5:"),
    ({"edema": "Patient has mild edema"}, "label of class 'edema' is a str:"),
    ({"edema": None, "nodule": float("nan")}, "no labelled class"),
])
def test_unknown_classes_and_values_are_refused(labels, message):
    bank = load_bank()
    with pytest.raises(ValueError, match=message) as err:
        labels_to_text(labels, bank, np.random.default_rng(0))
    assert "Patient" not in str(err.value)  # free text is never echoed
    with pytest.raises(ValueError, match=message):
        validation_text(labels, bank)


def test_numeric_label_types_are_accepted():
    bank = _toy_bank(n_classes=3, n_sentences=1)
    labels = {"c0": np.int64(1), "c1": np.float32(-1.0), "c2": 0.0}
    assert validation_text(labels, bank) == "C0 pos 0. C1 unc 0. C2 neg 0."
    with pytest.raises(ValueError, match="step=-1 must be a non-negative integer"):
        two_draws(labels, bank, 0, 0, -1)
