"""Chest X-ray pipeline: image loading and its errors, augmentation geometry, view and text sampling
rules, the epoch order, and the training / evaluation sources (pure functions of seeds and step,
per-process slices, Grain workers)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from vljax.data import cxr_pipeline as cp
from vljax.data import pipeline
from vljax.data.cxr_manifest import CXRImage, CXRStudy
from vljax.data.cxr_prompts import parse_bank, two_draws
from vljax.data.reports import normalize_report_text, split_sentences

BANK = parse_bank({f"c{c}": {kind: [f"C{c} {kind} {k}." for k in range(4)] for kind in ("pos", "neg", "unc")}
                   for c in range(4)})
MEAN, STD = 0.5, 0.25
FILE_LEVELS = (0.1, 0.5, 0.9)   # constant value of each test file, far apart: a view's mean names its file
SOFT = cp.CXRAugment(contrast=0.1)   # shifts a constant image by < 0.1


class BytesEncoder:
    """Fake encoder: each text's UTF-8 bytes, zero-padded, and its length (decodable in tests)."""

    def __call__(self, texts):
        out = np.zeros((len(texts), 160), np.uint8)
        for r, t in enumerate(texts):
            b = t.encode()[:160]
            out[r, :len(b)] = np.frombuffer(b, np.uint8)
        return {"bytes": out, "length": np.array([len(t) for t in texts], np.int32)}

    def __repr__(self):
        return "BytesEncoder()"


def decode(row: np.ndarray) -> str:
    return bytes(row[row > 0]).decode()


def _png(path, value: float, shape=(40, 48)):
    Image.fromarray(np.full(shape, round(value * 255), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """12 studies: 1, 2 or 3 constant images each (levels 0.1 / 0.5 / 0.9 in that order); reports with
    both sections, one section, or labels only."""
    d = tmp_path_factory.mktemp("cxr")
    records = []
    for s in range(12):
        n = 1 + s % 3
        images = tuple(CXRImage(_png(d / f"s{s}_{k}.png", FILE_LEVELS[k]), ("PA", "LATERAL", "AP")[k])
                       for k in range(n))
        kind = s % 4
        findings = f"Heart size normal {s}. Lungs clear. No effusion." if kind in (0, 1) else None
        impression = f"No acute disease {s}." if kind in (0, 2) else None
        labels = (("c0", 1), ("c2", 0)) if kind in (1, 3) else None
        records.append(CXRStudy(f"s{s}", "train", images, findings, impression, labels, "test"))
    return tuple(records)


def _source(records, **kw):
    args = dict(total_steps=6, batch_size=4, seed=3, image_size=16, mean=MEAN, std=STD, aug=SOFT)
    args.update(kw)
    sampler = cp.EpochSampler(len(records), args["batch_size"], seed=11)
    return cp.CXRTrainBatches(records, sampler, BANK, BytesEncoder(), **args)


def _file_level(view: np.ndarray) -> int:
    """Which FILE_LEVELS file an (un-normalised, constant) view came from."""
    x = view * STD + MEAN
    assert x.std() < 1e-3
    return int(np.argmin([abs(x.mean() - v) for v in FILE_LEVELS]))


# --- images -------------------------------------------------------------------------------------


def test_load_cxr_image_reads_8_and_16_bit_png_jpeg_rgb_and_la(tmp_path):
    g8 = np.arange(48 * 40, dtype=np.uint8).reshape(40, 48)
    Image.fromarray(g8).save(tmp_path / "a.png")
    assert np.array_equal(cp.load_cxr_image(tmp_path / "a.png"), g8 / np.float32(255))
    g16 = (np.arange(48 * 40, dtype=np.uint16) * 30).reshape(40, 48)
    Image.fromarray(g16).save(tmp_path / "b.png")
    out = cp.load_cxr_image(tmp_path / "b.png")
    assert out.dtype == np.float32 and np.allclose(out, g16 / 65535.0, atol=1e-7)
    Image.fromarray(np.stack([g8] * 3, -1)).save(tmp_path / "c.jpg", quality=95)
    assert np.abs(cp.load_cxr_image(tmp_path / "c.jpg") - g8 / 255).max() < 0.1
    Image.fromarray(np.stack([g8, np.full_like(g8, 255)], -1), mode="LA").save(tmp_path / "d.png")
    assert np.array_equal(cp.load_cxr_image(tmp_path / "d.png"), g8 / np.float32(255))


def test_a_corrupt_or_missing_image_names_study_and_file_only(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8)).save(good)
    truncated = tmp_path / "bad.png"
    truncated.write_bytes(good.read_bytes()[:600])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage, tmp_path / "missing.png"):
        with pytest.raises(cp.CXRImageError, match=f"study p7: image {path}: ") as e:
            cp.load_cxr_image(path, "p7")
        assert isinstance(e.value, ValueError)
        again = pickle.loads(pickle.dumps(e.value))
        assert (again.study_id, again.path, str(again)) == ("p7", str(path), str(e.value))
    study = CXRStudy("p7", "train", (CXRImage(str(truncated), "PA"),), findings="Secret text.")
    with pytest.raises(cp.CXRImageError, match="study p7") as e:
        _source((study,), batch_size=1)[0]
    assert "ecret" not in str(e.value)


