"""CXR-CLIP's zero-shot and retrieval metrics on embeddings (DESIGN.md §2), on the host.

The evaluator embeds images and texts with the towers; these functions only take the arrays.

* Binary zero-shot per class (`binary_prompt_texts`, `binary_zero_shot`): the prompts "{class}" and
  "No {class}" (CXR-CLIP's pair). p = softmax over the pair of scaled cosines, so p = sigmoid(scale *
  (cos_pos - cos_neg)). AUROC uses p, and accuracy and F1 use p > 0.5. Only studies labelled 0 or 1
  count: uncertain (-1) and missing (-2, NaN or `mask` False) labels are left out and counted.
* Multi-class zero-shot (`multiclass_zero_shot`, CheXpert 5x200 style): each image has exactly one
  class, and the prediction is the argmax of the cosine to each class's ensembled prompt embedding.
  `single_positive_subset` selects such a subset from multi-label labels.
* Prompt ensembles (`flatten_prompts`, `ensemble_embeddings`): average a group's L2-normalised prompt
  embeddings, then normalise again (CLIP's ensembling).
* Image->text retrieval R@1/5/10 and the reverse (`image_text_retrieval`), with the chance levels.

The linear probe on frozen features is in `linear_probe.py`, which reuses this module's label handling.

Results are plain Python types (NaN -> None) that `json.dumps(..., allow_nan=False)` accepts. Classes
without a labelled positive or a labelled negative are kept in "per_class" and listed in "excluded",
and they are left out of every macro average (as in `zero_shot.zero_shot_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evals.zero_shot import _l2_normalize, _none_if_nan, auroc, binary_f1, retrieval_metrics

MISSING = -2           # label value for "not labelled"; NaN (float labels) and mask=False mean the same
LABEL_VALUES = (1, 0, -1, MISSING)


# ----------------------------------------------------------------------------------------- Labels

def label_matrix(label_dicts: Sequence[Mapping[str, int] | None], classes: Sequence[str]) -> np.ndarray:
    """int8 [N, C] from per-study {class: 1|0|-1} dicts (e.g. `CXRStudy.label_dict()`). A class that a
    study does not list, a None or NaN value, or a None dict becomes MISSING (-2). Classes not in
    `classes` are ignored."""
    out = np.full((len(label_dicts), len(classes)), MISSING, dtype=np.int8)
    for i, labels in enumerate(label_dicts):
        for j, name in enumerate(classes):
            v = None if labels is None else labels.get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if v not in (1, 0, -1):
                raise ValueError(f"study {i}: label of class {name!r} is {v!r}; use 1, 0, -1 or None")
            out[i, j] = int(v)
    return out


def _label_state(labels: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(known, positive, uncertain), each bool [N, C]. known = labelled 0 or 1 and not masked out."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be [N, C], got shape {lab.shape}")
    if lab.dtype.kind == "f":
        nan = np.isnan(lab)
        lab = np.where(nan, MISSING, lab)
    elif lab.dtype.kind in "iub":
        nan = np.zeros(lab.shape, dtype=bool)
    else:
        raise TypeError(f"labels must be numeric, got dtype {lab.dtype}")
    if not np.isin(lab, LABEL_VALUES).all():
        raise ValueError(f"labels must be 1, 0, -1 (uncertain) or {MISSING} / NaN (missing)")
    present = ~nan & (lab != MISSING)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != lab.shape or mask.dtype != bool:
            raise ValueError(f"mask must be bool {lab.shape}, got {mask.dtype} {mask.shape}")
        present &= mask
    known = present & (lab >= 0)
    return known, known & (lab == 1), present & (lab == -1)


def _class_names(classes: Sequence[str] | None, n: int) -> list[str]:
    if classes is None:
        return [str(i) for i in range(n)]
    names = [str(c) for c in classes]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"need {n} distinct class names, got {names}")
    return names


def _macro(values: list[float]) -> float | None:
    return _none_if_nan(float(np.mean(values))) if values else None


# ---------------------------------------------------------------------------------------- Prompts

_CASES = ("sentence", "title", "lower", "as_is")


def binary_prompt_texts(classes: Sequence[str], case: str = "sentence") -> list[str]:
    """The 2C texts to embed for `binary_zero_shot`: C positive prompts, then C negative prompts, so
    `pos_emb, neg_emb = emb[:C], emb[C:]`. The negative is "No " + the positive.

    `case` decides how a class name is written (examples for "pleural effusion"):
      "sentence" (default): "Pleural effusion" / "No pleural effusion". This is the style of the prompt
        bank sentences that the text tower is trained on ("Cardiomegaly.", "No cardiomegaly.").
      "title": "Pleural Effusion" / "No Pleural Effusion". CXR-CLIP's exact strings for its
        CheXpert / ChestX-ray14 class names (no trailing period).
      "lower": "pleural effusion" / "no pleural effusion".
      "as_is": "{class}" / "No {class}", with the name exactly as given.
    The texts are not normalised here. Pass them through the same text path as the training texts.
    """
    if case not in _CASES:
        raise ValueError(f"case={case!r}: choose one of {list(_CASES)}")
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    if not names or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct non-empty strings, got {list(classes)}")
    if case == "as_is":
        pos, neg = names, [f"No {c}" for c in names]
    elif case == "title":
        pos = [" ".join(w[:1].upper() + w[1:] for w in c.split(" ")) for c in names]
        neg = [f"No {c}" for c in pos]
    elif case == "sentence":
        pos = [c[:1].upper() + c[1:].lower() for c in names]
        neg = [f"No {c.lower()}" for c in names]
    else:
        pos, neg = [c.lower() for c in names], [f"no {c.lower()}" for c in names]
    return pos + neg


def flatten_prompts(groups: Sequence[Sequence[str]]) -> tuple[list[str], list[np.ndarray]]:
    """The distinct texts of all prompt groups, in first-seen order (embed these once), and each group's
    row indices into them: `[emb[i] for i in index]` gives `ensemble_embeddings` its input."""
    texts: list[str] = []
    where: dict[str, int] = {}
    index = []
    for g, group in enumerate(groups):
        if isinstance(group, str) or not group or not all(isinstance(t, str) and t for t in group):
            raise ValueError(f"group {g} must be a non-empty sequence of non-empty strings")
        for t in group:
            if t not in where:
                where[t] = len(texts)
                texts.append(t)
        index.append(np.asarray([where[t] for t in group], dtype=np.int64))
    return texts, index


def ensemble_embeddings(groups: Sequence[np.ndarray]) -> np.ndarray:
    """float64 [G, E]: per group [P, E], the mean of its L2-normalised rows, normalised again."""
    if not len(groups):
        raise ValueError("need at least one group")
    out = []
    for g, emb in enumerate(groups):
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"group {g}: need [P >= 1, E] embeddings, got {emb.shape}")
        out.append(_l2_normalize(emb).mean(axis=0))
    if len({e.shape for e in out}) != 1:
        raise ValueError("all groups need the same embedding width")
    return _l2_normalize(np.stack(out))


# ------------------------------------------------------------------------------- Binary zero-shot

def _check_emb(image_emb, *others) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(image_emb), *(np.asarray(o) for o in others)]
    if any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"need [rows, E] embeddings of one width, got {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("embeddings must be finite")
    return tuple(arrays)


def _pair_logits(image_emb, pos_emb, neg_emb, logit_scale: float) -> np.ndarray:
    image_emb, pos_emb, neg_emb = _check_emb(image_emb, pos_emb, neg_emb)
    if pos_emb.shape != neg_emb.shape:
        raise ValueError(f"pos_emb {pos_emb.shape} and neg_emb {neg_emb.shape} differ")
    scale = float(np.asarray(logit_scale))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"logit_scale must be finite and > 0, got {scale}")
    img = _l2_normalize(image_emb)
    return scale * (img @ _l2_normalize(pos_emb).T - img @ _l2_normalize(neg_emb).T)


def binary_probabilities(image_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray,
                         logit_scale: float = 1.0) -> np.ndarray:
    """float64 [N, C]: p = softmax([s cos(img, neg), s cos(img, pos)])[1] = sigmoid(s (cos_pos - cos_neg)).

    `logit_scale` s is the multiplier (`TwoTower.logit_scale()`, exp of the stored log-scale). CXR-CLIP's
    evaluator uses the raw cosines, which is s = 1. AUROC, accuracy and F1 do not depend on s > 0.
    """
    z = _pair_logits(image_emb, pos_emb, neg_emb, logit_scale)
    return 0.5 * (1.0 + np.tanh(0.5 * z))   # sigmoid without overflow


def binary_zero_shot(image_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray, labels: np.ndarray,
                     logit_scale: float = 1.0, *, mask: np.ndarray | None = None,
                     classes: Sequence[str] | None = None) -> dict:
    """Per-class and macro AUROC, accuracy and F1 of the prompt pair, with trivial baselines.

    image_emb [N, E]; pos_emb, neg_emb [C, E] (one prompt or an ensemble per class); labels [N, C]:
    1 / 0 / -1 uncertain / -2 or NaN missing, and an optional bool `mask` (False = missing). Per class,
    only studies labelled 0 or 1 are used. AUROC is computed on the logit of p, which ranks the studies
    the same way as p but does not saturate to 1.0 in float64. Predictions are p > 0.5, so a tie counts
    as negative (CXR-CLIP takes the argmax over ("No {class}", "{class}"), which gives the same).
    Baselines: AUROC 0.5, F1 when every study is called positive, and the accuracy of always
    predicting the majority label.
    """
    z = _pair_logits(image_emb, pos_emb, neg_emb, logit_scale)
    p = 0.5 * (1.0 + np.tanh(0.5 * z))
    known, positive, uncertain = _label_state(labels, mask)
    if known.shape != z.shape:
        raise ValueError(f"labels {known.shape} do not match [N images, C classes] = {z.shape}")
    names = _class_names(classes, z.shape[1])
    per_class: dict[str, dict] = {}
    excluded: list[str] = []
    keep: dict[str, list[float]] = {k: [] for k in ("auroc", "accuracy", "f1", "all_positive_f1", "majority")}
    for c, name in enumerate(names):
        k = known[:, c]
        y, pred = positive[k, c], p[k, c] > 0.5
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        row = {
            "auroc": _none_if_nan(auroc(y, z[k, c])) if y.size else None,
            "accuracy": float(np.mean(pred == y)) if y.size else None,
            "f1": binary_f1(y, pred),
            "n_pos": n_pos, "n_neg": n_neg,
            "n_uncertain": int(uncertain[:, c].sum()),
            "n_missing": int((~known[:, c] & ~uncertain[:, c]).sum()),
            "all_positive_f1": binary_f1(y, np.ones_like(y)),
            "majority_accuracy": max(n_pos, n_neg) / y.size if y.size else None,
        }
        per_class[name] = row
        if n_pos == 0 or n_neg == 0:
            excluded.append(name)
            continue
        for key, src in (("auroc", "auroc"), ("accuracy", "accuracy"), ("f1", "f1"),
                         ("all_positive_f1", "all_positive_f1"), ("majority", "majority_accuracy")):
            keep[key].append(row[src])
    used = len(keep["auroc"])
    return {
        "macro_auroc": _macro(keep["auroc"]),
        "macro_accuracy": _macro(keep["accuracy"]),
        "macro_f1": _macro(keep["f1"]),
        "n_classes": used,
        "excluded": excluded,
        "per_class": per_class,
        "baselines": {"auroc": 0.5 if used else None, "all_positive_f1": _macro(keep["all_positive_f1"]),
                      "majority_accuracy": _macro(keep["majority"])},
        "logit_scale": float(np.asarray(logit_scale)),
    }


# -------------------------------------------------------------------------- Multi-class zero-shot

def multiclass_zero_shot(image_emb: np.ndarray, class_prompt_embs: Sequence[np.ndarray], targets: np.ndarray,
                         *, classes: Sequence[str] | None = None) -> dict:
    """Accuracy of argmax_k cos(image, ensemble_k) against `targets` [N] in [0, K).

    `class_prompt_embs[k]` holds the [P_k, E] embeddings of class k's prompts, ensembled by
    `ensemble_embeddings`. A tie goes to the lower class index. "accuracy" is over images (micro).
    "macro_accuracy" is the mean of the per-class accuracies over the classes present; the two are
    equal on a balanced set such as 5x200. "chance" = 1/K; "majority" = accuracy of always predicting
    the most frequent class.
    """
    protos = ensemble_embeddings(class_prompt_embs)
    (image_emb,) = _check_emb(image_emb)
    if image_emb.shape[1] != protos.shape[1]:
        raise ValueError(f"image width {image_emb.shape[1]} != prompt width {protos.shape[1]}")
    t = np.asarray(targets)
    k = protos.shape[0]
    if t.shape != (image_emb.shape[0],) or t.dtype.kind not in "iu" or ((t < 0) | (t >= k)).any():
        raise ValueError(f"targets must be ints in [0, {k}) of shape ({image_emb.shape[0]},)")
    if t.size == 0:
        raise ValueError("need at least one image")
    pred = np.argmax(_l2_normalize(image_emb) @ protos.T, axis=1)
    names = _class_names(classes, k)
    counts = np.bincount(t, minlength=k)
    per_class = {n: (float(np.mean(pred[t == j] == j)) if counts[j] else None) for j, n in enumerate(names)}
    return {
        "accuracy": float(np.mean(pred == t)),
        "macro_accuracy": _macro([v for v in per_class.values() if v is not None]),
        "per_class_accuracy": per_class,
        "counts": {n: int(counts[j]) for j, n in enumerate(names)},
        "chance": 1.0 / k,
        "majority": float(counts.max() / t.size),
        "n": int(t.size),
    }


def single_positive_subset(labels: np.ndarray, class_index: Sequence[int], n_per_class: int = 200,
                           seed: int = 0, *, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, targets): studies positive for exactly one of the classes `class_index` (columns of
    `labels`), at most `n_per_class` per class, drawn with `np.random.default_rng(seed)`.

    A study qualifies when exactly one listed class is 1 and no listed class is -1. Uncertain could be
    a second positive. Missing counts as not positive, and other columns are ignored. targets[i] is
    the position in `class_index` of row i's class. Rows are sorted. With one seed, a smaller
    `n_per_class` gives a subset of a larger one's rows.
    """
    cols = [int(c) for c in class_index]
    known, positive, uncertain = _label_state(labels, mask)
    if not cols or len(set(cols)) != len(cols) or min(cols) < 0 or max(cols) >= known.shape[1]:
        raise ValueError(f"class_index must be distinct columns in [0, {known.shape[1]}), got {cols}")
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    pos, unc = positive[:, cols], uncertain[:, cols]
    ok = (pos.sum(axis=1) == 1) & ~unc.any(axis=1)
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for j in range(len(cols)):
        candidates = np.flatnonzero(ok & pos[:, j])
        chosen = candidates[rng.permutation(candidates.size)[:n_per_class]]
        rows.append(chosen)
        targets.append(np.full(chosen.size, j, dtype=np.int64))
    rows_a, targets_a = np.concatenate(rows), np.concatenate(targets)
    order = np.argsort(rows_a)
    return rows_a[order].astype(np.int64), targets_a[order]


