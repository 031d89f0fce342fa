"""Batch composition for the batch-composition study: which text unit and which studies make up the
global batch at every step, as a pure function of (seed, step).

Text units. Unit 0 is the full findings text ("full"); units 1..13 are the organ-system sections of
`findings.SECTIONS`, in that order. A study *has* a unit when its report yields non-empty text for it
(the full text always exists). A study is *abnormal for a unit* when one of that unit's findings
(`findings.SECTION_FINDINGS`, DESIGN.md §1) is labelled positive; for the full report, when any of
the 30 findings is positive. Adrenal glands carry none of the 30 findings, so they are never on the
schedule by default (balanced sampling would be undefined there).

Schedule (`Schedule`), shared by every strategy of a study, so that the only difference between
strategies is which studies fill a batch:
  * "full": every step is a full-report step;
  * "alternating": steps s with s % period == period - 1 are section steps (period 2: odd steps),
    the others full-report steps. The n-th section step (n = s // period) uses section
    sections[n % K] ("round_robin") or perm_c[n % K] with perm_c a seeded permutation of the K
    sections drawn per cycle c = n // K ("seeded"). Either way every section appears exactly once
    per cycle of K section steps.

Composition (`BatchSampler`), for a step whose unit u is used for the j-th time:
  * "random": j-th batch of a stream of seeded permutations of the studies that have unit u;
  * "balanced": round(ratio * B) normal and B - that many abnormal studies, each drawn from its own
    class stream, then shuffled together (so per-host slices mix both classes).
A stream over a pool of P studies taking b per batch consists of epochs of floor(P / b) batches;
epoch e is a permutation of the pool (seeded by seed, unit, class, e) cut into consecutive blocks,
the last P mod b studies of an epoch are left for another epoch. So no study repeats within a batch
or within an epoch of its class, a small class cycles through epochs faster than a large one, and
batch j needs only permutation j // floor(P / b): random access, exact resumption.

Data fractions. `subset_indices` takes the first round(f * N) positions of one seeded permutation
of the training split, so for one subset seed the 20 % subset lies inside the 40 % one, which lies
inside the full split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from vljax.data import reports as reports_lib
from vljax.data.findings import FINDINGS, SECTION_FINDINGS, SECTIONS
from vljax.data.manifest import StudyRecord

UNITS: tuple[str, ...] = ("full",) + SECTIONS
FULL = 0
STRATEGIES = ("random", "alternating", "balanced")
ORDERS = ("round_robin", "seeded")
# Sections that can appear on an alternating schedule by default: those with at least one finding.
DEFAULT_SECTIONS: tuple[str, ...] = tuple(s for s in SECTIONS if SECTION_FINDINGS[s])

# First word after the seed of every random stream, so that streams of different kinds never share a
# seed sequence (all keys have the same length).
_STREAM, _MIX, _SCHEDULE, _SUBSET, _REPLACE = 1, 2, 3, 4, 5


def _rng(seed: int, tag: int, a: int = 0, b: int = 0, c: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, tag, a, b, c])


# ---------------------------------------------------------------------------------------------------
# Which units each study has, and which are abnormal
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyUnits:
    """`available[i, u]` and `abnormal[i, u]` (bool [N, len(UNITS)]) for the N training studies."""

    available: np.ndarray
    abnormal: np.ndarray

    def __post_init__(self):
        if self.available.shape != self.abnormal.shape or self.available.shape[1:] != (len(UNITS),):
            raise ValueError(f"available/abnormal must both be [N, {len(UNITS)}], got "
                             f"{self.available.shape} and {self.abnormal.shape}")

    def __len__(self) -> int:
        return len(self.available)

    @classmethod
    def from_labels(cls, labels: np.ndarray, available: np.ndarray) -> "StudyUnits":
        """`labels` [N, 30] (1 / 0 / -1, `findings.FINDINGS` order), `available` [N, len(UNITS)]."""
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[1] != len(FINDINGS):
            raise ValueError(f"labels must be [N, {len(FINDINGS)}], got {labels.shape}")
        positive = labels == 1
        abnormal = np.zeros((len(labels), len(UNITS)), bool)
        abnormal[:, FULL] = positive.any(1)
        for k, section in enumerate(SECTIONS):
            cols = [FINDINGS.index(f) for f in SECTION_FINDINGS[section]]
            if cols:
                abnormal[:, 1 + k] = positive[:, cols].any(1)
        available = np.asarray(available, bool).copy()
        available[:, FULL] = True
        return cls(available=available, abnormal=abnormal & available)


def unit_texts(records: Sequence[StudyRecord]) -> list[dict[str, str]]:
    """Normalised text of every unit of every study ("" where a section is absent). Errors name the
    study id only."""
    return [reports_lib.report_texts(r.findings, r.study_id) for r in records]


def study_units(records: Sequence[StudyRecord], texts: Sequence[dict[str, str]]) -> StudyUnits:
    available = np.array([[bool(t[u].strip()) for u in UNITS] for t in texts], bool).reshape(len(texts), len(UNITS))
    labels = np.array([r.labels for r in records], np.int8).reshape(len(records), len(FINDINGS))
    return StudyUnits.from_labels(labels, available)


# ---------------------------------------------------------------------------------------------------
# Data fractions
# ---------------------------------------------------------------------------------------------------


def subset_size(num_studies: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    return max(1, int(math.floor(fraction * num_studies + 0.5)))


def subset_indices(num_studies: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the seeded `fraction` subset; nested across fractions for one seed."""
    k = subset_size(num_studies, fraction)
    return np.sort(_rng(seed, _SUBSET).permutation(num_studies)[:k])


