r"""Statistics of seed sweeps: summaries over seeds, paired differences between settings, a test-set
bootstrap of one run, and the split of seed variance into initialisation and data order.

Plain NumPy/SciPy on host values; the zero-shot metrics of a bootstrap resample come from
`vljax.evals.zero_shot` itself, so they are the evaluator's F1/AUROC. Notation: x_1..x_n the values
of one metric over n seeds, t_q(v) the q-quantile of Student's t with v degrees of freedom, and
level = 0.95 (q = 0.975) unless asked otherwise.

  mean         x̄ = Σ x_i / n
  std          s = sqrt(Σ (x_i - x̄)² / (n - 1))                  sample std (ddof=1), needs n >= 2
  t-interval   x̄ ± t_q(n-1) · s / sqrt(n)                        needs n >= 2

Paired differences of setting A minus setting B over the seed indices both finished,
d_i = a_i - b_i (seed index i gives both settings the same seeds):

  mean, std, t-interval of d as above
  paired t     T = d̄ / (s_d / sqrt(n)),  p = 2 · (1 - F_t(|T|; n-1))   (scipy.stats.ttest_rel's p)
               undefined (NaN) when all d_i are equal (s_d = 0) or n < 2
  sign flip    p = #{ε ∈ {-1, +1}^n : |Σ ε_i d_i| >= |Σ d_i|} / 2^n, two-sided and exact: all 2^n
               sign vectors are enumerated (ε = +1 included, so p >= 2 / 2^n when d ≠ 0), for
               n <= SIGN_FLIP_MAX_N = 20 (2^20 ≈ 10^6 vectors, a fraction of a second). Under H0 (A and
               B exchangeable within a seed) every flip is equally likely. Ties are counted with a
               relative tolerance of 1e-9 so that flips with the same |sum| in exact arithmetic count
               whatever the floating-point rounding.

Bootstrap over studies (`bootstrap_run`, one run's saved predictions): B resamples of the N studies
with replacement, drawn as `np.random.default_rng(seed).integers(0, N, N)` one after the other; each
resample's macro F1 and macro AUROC are `zero_shot.zero_shot_metrics` of the resampled rows (findings
without both classes in a resample are left out of its macro averages, as in results.json), and
R@k (image -> report) is the fraction of resampled query images whose true report ranks < k among
all N reports (the gallery stays fixed: resampling the gallery would put duplicate reports beside
the true one). CI: the (1-level)/2 and (1+level)/2 percentiles of the B values (`np.percentile`,
linear interpolation); the point estimate is the metric on all N studies.

Variance decomposition (`variance_decomposition`): three grids of the same setting, one varying only
the init seed (`seed`), one only the data-order seed (`data_seed`), one both. The estimator is each
grid's sample variance (ddof=1). Under y = μ + a(init) + b(data order) + e with independent
zero-mean effects, E[s²_init] = σ²_a + σ²_e, E[s²_data] = σ²_b + σ²_e and E[s²_both] = σ²_a + σ²_b
+ σ²_e; runs here are deterministic given their seeds (σ²_e = 0), so s²_init + s²_data estimates
s²_both, and a sum far from it (compare the intervals) points to an interaction. Each variance
has the chi-square interval [(n-1)s² / χ²_{(1+level)/2}(n-1), (n-1)s² / χ²_{(1-level)/2}(n-1)]
(which assumes normal values).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from vljax.evals import zero_shot

SIGN_FLIP_MAX_N = 20
_SIGN_FLIP_CHUNK = 1 << 16  # sign vectors per matrix product (2^16 x 20 int8: 1.3 MB)
_TIE_RTOL = 1e-9


def _values(x: Sequence[float]) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v.tolist()}")
    return v


@dataclasses.dataclass(frozen=True)
class Summary:
    """n values: mean, sample std and t-interval (std and interval NaN when n < 2; all NaN when n = 0)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1) and the `level` t-interval x̄ ± t_q(n-1) s / sqrt(n) of `values`."""
    v = _values(values)
    n = v.size
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(v.std(ddof=1))
    half = float(sps.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_t_p(d: Sequence[float]) -> float:
    """Two-sided p of the paired t-test on differences `d` (= scipy.stats.ttest_rel(a, b).pvalue for
    d = a - b); NaN when n < 2 or all differences are equal (the t statistic is undefined)."""
    d = _values(d)
    n = d.size
    if n < 2:
        return math.nan
    s = float(d.std(ddof=1))
    if s <= 1e-12 * float(np.abs(d).max()):
        return math.nan
    t = float(d.mean()) / (s / math.sqrt(n))
    return float(2 * sps.t.sf(abs(t), n - 1))


def sign_flip_p(d: Sequence[float], max_n: int = SIGN_FLIP_MAX_N) -> float:
    """Exact two-sided sign-flip permutation p of the mean of paired differences `d`: the fraction of
    the 2^n sign vectors ε with |Σ ε_i d_i| >= |Σ d_i| (module docstring). Raises for n > `max_n`."""
    d = _values(d)
    n = d.size
    if n == 0:
        return math.nan
    if n > max_n:
        raise ValueError(f"exact sign-flip test enumerates 2^n sign vectors; n={n} > {max_n}")
    observed = abs(float(d.sum()))
    threshold = observed - _TIE_RTOL * max(observed, float(np.abs(d).sum()))
    bits = np.arange(n, dtype=np.int64)
    hits = 0
    for start in range(0, 1 << n, _SIGN_FLIP_CHUNK):
        codes = np.arange(start, min(start + _SIGN_FLIP_CHUNK, 1 << n), dtype=np.int64)
        signs = 1 - 2 * ((codes[:, None] >> bits) & 1).astype(np.int8)  # [chunk, n] of +-1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    return hits / float(1 << n)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A - B over n shared seeds: mean difference, its std and t-interval, paired t and sign-flip p."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t_p: float
    sign_flip_p: float


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Statistics of d = a - b, where a[i] and b[i] are two settings' values at the same seed index."""
    a, b = _values(a), _values(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    d = a - b
    s = summarize(d, level)
    flip = sign_flip_p(d) if d.size <= SIGN_FLIP_MAX_N else math.nan
    return PairedDifference(s.n, s.mean, s.std, s.ci_low, s.ci_high, paired_t_p(d), flip)


# ------------------------------------------------------------------------------------------------
# Bootstrap over the studies of one run

RETRIEVAL_KS = (1, 5, 10)


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """[N] rank of each image's own report among all N reports by cosine similarity: the number of
    other reports at least as similar (ties count against the true match), the rank that
    `zero_shot.retrieval_metrics` thresholds, so mean(ranks < k) is its R@k."""
    img = np.asarray(image_emb, np.float64)
    txt = np.asarray(text_emb, np.float64)
    img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=-1, keepdims=True), 1e-12)
    sim = img @ txt.T
    true = np.diag(sim)[:, None]
    others = ~np.eye(sim.shape[0], dtype=bool)
    return np.sum((sim >= true) & others, axis=1)