# -------------------------------------------------------------------------------------- Retrieval

def _chance_recall(n_candidates: int, n_correct: np.ndarray, k: int) -> float:
    """Mean over queries of P(a random top k holds one of the query's n_correct correct candidates),
    1 - C(n - c, k) / C(n, k) written as a product."""
    i = np.arange(min(k, n_candidates))
    c = np.asarray(n_correct, dtype=np.float64)[:, None]
    miss = np.prod(np.clip((n_candidates - c - i) / (n_candidates - i), 0.0, None), axis=1)
    return float(np.mean(1.0 - miss))


def _recalls_multi(sim: np.ndarray, match: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k when a query may have several correct candidates: rank = the number of wrong candidates
    at least as similar as the best correct one (ties pessimistic, as in `zero_shot.retrieval_metrics`)."""
    best = np.where(match, sim, -np.inf).max(axis=1, keepdims=True)
    rank = np.sum((sim >= best) & ~match, axis=1)
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def image_text_retrieval(image_emb: np.ndarray, text_emb: np.ndarray, texts: Sequence[str] | None = None,
                         ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image->text recall@k (text i is image i's report) by cosine, "text_to_image" the reverse, and
    "chance", the recall of a random ranking.

    With `texts` given, identical texts become one candidate (CXR-CLIP's protocol: many reports read
    "No acute cardiopulmonary process."). An image is right when its text's candidate is in the top k.
    A text candidate is right when any image of that text is in the top k. Without duplicates this is
    `zero_shot.retrieval_metrics`. Chance image->text = k / (distinct texts).
    """
    image_emb, text_emb = _check_emb(image_emb, text_emb)
    if image_emb.shape != text_emb.shape or image_emb.shape[0] == 0:
        raise ValueError(f"need matching non-empty [N, E] embeddings, got {image_emb.shape}, {text_emb.shape}")
    n = image_emb.shape[0]
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} pairs")
    if texts is None or len(set(texts)) == n:
        out = retrieval_metrics(image_emb, text_emb, ks)
        ones = np.ones(n, dtype=np.int64)
        out["chance"] = {f"r{k}": _chance_recall(n, ones, k) for k in ks}
        out["text_to_image"]["chance"] = dict(out["chance"])
        out["n_texts"] = n
        return out
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    column = {t: j for j, t in enumerate(first)}
    target = np.asarray([column[t] for t in texts])
    unique_rows = np.asarray(list(first.values()))
    m = unique_rows.size
    sim = _l2_normalize(image_emb) @ _l2_normalize(text_emb[unique_rows]).T   # [N images, M texts]
    match = target[:, None] == np.arange(m)[None, :]
    out = _recalls_multi(sim, match, ks)
    out["chance"] = {f"r{k}": _chance_recall(m, np.ones(n, dtype=np.int64), k) for k in ks}
    t2i = _recalls_multi(sim.T, match.T, ks)
    t2i["chance"] = {f"r{k}": _chance_recall(n, match.sum(axis=0), k) for k in ks}
    out["text_to_image"] = t2i
    out["n"] = n
    out["n_texts"] = int(m)
    return out