# ---------------------------------------------------------------------------------------------------
# Schedule: which unit every step uses
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Unit of every step; `sections` are unit indices (1..13), empty for a full-report schedule."""

    sections: tuple[int, ...] = ()
    period: int = 2
    order: str = "round_robin"
    seed: int = 0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"section order must be one of {ORDERS}, got {self.order!r}")
        if self.sections and self.period < 2:
            raise ValueError(f"section period must be >= 2 (every period-th step is a section step), "
                             f"got {self.period}")
        bad = [u for u in self.sections if not 1 <= u < len(UNITS)]
        if bad or len(set(self.sections)) != len(self.sections):
            raise ValueError(f"schedule sections must be distinct section units 1..{len(UNITS) - 1}, "
                             f"got {self.sections}")

    @property
    def kind(self) -> str:
        return "alternating" if self.sections else "full"

    def unit_and_use(self, step: int) -> tuple[int, int]:
        """(unit, j): the unit of `step` and how many earlier steps used that unit."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.sections:
            return FULL, step
        n_section_before = step // self.period
        if step % self.period != self.period - 1:
            return FULL, step - n_section_before
        cycle, pos = divmod(n_section_before, len(self.sections))
        if self.order == "round_robin":
            return self.sections[pos], cycle
        perm = _rng(self.seed, _SCHEDULE, cycle).permutation(len(self.sections))
        return self.sections[int(perm[pos])], cycle

    def unit(self, step: int) -> int:
        return self.unit_and_use(step)[0]

    def describe(self) -> dict:
        return {"kind": self.kind, "period": self.period if self.sections else None,
                "order": self.order if self.sections else None,
                "sections": [UNITS[u] for u in self.sections],
                "rule": ("every step: full report" if not self.sections else
                         f"steps s with s % {self.period} == {self.period - 1}: section "
                         f"({'round robin' if self.order == 'round_robin' else 'seeded order per cycle'} "
                         f"over {len(self.sections)} sections); other steps: full report")}


# ---------------------------------------------------------------------------------------------------
# Streams and the batch sampler
# ---------------------------------------------------------------------------------------------------