@dataclasses.dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap interval of one metric; `estimate` is the metric on all studies, `valid`
    the resamples where it was defined (a macro average needs a finding with both classes)."""

    estimate: float
    ci_low: float
    ci_high: float
    resamples: int
    valid: int
    seed: int
    n: int


def bootstrap_run(scores: np.ndarray, labels: np.ndarray, image_emb: np.ndarray | None = None,
                  text_emb: np.ndarray | None = None, *, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, BootstrapCI]:
    """Percentile bootstrap CIs over studies of macro F1 and macro AUROC (and R@1/5/10 when the
    embeddings are given) of one run: {"macro_f1", "macro_auroc", "r1", "r5", "r10"} (module
    docstring). All metrics share each resample's study indices."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    n = scores.shape[0]
    if n == 0 or resamples < 1:
        raise ValueError(f"need studies and resamples >= 1, got N={n}, B={resamples}")
    full = zero_shot.zero_shot_metrics(scores, labels, random_draws=1)
    estimate = {"macro_f1": full["macro_f1"], "macro_auroc": full["macro_auroc"]}
    ranks = None
    if image_emb is not None and text_emb is not None:
        ranks = retrieval_ranks(image_emb, text_emb)
        estimate.update({f"r{k}": float(np.mean(ranks < k)) for k in RETRIEVAL_KS})
    draws: dict[str, list[float]] = {k: [] for k in estimate}
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        m = zero_shot.zero_shot_metrics(scores[idx], labels[idx], random_draws=1)
        for key in ("macro_f1", "macro_auroc"):
            if m[key] is not None:
                draws[key].append(m[key])
        if ranks is not None:
            for k in RETRIEVAL_KS:
                draws[f"r{k}"].append(float(np.mean(ranks[idx] < k)))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for key, values in draws.items():
        lo, hi = np.percentile(values, q) if values else (math.nan, math.nan)
        est = estimate[key]
        out[key] = BootstrapCI(math.nan if est is None else float(est), float(lo), float(hi), resamples,
                               len(values), seed, n)
    return out


# ------------------------------------------------------------------------------------------------
# Variance decomposition


@dataclasses.dataclass(frozen=True)
class Variance:
    """Sample variance (ddof=1) of n values with its chi-square interval (NaN when n < 2)."""

    n: int
    variance: float
    ci_low: float
    ci_high: float


def sample_variance(values: Sequence[float], level: float = 0.95) -> Variance:
    """s² (ddof=1) and [(n-1)s² / χ²_{(1+level)/2}(n-1), (n-1)s² / χ²_{(1-level)/2}(n-1)]."""
    v = _values(values)
    n = v.size
    if n < 2:
        return Variance(n, math.nan, math.nan, math.nan)
    s2 = float(v.var(ddof=1))
    return Variance(n, s2, (n - 1) * s2 / float(sps.chi2.ppf((1 + level) / 2, n - 1)),
                    (n - 1) * s2 / float(sps.chi2.ppf((1 - level) / 2, n - 1)))


@dataclasses.dataclass(frozen=True)
class VarianceDecomposition:
    """Between-init, between-data-order and both-varied variances; `total` = init + data, `ratio` =
    total / both, `init_share` = init / total (NaN where undefined)."""

    init: Variance
    data: Variance
    both: Variance
    total: float
    ratio: float
    init_share: float


def variance_decomposition(init_only: Sequence[float], data_only: Sequence[float], both: Sequence[float],
                           level: float = 0.95) -> VarianceDecomposition:
    """The sample variances of the three one-metric grids (module docstring) and how init + data
    compares with both."""
    vi, vd, vb = (sample_variance(x, level) for x in (init_only, data_only, both))
    total = vi.variance + vd.variance
    ratio = total / vb.variance if vb.variance > 0 else math.nan
    share = vi.variance / total if total > 0 else math.nan
    return VarianceDecomposition(vi, vd, vb, total, ratio, share)
