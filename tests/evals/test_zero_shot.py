"""Zero-shot prompts, scores and metrics against formulas written out here (loops, hand-computed
cases, scipy's Mann-Whitney U), and retrieval recalls on constructed similarity rankings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from vljax.data.findings import FINDINGS
from vljax.data.reports import normalize_report_text
from vljax.evals.prompts import FINDING_PROMPTS
from vljax.evals.zero_shot import (
    PromptTable,
    auroc,
    binary_f1,
    prompt_table,
    retrieval_metrics,
    zero_shot_metrics,
    zero_shot_scores,
)

# Each phrase must name its finding's organ or term: one of these substrings.
_KEYWORDS = {
    "submucosal edema": ("submucosal", "bowel wall"),
    "renal hypodensities": ("renal", "kidney"),
    "aortic valve calcification": ("aortic valve",),
    "coronary calcification": ("coronary",),
    "thrombosis": ("thromb",),
    "metastatic disease": ("metasta",),
    "pancreatic atrophy": ("pancrea",),
    "renal cyst": ("renal", "kidney"),
    "osteopenia": ("osteopen", "bone", "osseous"),
    "surgically absent gallbladder": ("gallbladder", "cholecystectomy"),
    "atelectasis": ("atelecta", "lung"),
    "abdominal aortic aneurysm": ("aort",),
    "anasarca": ("anasarca", "subcutaneous"),
    "hiatal hernia": ("hiatal", "hernia", "gastroesophageal"),
    "lymphadenopathy": ("lymph",),
    "prostatomegaly": ("prostat",),
    "biliary ductal dilation": ("biliary", "bile duct"),
    "cardiomegaly": ("cardi", "heart"),
    "splenomegaly": ("splen", "spleen"),
    "hepatomegaly": ("hepat", "liver"),
    "atherosclerosis": ("atheroscl",),
    "ascites": ("ascites",),
    "pleural effusion": ("pleura",),
    "hepatic steatosis": ("hepat", "liver", "steatosis"),
    "appendicitis": ("append",),
    "gallstones": ("gallstone", "cholelith"),
    "hydronephrosis": ("hydroneph", "renal"),
    "bowel obstruction": ("bowel",),
    "free air": ("free air", "pneumoperitoneum", "intraperitoneal air"),
    "fracture": ("fractur",),
}


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_prompts_cover_findings_in_order():
    assert tuple(FINDING_PROMPTS) == FINDINGS
    assert set(_KEYWORDS) == set(FINDINGS)


@pytest.mark.parametrize("name", FINDINGS)
def test_prompts_per_finding(name):
    pos, neg = FINDING_PROMPTS[name]
    assert 3 <= len(pos) <= 5 and 3 <= len(neg) <= 5
    npos = {normalize_report_text(p) for p in pos}
    nneg = {normalize_report_text(p) for p in neg}
    assert len(npos) == len(pos) and len(nneg) == len(neg), "duplicate phrase"
    assert not npos & nneg
    for phrase in pos + neg:
        assert any(k in phrase for k in _KEYWORDS[name]), phrase
        assert phrase == phrase.strip().lower() and phrase


def test_prompt_sets():
    import re

    from vljax.data.phantom import text as phantom_text
    from vljax.evals.prompts import PROMPT_SETS, prompts_for

    assert prompts_for("merlin") == FINDING_PROMPTS
    phantom = prompts_for("phantom")
    assert tuple(phantom) == FINDINGS

    def pattern(template):  # a template with every placeholder as a wildcard
        return re.compile(re.sub(r"\\\{[A-Za-z]+\\\}", ".+", re.escape(template)), re.IGNORECASE)

    for name in FINDINGS:
        for got, templates in zip(phantom[name], phantom_text.PHRASES[name]):
            assert got, name
            usable = [t for t in templates if "{size}" not in t]  # sizes are numbers, not phrases
            # Each prompt is a sentence the report writer writes for the finding (label 1, or 0) ...
            for prompt in got:
                assert "{" not in prompt and any(pattern(t).fullmatch(prompt) for t in usable), (name, prompt)
            # ... and each usable template is there, verbatim when it has no placeholder.
            for t in usable:
                assert any(pattern(t).fullmatch(p) for p in got), (name, t)
                if "{" not in t:
                    assert t in got, (name, t)
    # Placeholders expand over all their values: sides x severities, the three thrombosed vessels.
    assert {"Large left pleural effusion.", "Mild bilateral pleural effusion."} <= set(phantom["pleural effusion"][0])
    assert "Inferior vena cava thrombosis." in phantom["thrombosis"][0]
    assert not any("measuring" in p for p in phantom["splenomegaly"][0])
    both = prompts_for("merlin+phantom")
    for name in FINDINGS:
        assert both[name] == (FINDING_PROMPTS[name][0] + phantom[name][0],
                              FINDING_PROMPTS[name][1] + phantom[name][1])
    for name in PROMPT_SETS:
        prompt_table(prompts_for(name))  # no phrase is both positive and negative
    with pytest.raises(ValueError, match="choose one of"):
        prompts_for("radiologist")


def test_prompt_table_indices():
    table = prompt_table()
    assert table.findings == FINDINGS
    assert len(table.texts) == len(set(table.texts))
    used = set()
    for f, name in enumerate(FINDINGS):
        pos, neg = FINDING_PROMPTS[name]
        assert [table.texts[i] for i in table.pos_index[f]] == [normalize_report_text(p) for p in pos]
        assert [table.texts[i] for i in table.neg_index[f]] == [normalize_report_text(p) for p in neg]
        used.update(table.pos_index[f].tolist() + table.neg_index[f].tolist())
    assert used == set(range(len(table.texts)))


def test_prompt_table_dedup_and_conflict():
    table = prompt_table({"a": (("Big A.", "big a ."), ("No A",)), "b": (("no a",), ("B ok",))})
    assert table.texts == ("big a .", "no a", "b ok")
    assert [x.tolist() for x in table.pos_index] == [[0], [1]]
    assert [x.tolist() for x in table.neg_index] == [[1], [2]]
    with pytest.raises(ValueError, match="both positive and negative"):
        prompt_table({"a": (("x", "Y."), ("y .",))})
    with pytest.raises(ValueError):
        prompt_table({"a": (("x",), ())})


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _loop_scores(img, phr, table):
    out = np.zeros((img.shape[0], len(table.findings)))
    for n in range(img.shape[0]):
        a = img[n] / math.sqrt(sum(v * v for v in img[n]))
        for f in range(len(table.findings)):
            sims = {}
            for i in list(table.pos_index[f]) + list(table.neg_index[f]):
                b = phr[i] / math.sqrt(sum(v * v for v in phr[i]))
                sims[i] = sum(x * y for x, y in zip(a, b))
            pos = sum(sims[i] for i in table.pos_index[f]) / len(table.pos_index[f])
            neg = sum(sims[i] for i in table.neg_index[f]) / len(table.neg_index[f])
            out[n, f] = pos - neg
    return out


def test_zero_shot_scores_matches_loop_and_is_scale_invariant():
    rng = np.random.default_rng(0)
    table = prompt_table()
    img = rng.normal(size=(5, 8))
    phr = rng.normal(size=(len(table.texts), 8))
    got = zero_shot_scores(img, phr, table)
    assert got.shape == (5, len(FINDINGS)) and got.dtype == np.float64
    np.testing.assert_allclose(got, _loop_scores(img, phr, table), rtol=0, atol=1e-12)
    scaled = zero_shot_scores(img * rng.uniform(0.1, 10, size=(5, 1)), phr * 37.0, table)
    np.testing.assert_allclose(scaled, got, rtol=0, atol=1e-12)


def test_zero_shot_scores_sign():
    # Image aligned with the positive phrase of finding 0 and the negative phrase of finding 1.
    table = PromptTable(("p0", "n0", "p1", "n1"), (np.array([0]), np.array([2])),
                        (np.array([1]), np.array([3])), ("a", "b"))
    phr = np.eye(4)
    img = np.array([[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(zero_shot_scores(img, phr, table), [[1 / math.sqrt(2), -1 / math.sqrt(2)]])
    with pytest.raises(ValueError):
        zero_shot_scores(img, phr[:3], table)


# ---------------------------------------------------------------------------------------------
# F1 and AUROC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "y, p, expected",
    [
        ([1, 1, 0, 0], [1, 0, 1, 0], 0.5),  # tp1 fp1 fn1 -> 2/4
        ([1, 1, 1, 0], [1, 1, 1, 1], 6 / 7),  # tp3 fp1 -> 6/7
        ([1, 0, 0, 0], [0, 0, 0, 0], 0.0),  # no predicted positive
        ([0, 0, 0], [0, 0, 0], 0.0),  # nothing positive at all: zero_division=0
        ([0, 0, 1], [1, 1, 0], 0.0),
        ([1, 0, 1], [1, 0, 1], 1.0),
    ],
)
def test_binary_f1_hand_cases(y, p, expected):
    assert binary_f1(np.array(y), np.array(p)) == pytest.approx(expected, abs=1e-15)
    assert binary_f1(np.array(y, bool), np.array(p, bool)) == pytest.approx(expected, abs=1e-15)


def test_binary_f1_random_against_precision_recall():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        y, p = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        tp = sum(a and b for a, b in zip(y, p))
        prec = tp / p.sum() if p.sum() else 0.0
        rec = tp / y.sum() if y.sum() else 0.0
        expected = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        assert binary_f1(y, p) == pytest.approx(expected, abs=1e-12)


def test_binary_f1_rejects_unfiltered_labels():
    with pytest.raises(ValueError):
        binary_f1(np.array([1, -1, 0]), np.array([1, 1, 0]))


def test_auroc_against_mannwhitneyu_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        s = rng.integers(0, 5, size=n).astype(float) + y * rng.integers(0, 2)  # many ties
        expected = mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum())
        assert auroc(y, s) == pytest.approx(expected, abs=1e-12)


def test_auroc_edge_cases():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auroc(y, np.zeros(4)) == 0.5
    assert auroc(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.9])) == 0.75
    assert math.isnan(auroc(np.ones(3, int), np.arange(3.0)))
    assert math.isnan(auroc(np.zeros(3, int), np.arange(3.0)))


# ---------------------------------------------------------------------------------------------
# zero_shot_metrics
# ---------------------------------------------------------------------------------------------


def _synthetic(n=60, f=len(FINDINGS), seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(n, f), p=[0.3, 0.5, 0.2])
    labels[0, :], labels[1, :] = 1, 0  # every finding has both classes
    scores = rng.normal(size=(n, f)) + 0.8 * (labels == 1)
    return scores, labels


def test_metrics_ignore_unlabelled():
    scores, labels = _synthetic()
    base = zero_shot_metrics(scores, labels)
    changed = scores.copy()
    changed[labels == -1] = np.random.default_rng(9).normal(size=int((labels == -1).sum())) * 100
    assert zero_shot_metrics(changed, labels) == base
    for f, name in enumerate(FINDINGS):
        pf = base["per_finding"][name]
        assert pf["n_pos"] == int((labels[:, f] == 1).sum())
        assert pf["n_neg"] == int((labels[:, f] == 0).sum())
        m = labels[:, f] != -1
        assert pf["f1"] == pytest.approx(binary_f1(labels[m, f], scores[m, f] > 0))
    # ... but labelled scores do matter.
    flipped = scores.copy()
    flipped[labels != -1] *= -1
    assert zero_shot_metrics(flipped, labels)["macro_f1"] != base["macro_f1"]


def test_metrics_macro_and_all_positive_baseline():
    scores, labels = _synthetic()
    out = zero_shot_metrics(scores, labels)
    assert out["n_findings"] == len(FINDINGS) and out["excluded"] == []
    f1s = [out["per_finding"][n]["f1"] for n in FINDINGS]
    aucs = [out["per_finding"][n]["auroc"] for n in FINDINGS]
    assert out["macro_f1"] == pytest.approx(np.mean(f1s))
    assert out["macro_auroc"] == pytest.approx(np.mean(aucs))
    expected = []
    for f in range(len(FINDINGS)):
        lab = labels[labels[:, f] != -1, f]
        p = (lab == 1).mean()
        expected.append(2 * p / (1 + p))
    assert out["baselines"]["all_positive"] == pytest.approx(np.mean(expected), abs=1e-12)


def test_metrics_perfect_scores_and_json():
    _, labels = _synthetic()
    perfect = np.where(labels == 1, 1.0, -1.0)
    out = zero_shot_metrics(perfect, labels)
    assert out["macro_f1"] == 1.0 and out["macro_auroc"] == 1.0
    for pf in out["per_finding"].values():
        assert pf["precision"] == 1.0 and pf["recall"] == 1.0
    json.dumps(out, allow_nan=False)


def test_metrics_random_baseline_near_expectation():
    # Random predictions with p = 0.5: E[F1] ~ 2 * 0.5 * q / (0.5 + q) for positive fraction q.
    rng = np.random.default_rng(4)
    n, f = 4000, 3
    q = np.array([0.1, 0.3, 0.6])
    labels = (rng.random((n, f)) < q).astype(int)
    labels[rng.random((n, f)) < 0.2] = -1
    out = zero_shot_metrics(rng.normal(size=(n, f)), labels, findings=("a", "b", "c"), random_draws=20)
    expected = np.mean([q_ / (0.5 + q_) for q_ in q])
    assert out["baselines"]["random"] == pytest.approx(expected, abs=0.01)
    # Seeded: same seed, same number; different seed, (almost surely) different number.
    again = zero_shot_metrics(rng.normal(size=(n, f)), labels, findings=("a", "b", "c"), random_draws=20)
    assert again["baselines"]["random"] == out["baselines"]["random"]
    other = zero_shot_metrics(rng.normal(size=(n, f)), labels, findings=("a", "b", "c"), random_draws=20,
                              seed=1)
    assert other["baselines"]["random"] != out["baselines"]["random"]


def test_metrics_excluded_findings():
    scores, labels = _synthetic(f=5)
    labels[:, 1] = np.where(labels[:, 1] == -1, -1, 0)  # no positives
    labels[:, 2] = -1  # nothing labelled
    labels[:, 3] = np.where(labels[:, 3] == -1, -1, 1)  # no negatives
    out = zero_shot_metrics(scores, labels, findings=("a", "b", "c", "e", "d"))
    assert out["excluded"] == ["b", "c", "e"] and out["n_findings"] == 2
    pf = out["per_finding"]
    assert pf["b"]["auroc"] is None and pf["b"]["n_pos"] == 0 and pf["b"]["f1"] == 0.0
    assert pf["c"]["n_pos"] == 0 and pf["c"]["n_neg"] == 0
    assert pf["e"]["auroc"] is None and pf["e"]["n_neg"] == 0
    assert out["macro_f1"] == pytest.approx((pf["a"]["f1"] + pf["d"]["f1"]) / 2)
    assert out["macro_auroc"] == pytest.approx((pf["a"]["auroc"] + pf["d"]["auroc"]) / 2)
    keep = [0, 4]
    only = zero_shot_metrics(scores[:, keep], labels[:, keep], findings=("a", "d"))
    assert out["baselines"] == only["baselines"]  # excluded findings do not move the baselines
    json.dumps(out, allow_nan=False)

    none = zero_shot_metrics(scores[:, [2]], labels[:, [2]], findings=("c",))
    assert none["macro_f1"] is None and none["macro_auroc"] is None and none["n_findings"] == 0
    assert none["baselines"] == {"all_positive": None, "random": None}
    json.dumps(none, allow_nan=False)


def test_metrics_validate_inputs():
    scores, labels = _synthetic(f=2)
    with pytest.raises(ValueError):
        zero_shot_metrics(scores, labels)  # 2 columns, 30 findings
    bad = labels.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError):
        zero_shot_metrics(scores, bad, findings=("a", "b"))


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def test_retrieval_identity():
    emb = np.eye(12) * 3.0
    out = retrieval_metrics(emb, emb)
    assert out["r1"] == out["r5"] == out["r10"] == 1.0
    assert out["text_to_image"] == {"r1": 1.0, "r5": 1.0, "r10": 1.0}
    assert out["n"] == 12
    json.dumps(out, allow_nan=False)


def test_retrieval_constructed_ranks():
    # Texts are one-hot, so image row i's cosine to text j is sim[i, j] / |sim[i]|: the order
    # within each row is that of `sim`, which is built so the true text has a chosen rank.
    n = 12
    rng = np.random.default_rng(5)
    target_rank = np.array([0, 0, 1, 2, 4, 5, 7, 9, 10, 11, 3, 6])
    sim = rng.uniform(0.0, 0.4, size=(n, n))
    np.fill_diagonal(sim, 0.5)
    for i, r in enumerate(target_rank):
        others = [j for j in range(n) if j != i]
        sim[i, rng.choice(others, size=r, replace=False)] = rng.uniform(0.6, 0.9, size=r)
    txt = np.eye(n)
    expected = {f"r{k}": float(np.mean(target_rank < k)) for k in (1, 5, 10)}
    assert expected == {"r1": 2 / 12, "r5": 6 / 12, "r10": 10 / 12}
    out = retrieval_metrics(sim, txt)
    assert {k: out[k] for k in expected} == expected
    # Swapping the towers turns the same rankings into the text->image direction.
    assert retrieval_metrics(txt, sim)["text_to_image"] == expected


def test_retrieval_ties_count_against():
    # Two identical texts: each image ties with the other text, so neither is rank 0.
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = retrieval_metrics(img, txt, ks=(1, 2))
    assert out["r1"] == pytest.approx(1 / 3) and out["r2"] == 1.0
    assert out["text_to_image"]["r1"] == pytest.approx(1 / 3)
    assert set(out) == {"r1", "r2", "text_to_image", "n"}
