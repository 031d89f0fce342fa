"""CXR-CLIP evaluation metrics against references written out here: 2-D unit vectors with known angles,
the two-way softmax and sort-based retrieval ranks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vljax.evals.cxr_eval import (
    MISSING,
    binary_probabilities,
    binary_prompt_texts,
    binary_zero_shot,
    ensemble_embeddings,
    flatten_prompts,
    image_text_retrieval,
    label_matrix,
    multiclass_zero_shot,
    single_positive_subset,
)
from vljax.evals.zero_shot import retrieval_metrics


def unit(deg) -> np.ndarray:
    """Rows of 2-D unit vectors at the given angles (degrees)."""
    a = np.deg2rad(np.atleast_1d(np.asarray(deg, dtype=np.float64)))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


# ------------------------------------------------------------------------------------ prompts, labels

def test_binary_prompt_texts_layout_and_cases():
    classes = ["cardiomegaly", "pleural effusion"]
    assert binary_prompt_texts(classes) == ["Cardiomegaly", "Pleural effusion", "No cardiomegaly",
                                            "No pleural effusion"]
    assert binary_prompt_texts(classes, "title") == ["Cardiomegaly", "Pleural Effusion", "No Cardiomegaly",
                                                     "No Pleural Effusion"]
    assert binary_prompt_texts(classes, "lower")[1::2] == ["pleural effusion", "no pleural effusion"]
    assert binary_prompt_texts(["ILD"], "as_is") == ["ILD", "No ILD"]
    with pytest.raises(ValueError):
        binary_prompt_texts(["edema", "edema"])
    with pytest.raises(ValueError):
        binary_prompt_texts(["edema"], "upper")


def test_label_matrix_missing_and_unknown():
    got = label_matrix([{"edema": 1, "mass": 0}, None, {"edema": -1, "mass": float("nan"), "other": 1},
                        {"mass": None}], ["edema", "mass"])
    np.testing.assert_array_equal(got, [[1, 0], [MISSING, MISSING], [-1, MISSING], [MISSING, MISSING]])
    with pytest.raises(ValueError):
        label_matrix([{"edema": 2}], ["edema"])


# ------------------------------------------------------------------------------------ binary zero-shot

# Class 0: pos prompt at 0 deg, neg at 90 deg; for an image at angle t, cos_pos - cos_neg = cos t - sin t.
# Images at 0, 30, 60, 90 deg: differences 1, 0.366, -0.366, -1 (decreasing).
IMAGES = unit([0, 30, 60, 90])
POS, NEG = unit([0, 0, 0]), unit([90, 90, 90])


def test_binary_probability_is_the_pair_softmax():
    s = 2.0
    p = binary_probabilities(3.0 * IMAGES, POS[:1] * 0.5, NEG[:1] * 7.0, s)   # norms do not matter
    t = np.deg2rad([0, 30, 60, 90])
    logits = np.stack([s * np.sin(t), s * np.cos(t)], axis=1)           # (neg, pos)
    want = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(p[:, 0], want, rtol=1e-12)
    assert p[0, 0] == pytest.approx(1 / (1 + math.exp(-2.0)))
    # an image as close to "No x" as to "x" has p = 0.5 exactly and counts as negative (CXR-CLIP's argmax)
    tie = binary_zero_shot(np.array([[1.0, 1.0], [1.0, 0.0]]), POS[:1], NEG[:1], np.array([[0], [1]]))
    assert tie["per_class"]["0"]["accuracy"] == 1.0


def test_binary_zero_shot_hand_computed_with_exclusions_and_macro():
    labels = np.array([[1, 1, 1],
                       [0, 1, -1],
                       [1, 0, 1],
                       [0, -1, MISSING]])
    mask = np.ones_like(labels, dtype=bool)
    mask[3, 0] = False                                             # a fourth way to be missing
    labels[3, 0] = 1                                               # value under mask=False is ignored
    out = binary_zero_shot(IMAGES, POS, NEG, labels, 1.0, mask=mask, classes=["a", "b", "c"])
    a, b, c = (out["per_class"][k] for k in "abc")
    # class a: studies 0, 1, 2 with labels 1, 0, 1; scores decreasing; predictions 1, 1, 0.
    # AUROC: positives {s0, s2} vs negative {s1}: s0 > s1, s2 < s1 -> 1/2. Accuracy 1/3.
    # F1: TP 1 (study 0), FP 1 (study 1), FN 1 (study 2) -> 2 / (2 + 1 + 1) = 0.5.
    assert (a["auroc"], a["accuracy"], a["f1"]) == (0.5, pytest.approx(1 / 3), 0.5)
    assert (a["n_pos"], a["n_neg"], a["n_uncertain"], a["n_missing"]) == (2, 1, 0, 1)
    assert a["all_positive_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert a["majority_accuracy"] == pytest.approx(2 / 3)
    # class b: studies 0, 1, 2 with labels 1, 1, 0 (study 3 uncertain): AUROC 1, predictions 1, 1, 0.
    assert (b["auroc"], b["accuracy"], b["f1"]) == (1.0, 1.0, 1.0)
    assert (b["n_pos"], b["n_neg"], b["n_uncertain"], b["n_missing"]) == (2, 1, 1, 0)
    # class c: only positives labelled -> excluded from every macro mean, still reported.
    assert (c["n_pos"], c["n_neg"], c["n_uncertain"], c["n_missing"]) == (2, 0, 1, 1)
    assert c["auroc"] is None and out["excluded"] == ["c"] and out["n_classes"] == 2
    assert out["macro_auroc"] == pytest.approx(0.75)
    assert out["macro_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["macro_f1"] == pytest.approx(0.75)
    assert out["baselines"] == {"auroc": 0.5, "all_positive_f1": pytest.approx(0.8),
                                "majority_accuracy": pytest.approx(2 / 3)}
    assert json_roundtrip(out)["per_class"]["c"]["auroc"] is None


def test_binary_zero_shot_scale_invariant_and_float_labels():
    rng = np.random.default_rng(0)
    img, pos, neg = rng.normal(size=(40, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    labels = rng.integers(-2, 2, size=(40, 3))
    base = binary_zero_shot(img, pos, neg, labels, 1.0)
    big = binary_zero_shot(img, pos, neg, labels, 1e4)                 # p saturates; AUROC does not
    big["logit_scale"] = 1.0
    assert big == base
    as_float = np.where(labels == MISSING, np.nan, labels).astype(np.float64)
    assert binary_zero_shot(img, pos, neg, as_float, 1.0) == base


def test_binary_ensemble_of_one_prompt_is_the_prompt():
    texts, index = flatten_prompts([["Edema", "Pulmonary edema."], ["No edema"], ["Edema"]])
    assert texts == ["Edema", "Pulmonary edema.", "No edema"]
    assert [i.tolist() for i in index] == [[0, 1], [2], [0]]
    single = ensemble_embeddings([np.array([[3.0, 4.0]])])
    np.testing.assert_allclose(single, [[0.6, 0.8]])
    # mean of normalised rows, normalised again: (2, 0) and (0, 5) -> (1/sqrt 2, 1/sqrt 2)
    np.testing.assert_allclose(ensemble_embeddings([np.array([[2.0, 0.0], [0.0, 5.0]])]),
                               [[1 / math.sqrt(2), 1 / math.sqrt(2)]])


# ------------------------------------------------------------------------------- multi-class zero-shot

def test_multiclass_with_ensemble():
    # class 0: prompts at 0 and 120 deg -> ensemble at 60 deg; class 1: 100 deg; class 2: 200 and 240 -> 220.
    prompts = [unit([0, 120]) * [[1.0], [4.0]], unit([100]), unit([200, 240])]
    # image at 115 deg: closest single prompt is class 0's 120, but the ensembles say class 1 (15 vs 55 deg).
    images = unit([60, 30, 115, 100, 220, 180, 300])
    targets = np.array([0, 0, 1, 1, 2, 2, 0])
    out = multiclass_zero_shot(images, prompts, targets, classes=["x", "y", "z"])
    # predictions: 60->0, 30->0, 115->1, 100->1, 220->2, 180->2 (40 deg from 220, 80 from 100) and
    # 300->2 (80 deg from 220, 120 from 60): one error, in class 0.
    assert out["per_class_accuracy"] == {"x": pytest.approx(2 / 3), "y": 1.0, "z": 1.0}
    assert out["accuracy"] == pytest.approx(6 / 7)
    assert out["macro_accuracy"] == pytest.approx((2 / 3 + 2) / 3)
    assert out["counts"] == {"x": 3, "y": 2, "z": 2}
    assert out["chance"] == pytest.approx(1 / 3) and out["majority"] == pytest.approx(3 / 7)
    json_roundtrip(out)


def test_single_positive_subset_rules_cap_and_nesting():
    labels = np.array([
        [1, 0, 0, 1],        # class 0 (column 3 is not listed: ignored)
        [1, 1, 0, 0],        # two positives -> out
        [0, 1, MISSING, 0],  # class 1
        [0, 1, -1, 0],       # uncertain among listed -> out
        [0, 0, 1, 0],        # class 2
        [1, MISSING, 0, 0],  # class 0
        [0, 0, 0, 0],        # no positive -> out
        [1, 0, 0, 0],        # class 0
    ])
    rows, targets = single_positive_subset(labels, [0, 1, 2], n_per_class=10, seed=0)
    np.testing.assert_array_equal(rows, [0, 2, 4, 5, 7])
    np.testing.assert_array_equal(targets, [0, 1, 2, 0, 0])
    capped, t2 = single_positive_subset(labels, [0, 1, 2], n_per_class=2, seed=3)
    assert np.sum(t2 == 0) == 2 and set(capped) < set(rows)
    big = np.random.default_rng(1).integers(0, 2, size=(500, 5))
    small, _ = single_positive_subset(big, [0, 2, 4], n_per_class=10, seed=7)
    larger, _ = single_positive_subset(big, [0, 2, 4], n_per_class=30, seed=7)
    again, _ = single_positive_subset(big, [0, 2, 4], n_per_class=10, seed=7)
    assert set(small) <= set(larger) and np.array_equal(small, again) and small.size == 30


# ----------------------------------------------------------------------------------------- retrieval

def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sorted_rank_reference(sim: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based position of the first correct candidate when each row is sorted by similarity."""
    return np.array([next(p for p, j in enumerate(np.argsort(-row, kind="stable")) if ok[j])
                     for row, ok in zip(sim, correct)])