def test_random_resized_crop_geometry():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = cp.sample_crop_box(rng, 60, 80)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.58 <= h * w / 4800 <= 1.0 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert cp.sample_crop_box(rng, 100, 10) == (43, 0, 13, 10)   # no try fits: centred, aspect clamped to 3/4
    # a horizontal gradient: the crop is increasing along x, constant along y, and lies in range
    grad = np.broadcast_to(np.linspace(0, 1, 80, dtype=np.float32), (60, 80))
    for seed in range(20):
        top, left, h, w = cp.sample_crop_box(np.random.default_rng(seed), 60, 80)
        out = cp.random_resized_crop(grad, np.random.default_rng(seed), 16)
        assert out.shape == (16, 16) and out.dtype == np.float32
        assert np.all(np.diff(out[0]) > 0) and np.allclose(out, out[:1], atol=1e-6)
        assert grad[0, left] - 1e-6 <= out.min() and out.max() <= grad[0, left + w - 1] + 1e-6


def test_centre_crop_is_identity_at_size_and_takes_the_middle():
    img = np.random.default_rng(0).random((16, 16), np.float32)
    assert np.array_equal(cp.centre_crop(img, 16), img)
    tall = np.zeros((48, 16), np.float32)
    tall[12:36] = 1.0   # the centre square (rows 16-31) and the resampling filter's reach around it
    out = cp.centre_crop(tall, 8)
    assert out.shape == (8, 8) and np.allclose(out, 1.0)
    wide = np.broadcast_to(np.linspace(0, 1, 64, dtype=np.float32), (16, 64))
    out = cp.centre_crop(wide, 16)   # columns 24-39
    assert np.allclose(out[0], wide[0, 24:40], atol=1e-6)


def test_random_contrast_stays_in_range_and_zero_strength_is_identity():
    img = np.random.default_rng(0).random((16, 16), np.float32)
    outs = [cp.random_contrast(img, np.random.default_rng(s), 0.5) for s in range(10)]
    assert all(o.min() >= 0 and o.max() <= 1 and o.dtype == np.float32 for o in outs)
    assert not np.array_equal(outs[0], outs[1])
    assert np.array_equal(cp.random_contrast(img, np.random.default_rng(0), 0.0), img)
    rot = cp.augment(img, np.random.default_rng(0), 12, cp.CXRAugment(rotate_degrees=10))
    assert rot.shape == (12, 12) and rot.min() >= 0 and rot.max() <= 1


# --- views and texts ----------------------------------------------------------------------------


def test_sample_views_pairs_distinct_images_or_repeats_a_single_one(studies):
    one, three = studies[0], studies[2]
    assert cp.sample_views(one, np.random.default_rng(0)) == (one.images[0].path,) * 2
    pairs = {cp.sample_views(three, np.random.default_rng(s)) for s in range(60)}
    assert all(a != b for a, b in pairs) and len(pairs) == 6   # every ordered pair of the 3 images


