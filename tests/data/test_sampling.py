"""Property tests of the batch-composition samplers (vljax/data/sampling.py) and the Grain source.

The sampler tests use a synthetic population with known classes; the pipeline tests use the small
phantom of conftest.py.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from vljax.data import ct as ct_lib
from vljax.data import pipeline, reports, sampling
from vljax.data.findings import FINDINGS, SECTION_FINDINGS, SECTIONS
from vljax.data.manifest import load_manifest

U = len(sampling.UNITS)
SECTION_UNITS = tuple(sampling.UNITS.index(s) for s in sampling.DEFAULT_SECTIONS)


def population(n: int = 200, seed: int = 0, p_abnormal: float = 0.1, p_section: float = 0.9) -> sampling.StudyUnits:
    """n studies; each section with findings is abnormal with probability `p_abnormal` (one of its
    findings labelled 1), other findings 0 or -1; each section text present with `p_section`."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, -1], size=(n, len(FINDINGS)))
    for section in sampling.DEFAULT_SECTIONS:
        cols = [FINDINGS.index(f) for f in SECTION_FINDINGS[section]]
        hit = np.flatnonzero(rng.uniform(size=n) < p_abnormal)
        labels[hit, rng.choice(cols, size=len(hit))] = 1
    available = rng.uniform(size=(n, U)) < p_section
    return sampling.StudyUnits.from_labels(labels, available)


def batches(sampler, steps):
    return [sampler.batch(s) for s in range(steps)]


STRATEGIES = [dict(strategy="random"), dict(strategy="alternating"),
              dict(strategy="balanced", balance_ratio=0.25), dict(strategy="balanced", balance_ratio=0.5),
              dict(strategy="balanced", balance_ratio=0.75),
              dict(strategy="balanced", balance_ratio=0.5, alternate=False)]


# ---------------------------------------------------------------------------------------------------
# Classes and units
# ---------------------------------------------------------------------------------------------------


def test_abnormal_follows_the_finding_to_section_map():
    labels = np.zeros((3, len(FINDINGS)), np.int8)
    labels[0, FINDINGS.index("ascites")] = 1          # peritoneum
    labels[1, FINDINGS.index("hepatic steatosis")] = 1  # liver
    labels[1, FINDINGS.index("fracture")] = -1          # not mentioned: not abnormal
    available = np.ones((3, U), bool)
    available[0, sampling.UNITS.index("peritoneum")] = False  # the finding's section text is missing
    units = sampling.StudyUnits.from_labels(labels, available)
    ab = {sampling.UNITS[u]: units.abnormal[:, u].tolist() for u in range(U)}
    assert ab["full"] == [True, True, False]
    assert ab["liver"] == [False, True, False]
    assert ab["peritoneum"] == [False, False, False]  # not available, so never a section-batch member
    assert ab["musculoskeletal"] == [False, False, False]
    assert not units.abnormal[:, sampling.UNITS.index("adrenal_glands")].any()
    # every finding maps to exactly one section unit
    for f in FINDINGS:
        lab = np.zeros((1, len(FINDINGS)), np.int8)
        lab[0, FINDINGS.index(f)] = 1
        got = sampling.StudyUnits.from_labels(lab, np.ones((1, U), bool)).abnormal[0]
        assert got[sampling.FULL] and got[1:].sum() == 1
        assert f in SECTION_FINDINGS[sampling.UNITS[int(np.flatnonzero(got[1:])[0]) + 1]]


def test_study_units_on_phantom_reports(phantom_dir):
    records = load_manifest(phantom_dir).split("train")
    texts = sampling.unit_texts(records)
    units = sampling.study_units(records, texts)
    for r, t, avail in zip(records, texts, units.available):
        split = reports.split_sections(r.findings)
        assert avail[sampling.FULL]
        assert [bool(split.sections[s]) for s in SECTIONS] == avail[1:].tolist()
        assert t["full"] == reports.normalize_report_text(r.findings)