def test_retrieval_permutation():
    # image i = e_i, text i = e_perm[i]: image i matches its own text only when perm[i] == i; otherwise
    # its text has cosine 0 and ties with 10 other texts, which count against it: R@k = fixed points / N.
    n = 12
    perm = np.array([0, 1, 2, 4, 3, 6, 5, 8, 7, 10, 11, 9])
    out = image_text_retrieval(np.eye(n), np.eye(n)[perm])
    assert out["r1"] == out["r10"] == pytest.approx(3 / n)
    assert out["text_to_image"]["r5"] == pytest.approx(3 / n)
    assert out["chance"] == {"r1": pytest.approx(1 / n), "r5": pytest.approx(5 / n), "r10": pytest.approx(10 / n)}
    # random embeddings (no ties): against a sort-based rank in both directions
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 8))
    txt = img[rng.permutation(30)] + 0.8 * rng.normal(size=(30, 8)) + 0.5 * img
    out = image_text_retrieval(img, txt)
    ref = retrieval_metrics(img, txt)
    assert all(out[f"r{k}"] == ref[f"r{k}"] for k in (1, 5, 10)) and out["n"] == out["n_texts"] == 30
    sim = normalized(img) @ normalized(txt).T
    rank = sorted_rank_reference(sim, np.eye(30, dtype=bool))
    rank_t = sorted_rank_reference(sim.T, np.eye(30, dtype=bool))
    for k in (1, 5, 10):
        assert out[f"r{k}"] == pytest.approx(np.mean(rank < k))
        assert out["text_to_image"][f"r{k}"] == pytest.approx(np.mean(rank_t < k))