def test_two_sections_come_in_random_order(studies):
    s = studies[0]   # findings and impression
    want = {normalize_report_text(s.findings), normalize_report_text(s.impression)}
    pairs = [cp.sample_texts(s, BANK, 1, 0, step) for step in range(20)]
    assert all(set(p) == want for p in pairs) and len(set(pairs)) == 2
    assert pairs == [cp.sample_texts(s, BANK, 1, 0, step) for step in range(20)]


def test_one_section_second_text_modes(studies):
    s = studies[1]   # findings only, three sentences (and labels, unused at report_prompt_prob 0)
    t1 = normalize_report_text(s.findings)
    assert all(cp.sample_texts(s, BANK, 1, 1, k, second_text="same") == (t1, t1) for k in range(5))
    sentences = split_sentences(t1)
    seen = set()
    for k in range(40):
        a, b = cp.sample_texts(s, BANK, 1, 1, k)
        kept = split_sentences(b)
        assert a == t1 and kept and kept == [x for x in sentences if x in kept]
        seen.add(b)
    assert len(seen) >= 5 and len(seen) <= 7   # non-empty subsets of 3 sentences
    single = CXRStudy("x", "train", s.images, impression="No acute disease.")
    assert cp.sample_texts(single, None, 1, 0, 0) == ("no acute disease .",) * 2
    with pytest.raises(ValueError, match="second_text"):
        cp.sample_texts(s, BANK, 1, 1, 0, second_text="other")


def test_label_only_studies_use_two_draws_and_reports_may_use_prompts(studies):
    s = studies[3]   # labels only
    for step in range(5):
        want = tuple(normalize_report_text(t) for t in two_draws(s.label_dict(), BANK, 9, 3, step))
        assert cp.sample_texts(s, BANK, 9, 3, step) == want
    labelled_report = studies[1]
    want = tuple(normalize_report_text(t) for t in two_draws(labelled_report.label_dict(), BANK, 9, 1, 0))
    assert cp.sample_texts(labelled_report, BANK, 9, 1, 0, report_prompt_prob=1.0) == want
    with pytest.raises(ValueError, match="study bare: no report section and no labels"):
        cp.sample_texts(CXRStudy("bare", "train", s.images), BANK, 0, 0, 0)


# --- order, sources -----------------------------------------------------------------------------


def test_epoch_sampler_covers_each_study_once_per_epoch():
    sampler = cp.EpochSampler(10, 4, seed=5)
    flat = np.concatenate([sampler.indices(k) for k in range(15)])   # 6 epochs
    epochs = flat.reshape(6, 10)
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 6
    assert np.array_equal(sampler.indices(7), cp.EpochSampler(10, 4, seed=5).indices(7))
    assert not np.array_equal(epochs[0], cp.EpochSampler(10, 4, seed=6).permutation(0))


def test_train_batches_are_pure_functions_of_step(studies):
    a, b = _source(studies), _source(studies)
    first = a[2]
    assert set(first["inputs"]) == {"image1", "image2", "bytes1", "bytes2", "length1", "length2"}
    assert first["inputs"]["image1"].shape == (4, 16, 16) and first["inputs"]["image1"].dtype == np.float32
    assert first["meta"]["study_index"].dtype == np.int32 and int(first["meta"]["step"]) == 2
    for got in (b[2], a[2]):
        for key in first["inputs"]:
            assert first["inputs"][key].tobytes() == got["inputs"][key].tobytes(), key
    other = a[3]
    assert not np.array_equal(first["inputs"]["image1"], other["inputs"]["image1"])
    for r, i in enumerate(first["meta"]["study_index"]):
        want = cp.sample_texts(studies[i], BANK, 3, int(i), 2)
        assert (decode(first["inputs"]["bytes1"][r]), decode(first["inputs"]["bytes2"][r])) == want


def test_views_of_one_file_differ_and_two_file_studies_use_two_files(studies):
    source = _source(studies, total_steps=9)
    rows = 0
    for step in range(9):   # 3 epochs of 12 studies
        batch = source[step]
        for r, i in enumerate(batch["meta"]["study_index"]):
            x1, x2 = batch["inputs"]["image1"][r], batch["inputs"]["image2"][r]
            f1, f2 = _file_level(x1), _file_level(x2)
            if len(studies[i].images) == 1:
                assert f1 == f2 == 0 and not np.array_equal(x1, x2)
            else:
                assert f1 != f2 and max(f1, f2) < len(studies[i].images)
            rows += 1
    assert rows == 36


