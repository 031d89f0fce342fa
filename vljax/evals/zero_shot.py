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

_EPS = 1e-12

# (positive phrases, negative phrases) per finding, in FINDINGS order. Written as report sentences
# so that they sit near real report text in the text tower's embedding space.
FINDING_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "submucosal edema": (
        (
            "submucosal edema of the colon",
            "bowel wall thickening with submucosal edema",
            "submucosal edema of the small bowel",
            "diffuse submucosal bowel wall edema",
        ),
        (
            "no submucosal edema",
            "no bowel wall thickening or submucosal edema",
            "the bowel wall is normal in thickness",
            "no bowel wall edema",
        ),
    ),
    "renal hypodensities": (
        (
            "multiple renal hypodensities",
            "bilateral renal hypodensities too small to characterize",
            "hypodense lesion in the left kidney",
            "subcentimeter renal hypodensity",
        ),
        (
            "no renal hypodensities",
            "no focal renal lesions",
            "the kidneys are normal without focal lesion",
            "no suspicious renal lesion",
        ),
    ),
    "aortic valve calcification": (
        (
            "aortic valve calcification",
            "calcification of the aortic valve",
            "dense aortic valve calcifications",
            "calcified aortic valve leaflets",
        ),
        (
            "no aortic valve calcification",
            "no calcification of the aortic valve",
            "the aortic valve is not calcified",
        ),
    ),
    "coronary calcification": (
        (
            "coronary artery calcification",
            "dense coronary artery calcifications",
            "three vessel coronary calcification",
            "calcified coronary arteries",
        ),
        (
            "no coronary artery calcification",
            "no coronary calcifications",
            "the coronary arteries are not calcified",
        ),
    ),
    "thrombosis": (
        (
            "portal vein thrombosis",
            "thrombosis of the left common iliac vein",
            "occlusive thrombus in the inferior vena cava",
            "deep venous thrombosis",
            "tumor thrombus in the renal vein",
        ),
        (
            "no venous thrombosis",
            "the portal and hepatic veins are patent without thrombosis",
            "no evidence of thrombus",
            "no portal vein thrombosis",
        ),
    ),
    "metastatic disease": (
        (
            "metastatic disease to the liver",
            "widespread osseous metastatic disease",
            "multiple hepatic metastases",
            "findings consistent with metastatic disease",
            "peritoneal metastases",
        ),
        (
            "no evidence of metastatic disease",
            "no metastatic disease in the abdomen or pelvis",
            "no suspicious lesions to suggest metastases",
            "no hepatic metastases",
        ),
    ),
    "pancreatic atrophy": (
        (
            "pancreatic atrophy",
            "diffuse atrophy of the pancreas",
            "the pancreas is atrophic",
            "fatty atrophy of the pancreas",
        ),
        (
            "no pancreatic atrophy",
            "the pancreas is normal in size",
            "normal pancreatic parenchyma without atrophy",
            "the pancreas is unremarkable",
        ),
    ),
    "renal cyst": (
        (
            "simple renal cyst",
            "left renal cyst",
            "bilateral renal cysts",
            "cyst in the right kidney",
            "exophytic cyst arising from the lower pole of the left kidney",
        ),
        (
            "no renal cysts",
            "no cystic renal lesions",
            "the kidneys are without cysts",
        ),
    ),
    "osteopenia": (
        (
            "diffuse osteopenia",
            "osteopenia of the visualized osseous structures",
            "the bones are demineralized",
            "the bones are osteopenic",
        ),
        (
            "no osteopenia",
            "normal bone mineralization",
            "bone density is normal",
            "the osseous structures are normally mineralized",
        ),
    ),
    "surgically absent gallbladder": (
        (
            "status post cholecystectomy",
            "the gallbladder is surgically absent",
            "prior cholecystectomy",
            "surgically absent gallbladder",
            "postsurgical absence of the gallbladder",
        ),
        (
            "the gallbladder is present",
            "normal gallbladder",
            "the gallbladder is unremarkable",
            "the gallbladder is normally distended",
        ),
    ),
    "atelectasis": (
        (
            "bibasilar atelectasis",
            "dependent atelectasis in the lung bases",
            "subsegmental atelectasis of the right lower lobe",
            "mild bibasilar subsegmental atelectasis",
        ),
        (
            "no atelectasis",
            "the lung bases are clear",
            "no consolidation or atelectasis in the lung bases",
        ),
    ),
    "abdominal aortic aneurysm": (
        (
            "infrarenal abdominal aortic aneurysm",
            "fusiform aneurysmal dilation of the abdominal aorta",
            "aneurysm of the infrarenal abdominal aorta",
            "large abdominal aortic aneurysm",
        ),
        (
            "no abdominal aortic aneurysm",
            "the abdominal aorta is normal in caliber",
            "no aortic aneurysm",
        ),
    ),
    "anasarca": (
        (
            "anasarca",
            "diffuse anasarca",
            "diffuse subcutaneous edema consistent with anasarca",
            "extensive body wall edema and anasarca",
        ),
        (
            "no anasarca",
            "no subcutaneous edema",
            "the subcutaneous soft tissues are unremarkable",
        ),
    ),
    "hiatal hernia": (
        (
            "small hiatal hernia",
            "large hiatal hernia",
            "moderate sliding hiatal hernia",
            "paraesophageal hernia",
        ),
        (
            "no hiatal hernia",
            "the gastroesophageal junction is normal",
            "no evidence of hiatal hernia",
        ),
    ),
    "lymphadenopathy": (
        (
            "retroperitoneal lymphadenopathy",
            "enlarged mesenteric lymph nodes",
            "pelvic lymphadenopathy",
            "bulky periaortic lymphadenopathy",
        ),
        (
            "no lymphadenopathy",
            "no pathologically enlarged lymph nodes",
            "no abdominal or pelvic lymphadenopathy",
            "no retroperitoneal lymphadenopathy",
        ),
    ),
    "prostatomegaly": (
        (
            "prostatomegaly",
            "enlarged prostate",
            "the prostate gland is enlarged",
            "mild prostatomegaly",
        ),
        (
            "the prostate is normal in size",
            "no prostatomegaly",
            "normal prostate gland",
            "the prostate is unremarkable",
        ),
    ),
    "biliary ductal dilation": (
        (
            "intrahepatic and extrahepatic biliary ductal dilation",
            "dilated common bile duct",
            "mild intrahepatic biliary ductal dilatation",
            "biliary dilation",
        ),
        (
            "no biliary ductal dilation",
            "no intrahepatic or extrahepatic biliary dilatation",
            "the common bile duct is normal in caliber",
        ),
    ),
    "cardiomegaly": (
        (
            "cardiomegaly",
            "mild cardiomegaly",
            "the heart is enlarged",
            "moderate cardiomegaly",
        ),
        (
            "the heart is normal in size",
            "no cardiomegaly",
            "normal heart size",
        ),
    ),
    "splenomegaly": (
        (
            "splenomegaly",
            "mild splenomegaly",
            "the spleen is enlarged",
            "massive splenomegaly",
        ),
        (
            "the spleen is normal in size",
            "no splenomegaly",
            "normal spleen",
        ),
    ),
    "hepatomegaly": (
        (
            "hepatomegaly",
            "the liver is enlarged",
            "mild hepatomegaly",
            "enlarged liver",
        ),
        (
            "no hepatomegaly",
            "the liver is normal in size",
            "normal liver size",
        ),
    ),
    "atherosclerosis": (
        (
            "atherosclerosis of the abdominal aorta",
            "moderate atherosclerotic calcification of the aorta",
            "extensive aortoiliac atherosclerosis",
            "mild atherosclerotic disease",
        ),
        (
            "no atherosclerosis",
            "no atherosclerotic calcification of the aorta",
            "no significant atherosclerotic disease",
        ),
    ),
    "ascites": (
        (
            "small volume ascites",
            "moderate ascites",
            "large volume ascites",
            "trace ascites in the pelvis",
        ),
        (
            "no ascites",
            "no free fluid or ascites",
            "no abdominal or pelvic ascites",
        ),
    ),
    "pleural effusion": (
        (
            "small pleural effusion",
            "moderate right pleural effusion",
            "bilateral pleural effusions",
            "small left pleural effusion",
        ),
        (
            "no pleural effusion",
            "no pleural effusions",
            "the pleural spaces are clear",
        ),
    ),
    "hepatic steatosis": (
        (
            "hepatic steatosis",
            "diffuse hepatic steatosis",
            "diffuse fatty infiltration of the liver",
            "the liver is diffusely hypoattenuating consistent with steatosis",
        ),
        (
            "no hepatic steatosis",
            "the liver is normal in attenuation",
            "no fatty infiltration of the liver",
        ),
    ),
    "appendicitis": (
        (
            "acute appendicitis",
            "dilated inflamed appendix consistent with appendicitis",
            "perforated appendicitis",
            "findings compatible with acute appendicitis",
        ),
        (
            "no appendicitis",
            "the appendix is normal",
            "normal appendix",
            "no evidence of acute appendicitis",
        ),
    ),
    "gallstones": (
        (
            "cholelithiasis",
            "gallstones",
            "multiple gallstones in the gallbladder",
            "a calcified gallstone",
        ),
        (
            "no gallstones",
            "no cholelithiasis",
            "no radiopaque gallstones",
        ),
    ),
    "hydronephrosis": (
        (
            "mild left hydronephrosis",
            "moderate right hydronephrosis",
            "bilateral hydronephrosis",
            "severe hydronephrosis",
        ),
        (
            "no hydronephrosis",
            "no hydronephrosis or hydroureter",
            "the renal collecting systems are not dilated",
        ),
    ),
    "bowel obstruction": (
        (
            "small bowel obstruction",
            "dilated loops of small bowel consistent with obstruction",
            "high grade small bowel obstruction",
            "large bowel obstruction",
        ),
        (
            "no bowel obstruction",
            "no evidence of bowel obstruction",
            "the bowel is normal in caliber",
        ),
    ),
    "free air": (
        (
            "free intraperitoneal air",
            "pneumoperitoneum",
            "free air under the diaphragm",
            "small amount of free air",
        ),
        (
            "no free air",
            "no pneumoperitoneum",
            "no free intraperitoneal air",
        ),
    ),
    "fracture": (
        (
            "acute rib fracture",
            "compression fracture of the l1 vertebral body",
            "nondisplaced fracture",
            "healed rib fractures",
            "pelvic fracture",
        ),
        (
            "no acute fracture",
            "no fracture",
            "no acute osseous abnormality or fracture",
        ),
    ),
}


# Prompt sets, by name (`config.zero_shot_prompts`): "merlin", the report sentences above, for any
# dataset; "phantom", the phantom report writer's own phrase lists
# (`vljax.data.phantom_text.prompt_phrases`); "merlin+phantom", both, as one ensemble per finding.
PROMPT_SETS = ("merlin", "phantom", "merlin+phantom")


def prompts_for(name: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The {finding: (positive phrases, negative phrases)} of prompt set `name` (`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"zero-shot prompt set {name!r}: choose one of {list(PROMPT_SETS)}")
    if name == "merlin":
        return dict(FINDING_PROMPTS)
    from vljax.data.phantom_text import prompt_phrases

    phantom = prompt_phrases()
    if name == "phantom":
        return phantom
    return {f: (tuple(FINDING_PROMPTS[f][0]) + phantom[f][0], tuple(FINDING_PROMPTS[f][1]) + phantom[f][1])
            for f in FINDING_PROMPTS}


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