def test_retrieval_merges_identical_texts():
    rng = np.random.default_rng(1)
    texts = ["normal", "edema", "normal", "effusion", "normal", "edema", "mass", "nodule"]
    by_text = {t: rng.normal(size=6) for t in set(texts)}
    txt = np.stack([by_text[t] for t in texts])
    img = txt + 0.9 * rng.normal(size=txt.shape)
    out = image_text_retrieval(img, txt, texts)
    uniq = list(dict.fromkeys(texts))
    u = np.stack([by_text[t] for t in uniq])
    sim = normalized(img) @ normalized(u).T
    correct = np.array([[t == v for v in uniq] for t in texts])
    rank, rank_t = sorted_rank_reference(sim, correct), sorted_rank_reference(sim.T, correct.T)
    for k in (1, 5, 10):
        assert out[f"r{k}"] == pytest.approx(np.mean(rank < k))
        assert out["text_to_image"][f"r{k}"] == pytest.approx(np.mean(rank_t < k))
    assert out["n_texts"] == 5 and out["chance"]["r1"] == pytest.approx(1 / 5)
    # two different texts with one embedding tie, and a tie counts against the query
    # (only the study with text "c" ranks its text first; the others tie with a wrong text at rank 1)
    tied = image_text_retrieval(np.eye(3)[[0, 0, 0, 2]], np.eye(3)[[0, 0, 0, 2]], ["a", "b", "a", "c"])
    assert (tied["r1"], tied["r5"], tied["n_texts"]) == (0.25, 1.0, 3)
    # text -> image chance with c correct images out of 8: 1 - C(8 - c, 1) / C(8, 1) = c / 8; mean over
    # "normal" (3), "edema" (2), "effusion", "mass", "nodule" (1 each) = 8 / 40
    assert out["text_to_image"]["chance"]["r1"] == pytest.approx(8 / 40)
    json_roundtrip(out)