def test_process_slices_concatenate_to_the_global_batch(studies):
    whole = _source(studies)[4]
    parts = [_source(studies, process_index=p, process_count=2)[4] for p in range(2)]
    for group in ("inputs", "meta"):
        for key, value in whole[group].items():
            if np.ndim(value):
                assert np.array_equal(np.concatenate([p[group][key] for p in parts]), value), key
    with pytest.raises(ValueError, match="not divisible"):
        _source(studies, process_count=3)


def test_fixed_order_and_bad_arguments(studies):
    order = np.arange(24) % 12
    source = cp.CXRTrainBatches(studies, order, BANK, BytesEncoder(), total_steps=6, batch_size=4, seed=0,
                                image_size=8, mean=0, std=1)
    assert list(source[1]["meta"]["study_index"]) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="too short"):
        cp.CXRTrainBatches(studies, order, BANK, BytesEncoder(), total_steps=7, batch_size=4, seed=0,
                           image_size=8, mean=0, std=1)
    with pytest.raises(ValueError, match="no prompt bank"):
        cp.CXRTrainBatches(studies, order, None, BytesEncoder(), total_steps=6, batch_size=4, seed=0,
                           image_size=8, mean=0, std=1)
    with pytest.raises(ValueError, match="std > 0"):
        _source(studies, std=0)


def test_token_encoder_pads_to_max_len_and_pickles_as_a_path():
    from vljax.data.reports import default_tokenizer_path

    enc = cp.TokenEncoder(default_tokenizer_path(), 12)
    out = enc(["no acute disease .", "heart size is normal ."])
    assert out["input_ids"].shape == (2, 12) and out["input_ids"].dtype == np.int32
    assert out["attention_mask"][0].sum() == 6   # [CLS] 4 words and "." [SEP]
    again = pickle.loads(pickle.dumps(enc))
    assert again._tokenizer is None and np.array_equal(again(["no acute disease ."])["input_ids"][0],
                                                       out["input_ids"][0])


def test_eval_images_pick_the_first_frontal_view_and_pad(tmp_path):
    def study(sid, views):
        return CXRStudy(sid, "test", tuple(CXRImage(_png(tmp_path / f"{sid}{k}.png", FILE_LEVELS[k], (24, 20)), v)
                                           for k, v in enumerate(views)), impression="x.")
    records = [study("a", ["LATERAL", "AP", "PA"]), study("b", ["LATERAL", "AP"]),
               study("c", ["LATERAL", "UNKNOWN"])]
    assert [cp.eval_image(r).view for r in records] == ["PA", "AP", "LATERAL"]
    source = cp.CXREvalImages(records, batch_size=2, image_size=8, mean=MEAN, std=STD)
    assert len(source) == 2
    batches = [source[0], source[1]]
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (4, 8, 8) and [_file_level(x) for x in images] == [2, 1, 0, 2]
    assert list(np.concatenate([b["valid"] for b in batches])) == [1, 1, 1, 0]
    assert list(np.concatenate([b["position"] for b in batches])) == [0, 1, 2, 3]
    halves = [cp.CXREvalImages(records, batch_size=2, image_size=8, mean=MEAN, std=STD, process_index=p,
                               process_count=2)[1] for p in range(2)]
    assert np.array_equal(np.concatenate([h["image"] for h in halves]), batches[1]["image"])


@pytest.mark.slow
def test_grain_workers_give_the_same_batches(studies):
    source = _source(studies)
    want = [source[k] for k in range(4)]
    with pipeline.closing_iterator(pipeline.make_iterator(source, workers=2)) as it:
        got = [next(it) for _ in range(4)]
    for w, g in zip(want, got):
        for key in w["inputs"]:
            assert np.array_equal(np.asarray(w["inputs"][key]), np.asarray(g["inputs"][key])), key
        assert np.array_equal(w["meta"]["study_index"], g["meta"]["study_index"])
