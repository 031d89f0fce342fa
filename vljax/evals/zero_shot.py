"""Merlin's zero-shot finding classification and image<->report retrieval, in plain NumPy.

Zero-shot protocol: every finding has a few positive and a few negative report phrases. The text
tower embeds all phrases once (`prompt_table(...).texts`); the score of image n for finding f is the
mean cosine similarity of image n to f's positive phrases minus the mean to its negative phrases,
and the prediction is positive when the score is > 0. Per finding, F1 (and AUROC of the score) is
computed over the studies labelled for that finding (label != -1) and macro-averaged over findings.

Metrics are NumPy on host arrays (no JAX) so they run anywhere after embeddings are gathered, and
`zero_shot_metrics` / `retrieval_metrics` return plain Python types (NaN -> None) that
`json.dumps(..., allow_nan=False)` accepts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.data.findings import FINDINGS
from vljax.data.reports import normalize_report_text
from vljax.evals.prompts import FINDING_PROMPTS

_EPS = 1e-12

@dataclasses.dataclass(frozen=True)
class PromptTable:
    """All prompt phrases, normalised and deduplicated, with per-finding index lists into `texts`.

    The caller embeds `texts` once with the text tower (rows of `phrase_emb` in `texts` order).
    """

    texts: tuple[str, ...]
    pos_index: tuple[np.ndarray, ...]
    neg_index: tuple[np.ndarray, ...]
    findings: tuple[str, ...]


def prompt_table(
    prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]] = FINDING_PROMPTS,
) -> PromptTable:
    """Flatten `prompts` into one normalised, order-preserving deduplicated phrase list.

    Phrases go through `normalize_report_text` so they match the text the tower was trained on.
    Raises if a finding has an empty side or a phrase that is both positive and negative.
    """
    texts: list[str] = []
    where: dict[str, int] = {}

    def index_of(phrase: str) -> int:
        norm = normalize_report_text(phrase)
        if norm not in where:
            where[norm] = len(texts)
            texts.append(norm)
        return where[norm]

    pos_index, neg_index = [], []
    for name, (pos, neg) in prompts.items():
        if isinstance(pos, str) or isinstance(neg, str):
            raise TypeError(f"{name!r}: phrases must be sequences of strings, not a string")
        pi = [index_of(p) for p in pos]
        ni = [index_of(p) for p in neg]
        if not pi or not ni:
            raise ValueError(f"{name!r} needs at least one positive and one negative phrase")
        both = set(pi) & set(ni)
        if both:
            raise ValueError(f"{name!r}: phrases both positive and negative: {[texts[i] for i in both]}")
        pos_index.append(np.asarray(list(dict.fromkeys(pi)), dtype=np.int64))
        neg_index.append(np.asarray(list(dict.fromkeys(ni)), dtype=np.int64))
    return PromptTable(tuple(texts), tuple(pos_index), tuple(neg_index), tuple(prompts))


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def zero_shot_scores(image_emb: np.ndarray, phrase_emb: np.ndarray, table: PromptTable) -> np.ndarray:
    """[N, F] float64: mean cosine to f's positive phrases minus mean cosine to its negatives.

    Both inputs are L2-normalised here (eps 1e-12), so raw tower outputs are fine.
    """
    image_emb, phrase_emb = np.asarray(image_emb), np.asarray(phrase_emb)
    if image_emb.ndim != 2 or phrase_emb.ndim != 2 or image_emb.shape[1] != phrase_emb.shape[1]:
        raise ValueError(f"need [N, D] and [T, D] embeddings, got {image_emb.shape}, {phrase_emb.shape}")
    if phrase_emb.shape[0] != len(table.texts):
        raise ValueError(f"phrase_emb has {phrase_emb.shape[0]} rows, table has {len(table.texts)} texts")
    sim = _l2_normalize(image_emb) @ _l2_normalize(phrase_emb).T  # [N, T]
    scores = np.empty((image_emb.shape[0], len(table.findings)), dtype=np.float64)
    for f, (pi, ni) in enumerate(zip(table.pos_index, table.neg_index)):
        scores[:, f] = sim[:, pi].mean(axis=1) - sim[:, ni].mean(axis=1)
    return scores


def _as_binary(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1 (filter out -1 labels first)")
        y = y.astype(bool)
    return y.ravel()


def _confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int]:
    t, p = _as_binary(y_true, "y_true"), _as_binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    return int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def binary_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 = 2TP / (2TP + FP + FN), 0.0 when that denominator is 0 (sklearn's zero_division=0)."""
    tp, fp, fn = _confusion(y_true, y_pred)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as Mann-Whitney U / (n_pos * n_neg), ties at average rank
    (a tied positive/negative pair counts 1/2). NaN when either class is absent."""
    t = _as_binary(y_true, "y_true")
    s = np.asarray(score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true {t.shape} and score {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("score must be finite")
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    u = avg_rank[inverse][t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def zero_shot_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    findings: Sequence[str] = FINDINGS,
    seed: int = 0,
    random_draws: int = 100,
) -> dict:
    """Per-finding and macro F1/AUROC of `scores > 0` against `labels` (1/0, -1 = not mentioned,
    left out of that finding), plus all-positive and random (p = 0.5) F1 baselines.

    Findings with no labelled positive or no labelled negative are listed in `excluded` and left
    out of every macro average (model and baselines), since F1/AUROC there say nothing about the
    model; they still appear in `per_finding`. NaN becomes None so the dict is strict-JSON safe.
    The random baseline is the mean over `random_draws` draws from `np.random.default_rng(seed)`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same [N, F]")
    if scores.shape[1] != len(findings):
        raise ValueError(f"{scores.shape[1]} score columns but {len(findings)} findings")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("labels must be 1, 0 or -1")
    if random_draws < 1:
        raise ValueError("random_draws must be >= 1")

    masks = [labels[:, f] != -1 for f in range(len(findings))]
    truths = [labels[m, f] == 1 for f, m in enumerate(masks)]
    per_finding: dict[str, dict] = {}
    excluded: list[str] = []
    used: list[int] = []
    f1s, aurocs, all_pos = [], [], []
    for f, name in enumerate(findings):
        y = truths[f]
        s = scores[masks[f], f]
        tp, fp, fn = _confusion(y, s > 0)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        auc = auroc(y, s)
        per_finding[name] = {
            "f1": f1,
            "auroc": _none_if_nan(auc),
            "n_pos": n_pos,
            "n_neg": n_neg,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
        }
        if n_pos == 0 or n_neg == 0:
            excluded.append(name)
            continue
        used.append(f)
        f1s.append(f1)
        aurocs.append(auc)
        all_pos.append(binary_f1(y, np.ones_like(y)))

    # Random predictions (uniform scores in [-1, 1) thresholded at 0, i.e. positive w.p. 0.5),
    # drawn per used finding over its labelled studies only, so the baseline does not depend on
    # excluded findings or unlabelled rows. random_f1[d, j] = F1 of draw d on used finding j.
    rng = np.random.default_rng(seed)
    random_f1 = np.zeros((random_draws, len(used)))
    for j, f in enumerate(used):
        draws = rng.random((random_draws, truths[f].size)) < 0.5
        random_f1[:, j] = [binary_f1(truths[f], d) for d in draws]
    random_macro = random_f1.mean(axis=1).tolist() if used else []

    def macro(values: list[float]) -> float | None:
        # Used findings have both classes, so their F1/AUROC are finite; nanmean is a safeguard.
        return _none_if_nan(float(np.nanmean(values))) if values else None

    return {
        "macro_f1": macro(f1s),
        "macro_auroc": macro(aurocs),
        "n_findings": len(used),
        "excluded": excluded,
        "per_finding": per_finding,
        "baselines": {"all_positive": macro(all_pos), "random": macro(random_macro)},
    }


def _recalls(sim: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    true = np.diag(sim)[:, None]
    others = ~np.eye(sim.shape[0], dtype=bool)
    rank = np.sum((sim >= true) & others, axis=1)  # ties count against the true match
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of image->report retrieval (text i matches image i) by cosine similarity, and the
    reverse direction under "text_to_image". The rank of the true match is the number of other
    candidates at least as similar, so ties are scored pessimistically."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need matching [N, D] embeddings, got {image_emb.shape}, {text_emb.shape}")
    if image_emb.shape[0] == 0:
        raise ValueError("need at least one pair")
    sim = _l2_normalize(image_emb) @ _l2_normalize(text_emb).T  # [N images, N texts]
    out: dict = _recalls(sim, ks)
    out["text_to_image"] = _recalls(sim.T, ks)
    out["n"] = int(image_emb.shape[0])
    return out
