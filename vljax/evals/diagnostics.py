"""Where zero-shot F1 is lost: the fixed threshold, the text side, or the image features.

Zero-shot F1 (Merlin's protocol, `zero_shot.py`) multiplies three things: what the image tower has
learned, whether the text tower and the phrase lists can express a finding, and whether the fixed
`score > 0` rule sits at a useful threshold. These NumPy functions measure each one separately, under
the label rules of `zero_shot_metrics` (-1 = not mentioned, left out; findings without a labelled
positive or negative left out of every macro average):

* `best_threshold_metrics`: per finding, the F1 of the best threshold on a score. The threshold is
  chosen on the evaluated split itself, so this is an upper bound on what recalibrating the fixed
  rule could give, never a zero-shot result.
* `section_scores`: the protocol with each study's own organ section (the one that carries the
  finding) in place of its image. The text tower's embedding of the report is what training aligns
  images to; if the phrase lists cannot classify the report itself, the image cannot do better.
* `ridge_probe`: a linear probe (closed-form ridge, 1 vs 0) from image features of training studies
  to each finding, AUROC on the evaluated split: what the image tower has learned, whether or not
  zero-shot can read it out.

`python -m vljax.diagnose` runs all of them on a trained run (`vljax/diagnose.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vljax.data.findings import FINDING_SECTION, FINDINGS
from vljax.evals.zero_shot import PromptTable, _as_binary, auroc, zero_shot_scores


def _best_cut(y_true: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(best F1, threshold t achieving it with the rule score > t); (NaN, NaN) without positives."""
    y = _as_binary(np.asarray(y_true), "y_true")
    s = np.asarray(score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"need two equal 1-D arrays, got {y.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    k = np.arange(1, len(s) + 1)
    # Only cut after the last of a run of tied scores: "score > t" cannot split ties.
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    f1 = 2.0 * tp[ends] / (n_pos + k[ends])
    i = int(np.argmax(f1))
    cut = ends[i]
    # Threshold halfway to the next lower score (below the lowest: all positive).
    t = (s[cut] + s[cut + 1]) / 2.0 if cut + 1 < len(s) else s[cut] - 1.0
    return float(f1[i]), float(t)


def best_threshold_f1(y_true: np.ndarray, score: np.ndarray) -> float:
    """Max over thresholds t of F1(y, score > t), t ranging over every cut between distinct scores
    (and below the smallest: all positive). NaN when there is no positive. Labels must be 0/1."""
    return _best_cut(y_true, score)[0]


def best_thresholds(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[F] per finding, the threshold t of `best_threshold_f1` on the labelled studies (-1 left
    out), to be applied as score > t on other studies; NaN where a class is missing."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same [N, F]")
    out = np.full(scores.shape[1], np.nan)
    for f in range(scores.shape[1]):
        m = labels[:, f] != -1
        y = labels[m, f] == 1
        if y.any() and not y.all():
            out[f] = _best_cut(y, scores[m, f])[1]
    return out


def best_threshold_metrics(scores: np.ndarray, labels: np.ndarray, *,
                           findings: Sequence[str] = FINDINGS) -> dict:
    """{"macro_f1", "per_finding": {name: best-threshold F1 or None}} over the findings that
    `zero_shot_metrics` averages (both classes labelled)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.shape[1] != len(findings):
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be [N, {len(findings)}]")
    per, used = {}, []
    for f, name in enumerate(findings):
        m = labels[:, f] != -1
        y = labels[m, f] == 1
        if y.all() or not y.any():
            per[name] = None
            continue
        per[name] = best_threshold_f1(y, scores[m, f])
        used.append(per[name])
    return {"macro_f1": float(np.mean(used)) if used else None, "per_finding": per}


def section_scores(section_emb: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray],
                   phrase_emb: np.ndarray, table: PromptTable, labels: np.ndarray,
                   *, finding_section: Mapping[str, str] = FINDING_SECTION) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot scores with study n's own section text as the query, per finding.

    `section_emb[s]` is [N, D] (row n: study n's section s; rows of absent sections are ignored),
    `present[s]` the [N] bool mask of studies that have section s. Returns (scores [N, F], labels with
    -1 where the study lacks the finding's section), ready for `zero_shot_metrics`.
    """
    labels = np.array(labels, copy=True)
    scores = np.zeros(labels.shape, dtype=np.float64)
    for f, name in enumerate(table.findings):
        sec = finding_section[name]
        scores[:, f] = zero_shot_scores(section_emb[sec], phrase_emb, table)[:, f]
        labels[~np.asarray(present[sec], dtype=bool), f] = -1
    return scores, labels


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray, *,
                l2: float = 10.0, findings: Sequence[str] = FINDINGS) -> dict:
    """Per finding, ridge regression of (+1 positive, -1 negative) on standardised features of the
    labelled training studies; AUROC of its output on the labelled evaluation studies.

    Returns {"macro_auroc", "per_finding": {name: AUROC or None}}; a finding without both classes in
    training or in evaluation gets None and is left out of the macro average.
    """
    train_x, eval_x = np.asarray(train_x, np.float64), np.asarray(eval_x, np.float64)
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    if train_x.ndim != 2 or eval_x.ndim != 2 or train_x.shape[1] != eval_x.shape[1]:
        raise ValueError(f"need [N, D] features, got {train_x.shape} and {eval_x.shape}")
    if train_y.shape != (len(train_x), len(findings)) or eval_y.shape != (len(eval_x), len(findings)):
        raise ValueError("labels must be [N, F] for the train and eval features")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xe = (train_x - mu) / sd, (eval_x - mu) / sd
    per, used = {}, []
    for f, name in enumerate(findings):
        a, b = train_y[:, f] != -1, eval_y[:, f] != -1
        ya, yb = train_y[a, f] == 1, eval_y[b, f] == 1
        if ya.all() or not ya.any() or yb.all() or not yb.any():
            per[name] = None
            continue
        x, t = xt[a], np.where(ya, 1.0, -1.0)
        xc, tc = x - x.mean(0), t - t.mean()
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ tc)
        per[name] = auroc(yb, xe[b] @ w)
        used.append(per[name])
    return {"macro_auroc": float(np.mean(used)) if used else None, "per_finding": per}