# ---------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", STRATEGIES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_identical_seeds_identical_batches_and_different_seeds_differ(kw):
    units = population()
    a = batches(sampling.make_sampler(units, 8, 3, **kw), 120)
    b = batches(sampling.make_sampler(units, 8, 3, **kw), 120)
    c = batches(sampling.make_sampler(units, 8, 4, **kw), 120)
    assert all(x.unit == y.unit and np.array_equal(x.indices, y.indices) for x, y in zip(a, b))
    assert sum(np.array_equal(x.indices, y.indices) for x, y in zip(a, c)) < 3
    # random access: any step on its own equals the sequential value
    fresh = sampling.make_sampler(units, 8, 3, **kw)
    for s in (119, 0, 57, 58):
        assert np.array_equal(fresh.batch(s).indices, a[s].indices)


@pytest.mark.parametrize("kw", STRATEGIES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_no_study_repeats_within_a_batch_or_a_class_epoch(kw):
    """Rebuilt from the batches alone: per (unit, class) the j-th use of a unit draws `take` studies
    of that class; consecutive floor(pool / take) uses form an epoch, which must hold distinct
    studies of the pool and leave out fewer than `take` of them."""
    units = population(n=160)
    batch = 8
    sampler = sampling.make_sampler(units, batch, 0, **kw)
    balanced = kw["strategy"] == "balanced"
    takes = ((round(kw["balance_ratio"] * batch), batch - round(kw["balance_ratio"] * batch)) if balanced
             else (batch,))
    uses: dict[int, int] = {}
    epochs: dict[tuple, list] = {}
    for s in range(400):
        b = sampler.batch(s)
        assert len(set(b.indices.tolist())) == len(b.indices) == batch
        assert units.available[b.indices, b.unit].all()
        j = uses.get(b.unit, 0)
        uses[b.unit] = j + 1
        ab = units.abnormal[b.indices, b.unit]
        groups = (b.indices[~ab], b.indices[ab]) if balanced else (b.indices,)
        for cls, (members, take) in enumerate(zip(groups, takes)):
            assert len(members) == take
            pool = units.available[:, b.unit] & ((units.abnormal[:, b.unit] == bool(cls)) if balanced else True)
            per_epoch = int(pool.sum()) // take if take else 1
            epochs.setdefault((b.unit, cls, j // per_epoch, int(pool.sum()), take), []).extend(members.tolist())
    complete = 0
    for (unit, cls, epoch, pool_size, take), members in epochs.items():
        assert len(members) == len(set(members)), (unit, cls, epoch)
        if len(members) == (pool_size // take) * take and take:
            complete += 1
            assert pool_size - len(members) < take  # an epoch covers its pool but the remainder
    assert complete > 0


# ---------------------------------------------------------------------------------------------------
# Balanced batches
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,batch,normal", [(0.25, 8, 2), (0.5, 8, 4), (0.75, 8, 6), (0.25, 6, 2),
                                                (0.5, 6, 3), (0.75, 6, 5), (0.75, 4, 3)])
def test_balanced_batches_hit_the_ratio_on_every_batch(ratio, batch, normal):
    units = population(n=600)  # abnormal is the minority in every section (not in full reports)
    sampler = sampling.make_sampler(units, batch, 1, strategy="balanced", balance_ratio=ratio)
    for s in range(400):
        b = sampler.batch(s)
        n_normal = int((~units.abnormal[b.indices, b.unit]).sum())
        assert n_normal == normal, (s, sampling.UNITS[b.unit])
    stats = sampling.run_statistics(sampler, 400)
    f = normal / batch
    got = stats["normal_fraction_per_batch"]["all"]
    assert got["min"] == got["max"] == f and got["mean"] == pytest.approx(f, abs=1e-12)


def test_minority_class_cycles_and_majority_is_spread():
    labels = np.zeros((400, len(FINDINGS)), np.int8)
    labels[np.arange(0, 400, 40), 3] = 1  # 10 abnormal studies, 390 normal
    units = sampling.StudyUnits.from_labels(labels, np.ones((400, U), bool))
    sampler = sampling.make_sampler(units, 8, 0, strategy="balanced", balance_ratio=0.5, alternate=False)
    counts = np.zeros(len(units), int)
    for s in range(200):
        np.add.at(counts, sampler.batch(s).indices, 1)
    abnormal = units.abnormal[:, sampling.FULL]
    # 800 abnormal slots over the few abnormal studies, 800 normal slots over many normal ones
    assert counts[abnormal].sum() == counts[~abnormal].sum() == 800
    assert counts[abnormal].min() > 10 * counts[~abnormal].max()  # the minority cycles many times
    assert (counts[~abnormal] > 0).mean() > 0.85  # the majority is spread, not resampled


def test_balanced_refuses_a_class_too_small_for_one_batch():
    units = population(n=60, p_abnormal=0.02)  # about one abnormal study per section
    with pytest.raises(ValueError, match=r"abnormal studies.*balance_ratio"):
        sampling.make_sampler(units, 8, 0, strategy="balanced", balance_ratio=0.0)
    with pytest.raises(ValueError, match="carry none of the 30 findings"):
        sampling.make_sampler(population(), 8, 0, strategy="balanced", sections=("liver", "adrenal_glands"))


# ---------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------


def test_alternating_follows_its_round_robin_schedule():
    units = population()
    sampler = sampling.make_sampler(units, 8, 0, strategy="alternating")
    K = len(SECTION_UNITS)
    for s in range(4 * K):
        b = sampler.batch(s)
        if s % 2 == 0:
            assert b.unit == sampling.FULL
        else:
            assert b.unit == SECTION_UNITS[(s // 2) % K]
            assert units.available[b.indices, b.unit].all()  # only studies that have the section
    assert sampling.UNITS.index("adrenal_glands") not in sampler.schedule.sections


@pytest.mark.parametrize("period", [2, 3, 5])
def test_seeded_section_order_covers_every_section_once_per_cycle(period):
    units = population()
    sampler = sampling.make_sampler(units, 8, 5, strategy="alternating", period=period, order="seeded")
    K = len(SECTION_UNITS)
    section_steps = [s for s in range(period * K * 6) if s % period == period - 1]
    assert all(sampler.unit(s) == sampling.FULL for s in range(period * K * 6) if s % period != period - 1)
    cycles = [[sampler.unit(s) for s in section_steps[c * K:(c + 1) * K]] for c in range(6)]
    assert all(sorted(c) == sorted(SECTION_UNITS) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # seeded, not a fixed order
    other = sampling.make_sampler(units, 8, 6, strategy="alternating", period=period, order="seeded")
    assert [other.unit(s) for s in section_steps] != [sampler.unit(s) for s in section_steps]


def test_every_strategy_has_the_same_steps_and_schedule():
    units = population()
    steps = 500
    schedules = {}
    for kw in STRATEGIES:
        sampler = sampling.make_sampler(units, 8, 0, **kw)
        schedules[tuple(kw.items())] = [sampler.unit(s) for s in range(steps)]
    alternating = schedules[(("strategy", "alternating"),)]
    for key, sched in schedules.items():
        uses_sections = dict(key)["strategy"] != "random" and dict(key).get("alternate", True)
        assert sched == (alternating if uses_sections else [sampling.FULL] * steps), key
    # the data seed changes which studies fill a batch, never the schedule
    a = sampling.make_sampler(units, 8, 0, strategy="balanced", balance_ratio=0.25)
    b = sampling.make_sampler(units, 8, 9, strategy="balanced", balance_ratio=0.25)
    assert [a.unit(s) for s in range(steps)] == [b.unit(s) for s in range(steps)]


def test_run_statistics_count_what_the_batches_hold():
    units = population(n=150)
    sampler = sampling.make_sampler(units, 8, 2, strategy="balanced", balance_ratio=0.75)
    stats = sampling.run_statistics(sampler, 90)
    seen, normal, abnormal, per_unit = set(), 0, 0, {}
    for s in range(90):
        b = sampler.batch(s)
        seen.update(b.indices.tolist())
        ab = units.abnormal[b.indices, b.unit]
        normal += int((~ab).sum())
        abnormal += int(ab.sum())
        per_unit[sampling.UNITS[b.unit]] = per_unit.get(sampling.UNITS[b.unit], 0) + 1
    assert stats["unique_studies_seen"] == len(seen)
    assert sum(c["normal"] for c in stats["class_counts"].values()) == normal
    assert sum(c["abnormal"] for c in stats["class_counts"].values()) == abnormal
    assert {k: v for k, v in stats["steps_per_unit"].items() if v} == per_unit
    assert stats["steps_per_unit"]["full"] == 45


# ---------------------------------------------------------------------------------------------------
# Data fractions
# ---------------------------------------------------------------------------------------------------


def test_fractions_are_nested_and_seeded():
    n = 1003
    s20, s40, s100 = (sampling.subset_indices(n, f, 7) for f in (0.2, 0.4, 1.0))
    assert (len(s20), len(s40), len(s100)) == (201, 401, n)
    assert set(s20) < set(s40) < set(s100) == set(range(n))
    assert np.array_equal(s20, np.sort(s20))
    assert np.array_equal(s20, sampling.subset_indices(n, 0.2, 7))
    assert not np.array_equal(s20, sampling.subset_indices(n, 0.2, 8))
    with pytest.raises(ValueError, match="train_fraction"):
        sampling.subset_indices(n, 0.0, 7)


def test_check_options_name_the_config_field():
    ok = dict(strategy="balanced", balance_ratio=0.25, train_fraction=0.4, sections=None, period=2,
              order="round_robin")
    sampling.check_options(**ok)
    for bad, field in [(dict(strategy="stratified"), "data.sampling"), (dict(balance_ratio=1.5), "data.balance_ratio"),
                       (dict(train_fraction=0.0), "data.train_fraction"), (dict(order="random"), "data.section_order"),
                       (dict(period=1), "data.section_period"), (dict(sections=("liver", "brain")), "data.sections"),
                       (dict(sections=("liver", "liver")), "data.sections"),
                       (dict(sections=("liver", "adrenal_glands")), "data.sections"),
                       (dict(seeds={"data_seed": -1}), "data_seed")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            sampling.check_options(**{**ok, **bad})


# ---------------------------------------------------------------------------------------------------
# Multi-host slices and the Grain source
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 4])
def test_host_slices_are_disjoint_and_complete(processes):
    units = population()
    sampler = sampling.make_sampler(units, 8, 0, strategy="balanced", balance_ratio=0.25)
    for s in range(50):
        full = sampler.batch(s).indices
        parts = [full[pipeline.host_slice(8, p, processes)] for p in range(processes)]
        assert all(len(p) == 8 // processes for p in parts)
        assert np.array_equal(np.concatenate(parts), full)
        assert not set.intersection(*(set(p.tolist()) for p in parts))
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.host_slice(8, 0, 3)


def _source(phantom_dir, strategy="alternating", process_index=0, process_count=1, cache_volumes=False,
            on_error="raise", **kw):
    from vljax.data.reports import load_tokenizer

    records = load_manifest(phantom_dir).split("train")
    texts = sampling.unit_texts(records)
    units = sampling.study_units(records, texts)
    sampler = sampling.make_sampler(units, 4, 0, strategy=strategy, **kw)
    unit_texts = pipeline.tokenize_units(load_tokenizer(), texts, (0,) + sampler.schedule.sections, 48)
    cfg = ct_lib.CTPreprocessConfig(spacing=(30.0, 30.0, 40.0), shape=(8, 8, 6))
    volumes, bad = pipeline.preload_volumes(records, cfg, workers=2, on_error=on_error) if cache_volumes else (None, ())
    return pipeline.TrainBatches(records, unit_texts, sampler, 12, cfg, process_index=process_index,
                                 process_count=process_count, volumes=volumes, on_error=on_error, bad=bad), texts


def _flat(item: dict) -> dict:
    """A training source item's step inputs and its bookkeeping, in one dict (their keys differ)."""
    assert item.keys() == {"inputs", "meta"} and not item["inputs"].keys() & item["meta"].keys()
    return {**item["inputs"], **item["meta"]}


def test_cached_volumes_give_the_same_batches_as_loading_each_batch(phantom_dir):
    loaded, _ = _source(phantom_dir)
    cached, _ = _source(phantom_dir, cache_volumes=True)
    assert cached.loader.volumes.shape == (len(cached.loader.records), 6, 8, 8)
    for step in range(5):
        a, b = _flat(loaded[step]), _flat(cached[step])
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_volume_cache_refuses_what_does_not_fit(phantom_dir):
    records = load_manifest(phantom_dir).split("train")
    cfg = ct_lib.CTPreprocessConfig(spacing=(30.0, 30.0, 40.0), shape=(8, 8, 6))
    with pytest.raises(ValueError, match="cache_volumes=False"):
        pipeline.preload_volumes(records, cfg, max_bytes=1000)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_sources_split_every_global_batch(phantom_dir, processes):
    whole, _ = _source(phantom_dir)
    parts = [_source(phantom_dir, process_index=p, process_count=processes)[0] for p in range(processes)]
    for step in range(6):
        ref = _flat(whole[step])
        got = [_flat(p[step]) for p in parts]
        assert all(int(g["unit"]) == int(ref["unit"]) for g in got)
        for key in ("study_index", "image", "input_ids", "attention_mask"):
            assert np.array_equal(np.concatenate([g[key] for g in got]), ref[key]), key


def test_source_batches_carry_the_unit_text(phantom_dir):
    from vljax.data.reports import load_tokenizer

    source, texts = _source(phantom_dir, strategy="alternating")
    tok = load_tokenizer()
    for step in range(4):
        b = _flat(source[step])
        unit = sampling.UNITS[int(b["unit"])]
        assert unit == ("full" if step % 2 == 0 else sampling.DEFAULT_SECTIONS[step // 2])
        want = reports.tokenize(tok, [texts[i][unit] for i in b["study_index"]], 48)
        assert np.array_equal(b["input_ids"], want["input_ids"])
        assert np.array_equal(b["attention_mask"], want["attention_mask"])


@pytest.mark.parametrize("workers", [0, 1])
def test_grain_iterator_resumes_exactly(phantom_dir, workers):
    """Stop after 3 batches, restore the iterator state in a new iterator (with worker processes
    too) and continue past the first epoch boundary of the full-report stream."""
    source, _ = _source(phantom_dir)
    it = pipeline.make_iterator(source, workers=workers)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [_flat(next(it)) for _ in range(9)]
    full_uses = sum(int(b["unit"]) == 0 for b in rest) + 2
    assert full_uses > source.sampler.streams[0][0].per_epoch  # crossed into the second epoch
    it2 = pipeline.make_iterator(source, workers=workers)
    it2.set_state(state)
    for want in rest:
        got = _flat(next(it2))
        assert int(got["step"]) == int(want["step"])
        for key in want:
            assert np.array_equal(got[key], want[key]), key


def test_locked_text_cache_is_ragged_and_pads_back():
    ids = np.array([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0], [101, 102, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    table = pipeline.TextTable(ids, mask)
    hidden = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float16) * mask[..., None]
    flat = np.concatenate([hidden[r, :mask[r].sum()] for r in range(3)])
    table = pipeline.TextTable(ids, mask, flat, np.array([0, 4, 7, 9]))
    assert np.array_equal(table.hidden(np.array([2, 0, 0])), hidden[[2, 0, 0]])


def test_small_section_pools_are_refused_clearly():
    units = population(n=20, p_section=0.3)
    with pytest.raises(ValueError, match=r"section.*config\.data\.sections"):
        sampling.make_sampler(units, 8, 0, strategy="alternating")
    # full reports only still work on the same population
    assert sampling.make_sampler(units, 8, 0, strategy="random").schedule.sections == ()


def test_the_three_seeds_are_independent(phantom_dir):
    """Model seed: no effect on data. Data seed: order, not the subset. Subset seed: the subset."""
    from configs import merlin
    from vljax import inputs

    manifest = load_manifest(phantom_dir)

    def data(**changes):
        c = merlin.get_config("phantom")
        c.data.train_fraction = 0.7
        c.batch_size = 4
        for k, v in changes.items():
            c[k] = v
        records = inputs.train_records(c, manifest)
        sampler, _ = inputs.make_sampler(c, records)
        return [r.study_id for r in records], [sampler.indices(s).tolist() for s in range(10)]

    base = data()
    assert data(seed=5) == base
    other_order = data(data_seed=5)
    assert other_order[0] == base[0] and other_order[1] != base[1]
    assert data(subset_seed=5)[0] != base[0]


def _damaged_copy(phantom_dir, tmp_path, n_bad=1):
    """A copy of the phantom whose first `n_bad` training volumes are cut in half (unreadable)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    bad = load_manifest(data).split("train")[:n_bad]
    for r in bad:
        raw = pathlib.Path(r.image).read_bytes()
        pathlib.Path(r.image).write_bytes(raw[: len(raw) // 2])
    return data, [r.study_id for r in bad]


@pytest.mark.parametrize("strategy, kw", [("random", {}), ("balanced", {"balance_ratio": 0.25, "alternate": False})])
@pytest.mark.parametrize("cache_volumes", [False, True])
def test_skip_stands_in_a_study_of_the_same_class_stream_deterministically(phantom_dir, tmp_path, strategy, kw,
                                                                          cache_volumes):
    data, (bad_id,) = _damaged_copy(phantom_dir, tmp_path)
    if cache_volumes:
        records = load_manifest(data).split("train")
        cfg = ct_lib.CTPreprocessConfig(spacing=(30.0, 30.0, 40.0), shape=(8, 8, 6))
        volumes, bad = pipeline.preload_volumes(records, cfg, workers=1, on_error="skip")
        assert [records[i].study_id for i in bad] == [bad_id] and not volumes[bad[0]].any()
    src, _ = _source(data, strategy, cache_volumes=cache_volumes, on_error="skip", **kw)
    clean, _ = _source(phantom_dir, strategy, **kw)
    bad_index = [r.study_id for r in src.loader.records].index(bad_id)
    seen = 0
    for step in range(12):
        item, again, ref = src[step], src[step], clean[step]
        planned = src.sampler.indices(step)
        got = item["meta"]["study_index"]
        np.testing.assert_array_equal(got, again["meta"]["study_index"])   # a function of (seed, step)
        np.testing.assert_array_equal(item["inputs"]["image"], again["inputs"]["image"])
        if bad_index not in planned:
            np.testing.assert_array_equal(item["inputs"]["image"], ref["inputs"]["image"])
            assert not len(item["meta"]["skipped"])
            continue
        seen += 1
        assert item["meta"]["skipped"].tolist() == [bad_index] and bad_index not in got
        (pos,) = np.flatnonzero(planned == bad_index)
        stand_in, unit = int(got[pos]), int(item["meta"]["unit"])
        units = src.sampler.units
        assert units.available[stand_in, unit]
        if strategy == "balanced":  # the batch keeps its normal:abnormal composition
            assert units.abnormal[stand_in, unit] == units.abnormal[bad_index, unit]
        others = np.delete(np.arange(len(planned)), pos)
        np.testing.assert_array_equal(got[others], planned[others])
    assert seen  # the damaged study was drawn


def test_an_unreadable_volume_raises_naming_the_study_and_the_remedies(phantom_dir, tmp_path):
    data, (bad_id,) = _damaged_copy(phantom_dir, tmp_path)
    src, _ = _source(data, "random")
    bad_index = [r.study_id for r in src.loader.records].index(bad_id)
    step = next(s for s in range(12) if bad_index in src.sampler.indices(s))
    with pytest.raises(ct_lib.CTLoadError, match=rf"study {bad_id}: .*vljax.validate.*on_error=skip"):
        src[step]


def test_evaluation_batches_leave_unreadable_studies_out(phantom_dir, tmp_path):
    data, (bad_id,) = _damaged_copy(phantom_dir, tmp_path)
    records = load_manifest(data).split("train")
    cfg = ct_lib.CTPreprocessConfig(spacing=(30.0, 30.0, 40.0), shape=(8, 8, 6))
    table = pipeline.TextTable(np.zeros((len(records), 4), np.int32), np.ones((len(records), 4), np.int32))
    ev = pipeline.EvalBatches(records, table, 4, cfg, on_error="skip")
    valid = np.concatenate([ev[i]["valid"] for i in range(len(ev))])
    positions = np.concatenate([ev[i]["position"] for i in range(len(ev))])
    kept = [records[p].study_id for p, v in zip(positions, valid) if v]
    assert kept == [r.study_id for r in records if r.study_id != bad_id]