class _Stream:
    """Seeded epoch permutations of `pool`, cut into blocks of `take`; block j in closed form."""

    def __init__(self, pool: np.ndarray, take: int, seed: int, unit: int, cls: int):
        self.pool, self.take, self.key = pool, take, (seed, _STREAM, unit, cls)
        self.per_epoch = len(pool) // take if take else 0
        self._cache: tuple[int, np.ndarray] | None = None

    def draw(self, j: int) -> np.ndarray:
        if self.take == 0:
            return self.pool[:0]
        epoch, k = divmod(j, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            seed, tag, unit, cls = self.key
            self._cache = (epoch, _rng(seed, tag, unit, cls, epoch).permutation(len(self.pool)))
        return self.pool[self._cache[1][k * self.take:(k + 1) * self.take]]


@dataclasses.dataclass(frozen=True)
class Batch:
    unit: int
    indices: np.ndarray  # study indices into the (subset) training records, global batch order


class BatchSampler:
    """Global batch of every step: `batch(step)` -> (unit, study indices). Pure in (seed, step).

    `composition` is "random" or "balanced"; `balance_ratio` is the fraction of normal studies in
    a balanced batch (0.25 = 25:75 normal:abnormal).
    """

    def __init__(self, units: StudyUnits, schedule: Schedule, global_batch: int, seed: int, *,
                 composition: str = "random", balance_ratio: float | None = None):
        if global_batch < 1:
            raise ValueError(f"batch size must be positive, got {global_batch}")
        if len(units) < 1:
            raise ValueError("the training split is empty")
        if composition not in ("random", "balanced"):
            raise ValueError(f"composition must be 'random' or 'balanced', got {composition!r}")
        self.units, self.schedule, self.global_batch, self.seed = units, schedule, global_batch, seed
        self.composition, self.balance_ratio = composition, balance_ratio
        if composition == "balanced":
            if balance_ratio is None or not 0.0 <= balance_ratio <= 1.0:
                raise ValueError(f"balance_ratio (fraction of normal studies per batch) must be in [0, 1], "
                                 f"got {balance_ratio}")
            self.n_normal = int(math.floor(balance_ratio * global_batch + 0.5))
        else:
            self.n_normal = None
        self.streams: dict[int, tuple[_Stream, ...]] = {}
        for u in (FULL,) + schedule.sections:
            pool = np.flatnonzero(units.available[:, u])
            if composition == "random":
                if len(pool) < global_batch:
                    raise ValueError(self._short(u, "", len(pool), global_batch))
                self.streams[u] = (_Stream(pool, global_batch, seed, u, 0),)
            else:
                normal = pool[~units.abnormal[pool, u]]
                abnormal = pool[units.abnormal[pool, u]]
                need = (self.n_normal, global_batch - self.n_normal)
                for name, p, n in (("normal ", normal, need[0]), ("abnormal ", abnormal, need[1])):
                    if len(p) < n:
                        raise ValueError(self._short(u, name, len(p), n))
                self.streams[u] = (_Stream(normal, need[0], seed, u, 1), _Stream(abnormal, need[1], seed, u, 2))

    def _short(self, unit: int, cls: str, have: int, need: int) -> str:
        where = "training studies" if unit == FULL else f"training studies with a {UNITS[unit]!r} section"
        fix = ("use fewer sections (config.data.sections), a larger train_fraction or a smaller batch"
               if unit != FULL else "use a larger train_fraction or a smaller batch")
        if cls:
            fix += " or another balance_ratio"
        return (f"{UNITS[unit]} batches need {need} {cls}studies each but there are only {have} {cls}"
                f"{where}: {fix}")

    def batch(self, step: int) -> Batch:
        unit, j = self.schedule.unit_and_use(step)
        streams = self.streams[unit]
        if self.composition == "random":
            return Batch(unit, streams[0].draw(j).astype(np.int64))
        idx = np.concatenate([streams[0].draw(j), streams[1].draw(j)]).astype(np.int64)
        order = _rng(self.seed, _MIX, int(step)).permutation(len(idx))
        return Batch(unit, idx[order])

    def indices(self, step: int) -> np.ndarray:
        return self.batch(step).indices

    def replacement(self, step: int, slot: int, study: int, attempt: int) -> int:
        """A stand-in for `study` at position `slot` of step `step`'s batch (the study could not be
        loaded): drawn from the same class stream (the unit's pool, or its normal or abnormal pool
        when balanced), so the batch keeps its composition; a pure function of the arguments and the
        seed. `attempt` k gives the k-th candidate (when a stand-in fails to load too)."""
        unit = self.schedule.unit(step)
        streams = self.streams[unit]
        stream = streams[0] if len(streams) == 1 or not self.units.abnormal[study, unit] else streams[1]
        pool = stream.pool[stream.pool != study]
        if not len(pool):
            raise ValueError(f"no other study in the {UNITS[unit]} stream to stand in for study index {study}")
        return int(pool[_rng(self.seed, _REPLACE, int(step), int(slot), int(attempt)).integers(len(pool))])

    def unit(self, step: int) -> int:
        return self.schedule.unit(step)

    def __repr__(self) -> str:
        return (f"BatchSampler(n={len(self.units)}, batch={self.global_batch}, seed={self.seed}, "
                f"composition={self.composition}, ratio={self.balance_ratio}, schedule={self.schedule})")


def check_options(*, strategy: str, balance_ratio: float, train_fraction: float,
                  sections: Sequence[str] | None, period: int, order: str, seeds: dict | None = None) -> None:
    """Validates the sampling settings before any data is read; messages name the config fields.
    `seeds` maps config field names (e.g. "data_seed") to their values."""
    seeds = seeds or {}
    if strategy not in STRATEGIES:
        raise ValueError(f"config.data.sampling={strategy!r}: choose one of {list(STRATEGIES)}")
    if not 0.0 <= float(balance_ratio) <= 1.0:
        raise ValueError(f"config.data.balance_ratio={balance_ratio}: the fraction of normal studies per "
                         "batch must be in [0, 1] (0.25 = 25:75 normal:abnormal)")
    if not 0.0 < float(train_fraction) <= 1.0:
        raise ValueError(f"config.data.train_fraction={train_fraction}: must be in (0, 1]")
    if order not in ORDERS:
        raise ValueError(f"config.data.section_order={order!r}: choose one of {list(ORDERS)}")
    if int(period) < 2:
        raise ValueError(f"config.data.section_period={period}: must be >= 2 (every period-th step is a "
                         "section step)")
    _check_sections(strategy, sections)
    for name, value in seeds.items():
        if int(value) < 0:
            raise ValueError(f"config.{name}={value}: seeds must be non-negative integers")


def _check_sections(strategy: str, sections: Sequence[str] | None) -> tuple[str, ...]:
    """The section units of the schedule (`DEFAULT_SECTIONS` for None), checked: known, distinct,
    not empty, and for balanced sampling each carrying at least one finding."""
    names = DEFAULT_SECTIONS if sections is None else tuple(sections)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"config.data.sections={names}: unknown, repeated or empty; the sections are "
                         f"{list(SECTIONS)}")
    empty = [s for s in names if not SECTION_FINDINGS[s]]
    if strategy == "balanced" and empty:
        raise ValueError(f"config.data.sections: {empty} carry none of the 30 findings, so no batch of "
                         "theirs can be abnormal; leave them out for balanced sampling")
    return names


def make_sampler(units: StudyUnits, global_batch: int, seed: int, *, strategy: str,
                 balance_ratio: float = 0.5, alternate: bool = True, sections: Sequence[str] | None = None,
                 period: int = 2, order: str = "round_robin") -> BatchSampler:
    """The study's three strategies on one schedule rule:

    * random: full reports only, random composition (the reproduction's simple baseline);
    * alternating: Merlin's full-report / section alternation, random composition;
    * balanced: the alternating schedule (or full reports only with `alternate=False`), every batch
      with `balance_ratio` normal studies.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"config.data.sampling={strategy!r}: choose one of {list(STRATEGIES)}")
    names = _check_sections(strategy, sections)
    use_sections = strategy == "alternating" or (strategy == "balanced" and alternate)
    schedule = Schedule(tuple(UNITS.index(s) for s in names) if use_sections else (), period, order, seed)
    return BatchSampler(units, schedule, global_batch, seed,
                        composition="balanced" if strategy == "balanced" else "random",
                        balance_ratio=balance_ratio if strategy == "balanced" else None)


# ---------------------------------------------------------------------------------------------------
# Run statistics
# ---------------------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict:
    if not len(values):
        return {"min": None, "mean": None, "max": None}
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


def run_statistics(sampler: BatchSampler, total_steps: int) -> dict:
    """What the batches of steps [0, total_steps) contain: the numbers a reader of a batch-composition
    study needs (unique studies, class counts, steps per unit, realised normal fraction per batch)."""
    units = sampler.units
    n = len(units)
    seen = np.zeros(n, np.int64)
    steps_per_unit = {u: 0 for u in (FULL,) + sampler.schedule.sections}
    counts = {u: [0, 0] for u in steps_per_unit}
    frac: dict[str, list[float]] = {"all": [], "full": [], "section": []}
    for step in range(total_steps):
        b = sampler.batch(step)
        np.add.at(seen, b.indices, 1)
        steps_per_unit[b.unit] += 1
        ab = int(units.abnormal[b.indices, b.unit].sum())
        counts[b.unit][0] += len(b.indices) - ab
        counts[b.unit][1] += ab
        f = (len(b.indices) - ab) / len(b.indices)
        frac["all"].append(f)
        frac["full" if b.unit == FULL else "section"].append(f)
    pool_sizes = {UNITS[u]: {"normal": int((units.available[:, u] & ~units.abnormal[:, u]).sum()),
                             "abnormal": int(units.abnormal[:, u].sum())} for u in steps_per_unit}
    return {
        "total_steps": total_steps,
        "global_batch": sampler.global_batch,
        "composition": sampler.composition,
        "balance_ratio": sampler.balance_ratio,
        "normal_per_batch": sampler.n_normal,
        "schedule": sampler.schedule.describe(),
        "train_studies": n,
        "unique_studies_seen": int((seen > 0).sum()),
        "samples_per_study": _summary(seen),
        "steps_per_unit": {UNITS[u]: c for u, c in steps_per_unit.items()},
        "class_counts": {UNITS[u]: {"normal": c[0], "abnormal": c[1]} for u, c in counts.items()},
        "class_pool_sizes": pool_sizes,
        "normal_fraction_per_batch": {k: _summary(v) for k, v in frac.items()},
    }
