"""Chest X-ray input pipeline (CXR-CLIP, DESIGN.md §2; batch format in notes/cxr_spec.md).

Training: item k of `CXRTrainBatches` is this process's rows of step k's global batch, a pure function
of the seeds and k (no iterator state to resume). Step k's studies are rows [kB, (k+1)B) of the
concatenated seeded per-epoch permutations (`EpochSampler`). Per study and step, generators seeded by
(seed, study index, step, stream) pick two views (`sample_views`), their two augmentations
(`augment`) and two texts (`sample_texts`). A caller-given picklable `encoder(texts)` turns texts into
arrays; keys get the suffix 1 (T1) or 2 (T2). Evaluation (`CXREvalImages`) centre-crops the first
frontal image of every study, in order, padded to full batches.

Texts are normalised as everywhere in vljax (`reports.normalize_report_text`: "Heart: normal." ->
"heart : normal ."), report sections and prompt sentences alike; evaluation texts must be too.
Errors name study ids, files, classes and settings, never report text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vljax.data import cxr_prompts
from vljax.data import reports as reports_lib
from vljax.data.cxr_manifest import CXRImage, CXRStudy
from vljax.data.pipeline import host_slice

SECOND_TEXT_MODES = ("same", "sentence_subset")
# Generator streams per (seed, study index, step). cxr_prompts.two_draws seeds with the bare triple,
# which numpy's SeedSequence treats like stream 0, so these start at 1.
STREAM_VIEWS, STREAM_TEXT, STREAM_AUG1, STREAM_AUG2 = 1, 2, 3, 4
_EPOCH_TAG = 0xC0DE   # first seed word of the epoch permutations: apart from every per-study stream

Encoder = Callable[[list[str]], dict[str, np.ndarray]]


def study_rng(seed: int, study_index: int, step: int, stream: int) -> np.random.Generator:
    """The generator of one (study, step, stream): the same arguments give the same draws."""
    return np.random.default_rng([int(seed), int(study_index), int(step), int(stream)])


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


class CXRImageError(ValueError):
    """An image file that cannot be used. The message names the study id and the file, nothing else."""

    def __init__(self, message: str, study_id: str | None = None, path: str | None = None):
        self.message, self.study_id, self.path = message, study_id, path
        where = (f"study {study_id}: " if study_id is not None else "") + (f"image {path}: " if path else "")
        super().__init__(where + message)

    def __reduce__(self):  # keep the fields across process boundaries (Grain workers)
        return type(self), (self.message, self.study_id, self.path)


def load_cxr_image(path: str | os.PathLike, study_id: str | None = None) -> np.ndarray:
    """A PNG (8- or 16-bit) or JPEG file (anything PIL decodes) as float32 [H, W] in [0, 1]: 8-bit
    values / 255, 16-bit / 65535; RGB(A), palette and LA images become gray (PIL's luma, or L)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()   # decode now, so a truncated file fails here
            if im.mode == "LA":
                im = im.getchannel("L")
            elif im.mode in ("1", "P", "RGB", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise CXRImageError("file not found", study_id, path) from None
    except UnidentifiedImageError:
        raise CXRImageError("not an image file PIL can identify (expected PNG or JPEG)", study_id, path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:   # PIL's decoders: broken chunks, truncated data
        raise CXRImageError(f"cannot be decoded ({type(e).__name__}: {e})", study_id, path) from None
    if im.mode == "L":
        out = arr.astype(np.float32) / 255.0
    elif im.mode.startswith("I"):   # "I;16*" (16-bit PNG) or "I" (32-bit ints holding 16-bit values)
        out = np.clip(arr.astype(np.float32), 0, 65535) / 65535.0
    elif im.mode == "F":
        out = np.clip(arr.astype(np.float32), 0, 1)
    else:
        raise CXRImageError(f"unsupported image mode {im.mode!r}", study_id, path)
    if out.ndim != 2 or min(out.shape) < 1:
        raise CXRImageError(f"expected a 2-D image, got shape {out.shape}", study_id, path)
    return out


def _resize_box(img: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The region `box` = (left, top, right, bottom) in pixel-edge coordinates, resized bilinearly to
    size x size (PIL: pixel centres at +0.5, antialiased when shrinking)."""
    out = Image.fromarray(np.ascontiguousarray(img, np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, np.float32)


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale=(0.6, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop. Up to 10 tries: area fraction a ~ U(scale), aspect w/h
    r = exp(U(log ratio)), w = round(sqrt(a·H·W·r)), h = round(sqrt(a·H·W / r)); the first box that
    fits gets top ~ U{0..H-h}, left ~ U{0..W-w}. If none fits: the largest centred box whose aspect is
    the image's clamped into `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        a = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 1 <= w <= width and 1 <= h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    r = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, max(1, round(width / r))) if width / height <= r else (max(1, round(height * r)), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: np.ndarray, rng: np.random.Generator, size: int, scale=(0.6, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """A random crop (`sample_crop_box`) resized bilinearly to size x size."""
    top, left, h, w = sample_crop_box(rng, *img.shape, scale=scale, ratio=ratio)
    return _resize_box(img, (left, top, left + w, top + h), size)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Evaluation view: the shorter side resized to `size`, then the centre size x size (done as the
    centred square of side min(H, W), resized; an image already size x size comes back unchanged)."""
    height, width = img.shape
    if height == width == size:
        return np.array(img, np.float32)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize_box(img, (left, top, left + side, top + side), size)


def random_contrast(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Gamma, contrast and brightness jitter, clipped to [0, 1]: x ** g with g = exp(U(-s, s)), then
    (x - mean) · c + mean + b with c = exp(U(-s, s)), b = U(-s/2, s/2). s = 0 returns x unchanged."""
    u = rng.uniform(-1.0, 1.0, size=3)
    if strength == 0:
        return np.array(img, np.float32)
    x = np.power(img, np.float32(math.exp(strength * u[0])), dtype=np.float32)
    m = np.float32(x.mean())
    x = (x - m) * np.float32(math.exp(strength * u[1])) + m + np.float32(strength * u[2] / 2)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def random_rotation(img: np.ndarray, rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by U(-d, d) degrees about the centre, bilinear, black (0) outside the image."""
    angle = float(rng.uniform(-max_degrees, max_degrees))
    out = Image.fromarray(np.ascontiguousarray(img, np.float32)).rotate(
        angle, Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.asarray(out, np.float32)


@dataclasses.dataclass(frozen=True)
class CXRAugment:
    """Training augmentation: random resized crop → (rotation) → contrast jitter. No flips: laterality
    matters in chest X-rays."""
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    contrast: float = 0.2
    rotate_degrees: float = 0.0


def augment(img: np.ndarray, rng: np.random.Generator, size: int, aug: CXRAugment = CXRAugment()) -> np.ndarray:
    """One training view of `img` ([H, W] in [0, 1]) at size x size, still in [0, 1]."""
    x = random_resized_crop(img, rng, size, aug.scale, aug.ratio)
    if aug.rotate_degrees > 0:
        x = random_rotation(x, rng, aug.rotate_degrees)
    return random_contrast(x, rng, aug.contrast)


# ---------------------------------------------------------------------------------------------------
# Views and texts of one study at one step
# ---------------------------------------------------------------------------------------------------


def sample_views(study: CXRStudy, rng: np.random.Generator) -> tuple[str, str]:
    """Two distinct images (an ordered random pair) when the study has two or more, else its only
    image twice (CXR-CLIP: the second view is then a second augmentation of the same image)."""
    n = len(study.images)
    if n == 0:
        raise ValueError(f"study {study.study_id}: no images")
    if n == 1:
        return study.images[0].path, study.images[0].path
    a, b = rng.choice(n, size=2, replace=False)
    return study.images[a].path, study.images[b].path


def _sentence_subset(text: str, rng: np.random.Generator) -> str:
    """A uniformly random non-empty subset of the sentences of `text`, in order."""
    sentences = reports_lib.split_sentences(text)
    if len(sentences) <= 1:
        return text
    while True:
        keep = rng.random(len(sentences)) < 0.5
        if keep.any():
            return " ".join(s for s, k in zip(sentences, keep) if k)


def sample_texts(study: CXRStudy, bank: cxr_prompts.PromptBank | None, seed: int, study_index: int, step: int, *,
                 second_text: str = "sentence_subset", report_prompt_prob: float = 0.0) -> tuple[str, str]:
    """The study's two texts (T1, T2) at `step`, normalised.

    Report studies: findings and impression in random order when both exist; with one section T1 is
    it and T2 per `second_text`: "same" (T2 = T1) or "sentence_subset" (a random non-empty subset of
    T1's sentences, in order). With probability `report_prompt_prob` a labelled report study uses
    prompt texts instead. Studies without a report: `cxr_prompts.two_draws` of their labels (the
    same draws, normalised). Report draws come from `study_rng(seed, study_index, step, STREAM_TEXT)`."""
    if second_text not in SECOND_TEXT_MODES:
        raise ValueError(f"second_text={second_text!r}: choose one of {list(SECOND_TEXT_MODES)}")
    norm = reports_lib.normalize_report_text
    rng = study_rng(seed, study_index, step, STREAM_TEXT)
    use_prompts = rng.random() < report_prompt_prob and bool(study.labels)
    sections = [t for t in (norm(s) for s in study.sections()) if t]
    if sections and not use_prompts:
        if len(sections) == 2:
            first = int(rng.integers(2))
            return sections[first], sections[1 - first]
        t1 = sections[0]
        return t1, (t1 if second_text == "same" else _sentence_subset(t1, rng))
    if not study.labels:
        raise ValueError(f"study {study.study_id}: no report section and no labels, so no text to train on")
    if bank is None:
        raise ValueError(f"study {study.study_id} needs prompt text but no prompt bank was given")
    try:
        t1, t2 = cxr_prompts.two_draws(study.label_dict(), bank, seed, study_index, step)
    except ValueError as e:
        raise ValueError(f"study {study.study_id}: {e}") from None
    return norm(t1), norm(t2)


# ---------------------------------------------------------------------------------------------------
# Study order and text encoders
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpochSampler:
    """Step k's studies: positions [kB, (k+1)B) of the concatenated permutations of range(N), epoch e's
    from `default_rng([_EPOCH_TAG, seed, e])`. Every study once per epoch; a batch across an epoch
    boundary takes the end of one permutation and the start of the next (a study may then appear
    twice in it)."""
    num_studies: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.num_studies < 1 or self.batch_size < 1:
            raise ValueError(f"EpochSampler needs num_studies >= 1 and batch_size >= 1, got {self}")

    @property
    def steps_per_epoch(self) -> float:
        return self.num_studies / self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([_EPOCH_TAG, int(self.seed), int(epoch)]).permutation(self.num_studies)

    def indices(self, step: int) -> np.ndarray:
        """Step `step`'s study indices, int64 [batch_size]."""
        pos = int(step) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_studies)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            out[epochs == e] = self.permutation(int(e))[offsets[epochs == e]]
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class FixedOrder:
    """A given study order (1-D, e.g. precomputed): step k takes order[kB:(k+1)B]."""
    order: np.ndarray
    batch_size: int

    def indices(self, step: int) -> np.ndarray:
        start = int(step) * self.batch_size
        if start + self.batch_size > len(self.order):
            raise IndexError(f"step {step} needs positions up to {start + self.batch_size} of an order of "
                             f"{len(self.order)} studies")
        return np.asarray(self.order[start:start + self.batch_size], np.int64)

    def __repr__(self) -> str:
        digest = hashlib.sha256(np.asarray(self.order, np.int64).tobytes()).hexdigest()[:16]
        return f"FixedOrder(n={len(self.order)}:{digest}, batch_size={self.batch_size})"


class TokenEncoder:
    """texts → {"input_ids", "attention_mask"} int32 [n, max_len] (`reports.tokenize`). `tokenizer` is
    a Hugging Face tokenizer or the folder of one; a folder is loaded lazily in each process (what is
    pickled to Grain workers is then only the path)."""

    def __init__(self, tokenizer, max_len: int):
        self.max_len = int(max_len)
        self.path = os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
        self._tokenizer = None if self.path is not None else tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = reports_lib.load_tokenizer(self.path)
        return self._tokenizer

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return reports_lib.tokenize(self.tokenizer, list(texts), self.max_len)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["_tokenizer"] = None
        return state

    def __repr__(self) -> str:
        name = self.path or getattr(self._tokenizer, "name_or_path", type(self._tokenizer).__name__)
        return f"TokenEncoder({name!r}, max_len={self.max_len})"


# ---------------------------------------------------------------------------------------------------
# Grain sources
# ---------------------------------------------------------------------------------------------------


def _fingerprint(records: Sequence[CXRStudy]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.study_id.encode() + b"\0")
    return h.hexdigest()[:16]


def _check_norm(mean: float, std: float) -> tuple[np.float32, np.float32]:
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"image normalisation needs a finite mean and std > 0, got mean={mean}, std={std}")
    return np.float32(mean), np.float32(std)


class CXRTrainBatches:
    """Random-access Grain source: item k = {"inputs": {"image1", "image2": f32 [b, S, S], <encoder
    keys>+"1", <encoder keys>+"2"}, "meta": {"step", "study_index": int32 [b]}}, this process's rows
    `pipeline.host_slice(batch_size, ...)` of step k's global batch (`sampler_or_order.indices(k)`).

    Row i: views `sample_views` (stream STREAM_VIEWS), image1/image2 `augment`ed with streams
    STREAM_AUG1/STREAM_AUG2 (independent, also when both views are the same file), texts
    `sample_texts`, then (x - mean) / std. `encoder` gets [T1 of every row, then T2 of every row] in
    one call and must map each text to its row independently of the others (e.g. fixed padding)."""

    def __init__(self, records: Sequence[CXRStudy], sampler_or_order: EpochSampler | FixedOrder | np.ndarray,
                 bank: cxr_prompts.PromptBank | None, encoder: Encoder, *, total_steps: int, batch_size: int,
                 seed: int, image_size: int, mean: float, std: float, aug: CXRAugment = CXRAugment(),
                 second_text: str = "sentence_subset", report_prompt_prob: float = 0.0,
                 process_index: int = 0, process_count: int = 1):
        self.records = tuple(records)
        if not self.records:
            raise ValueError("no training studies")
        if isinstance(sampler_or_order, (np.ndarray, list, tuple)):
            sampler_or_order = FixedOrder(np.asarray(sampler_or_order, np.int64), batch_size)
            if total_steps * batch_size > len(sampler_or_order.order):
                raise ValueError(f"an order of {len(sampler_or_order.order)} studies is too short for "
                                 f"{total_steps} steps of {batch_size}")
        if sampler_or_order.batch_size != batch_size:
            raise ValueError(f"the sampler's batch size {sampler_or_order.batch_size} != batch_size {batch_size}")
        if getattr(sampler_or_order, "num_studies", len(self.records)) != len(self.records):
            raise ValueError(f"the sampler draws from {sampler_or_order.num_studies} studies, "
                             f"but {len(self.records)} records were given")
        if second_text not in SECOND_TEXT_MODES:
            raise ValueError(f"second_text={second_text!r}: choose one of {list(SECOND_TEXT_MODES)}")
        if not 0.0 <= report_prompt_prob <= 1.0:
            raise ValueError(f"report_prompt_prob={report_prompt_prob} must lie in [0, 1]")
        for r in self.records:
            if not r.images:
                raise ValueError(f"study {r.study_id}: no images")
            if not r.has_report and not r.labels:
                raise ValueError(f"study {r.study_id}: no report section and no labels, so no text to train on")
            if bank is None and (not r.has_report or (report_prompt_prob > 0 and r.labels)):
                raise ValueError(f"study {r.study_id} needs prompt text but no prompt bank was given")
        self.sampler, self.bank, self.encoder = sampler_or_order, bank, encoder
        self.total_steps, self.batch_size, self.seed = int(total_steps), batch_size, int(seed)
        self.image_size = image_size
        self.mean, self.std = _check_norm(mean, std)
        self.aug, self.second_text, self.report_prompt_prob = aug, second_text, float(report_prompt_prob)
        self.slice = host_slice(batch_size, process_index, process_count)
        self._repr = (f"CXRTrainBatches(records={len(self.records)}:{_fingerprint(self.records)}, {self.sampler!r}, "
                      f"total_steps={total_steps}, seed={seed}, size={image_size}, mean={mean}, std={std}, {aug}, "
                      f"second_text={second_text}, report_prompt_prob={report_prompt_prob}, {encoder!r}, "
                      f"process={process_index}/{process_count})")

    def __len__(self) -> int:
        return self.total_steps

    def _views(self, i: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        study = self.records[i]
        paths = sample_views(study, study_rng(self.seed, i, step, STREAM_VIEWS))
        images = {p: load_cxr_image(p, study.study_id) for p in dict.fromkeys(paths)}
        return tuple(augment(images[p], study_rng(self.seed, i, step, s), self.image_size, self.aug)
                     for p, s in zip(paths, (STREAM_AUG1, STREAM_AUG2)))

    def __getitem__(self, step: int) -> dict:
        step = int(step)
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        idx = self.sampler.indices(step)[self.slice]
        views = [self._views(int(i), step) for i in idx]
        texts = [sample_texts(self.records[i], self.bank, self.seed, int(i), step, second_text=self.second_text,
                              report_prompt_prob=self.report_prompt_prob) for i in idx]
        inputs = {"image1": (np.stack([v[0] for v in views]) - self.mean) / self.std,
                  "image2": (np.stack([v[1] for v in views]) - self.mean) / self.std}
        encoded = self.encoder([t[0] for t in texts] + [t[1] for t in texts])
        for key, value in encoded.items():
            value = np.asarray(value)
            if value.shape[:1] != (2 * len(idx),):
                raise ValueError(f"encoder output {key!r} has shape {value.shape}; expected {2 * len(idx)} rows")
            inputs[key + "1"], inputs[key + "2"] = value[:len(idx)], value[len(idx):]
        return {"inputs": inputs, "meta": {"step": np.int64(step), "study_index": idx.astype(np.int32)}}

    def __repr__(self) -> str:
        return self._repr


FRONTAL_PREFERENCE = ("PA", "AP")


def eval_image(study: CXRStudy) -> CXRImage:
    """The image a study is evaluated on: its first PA image, else its first AP, else its first."""
    for view in FRONTAL_PREFERENCE:
        for image in study.images:
            if image.view == view:
                return image
    return study.images[0]


class CXREvalImages:
    """Random-access source over `records` in order: batch i holds studies [iB, (i+1)B) (this process's
    rows), each its `eval_image` centre-cropped (`centre_crop`) and normalised; the last batch is padded
    with study 0 and `valid` = 0. Items: {"image": f32 [b, S, S], "valid": int8 [b], "position":
    int32 [b]} (position = study index in `records`, >= len(records) for padding)."""

    def __init__(self, records: Sequence[CXRStudy], *, batch_size: int, image_size: int, mean: float, std: float,
                 process_index: int = 0, process_count: int = 1):
        self.records = tuple(records)
        if not self.records:
            raise ValueError("the evaluation split is empty")
        for r in self.records:
            if not r.images:
                raise ValueError(f"study {r.study_id}: no images")
        self.batch_size, self.image_size = batch_size, image_size
        self.mean, self.std = _check_norm(mean, std)
        self.slice = host_slice(batch_size, process_index, process_count)
        self._repr = (f"CXREvalImages(records={len(self.records)}:{_fingerprint(self.records)}, batch={batch_size}, "
                      f"size={image_size}, mean={mean}, std={std}, slice={self.slice})")

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"batch {i} outside [0, {len(self)})")
        positions = np.arange(int(i) * self.batch_size, (int(i) + 1) * self.batch_size)[self.slice]
        valid = positions < len(self.records)
        images = []
        for p in np.where(valid, positions, 0):
            study = self.records[p]
            images.append(centre_crop(load_cxr_image(eval_image(study).path, study.study_id), self.image_size))
        return {"image": (np.stack(images) - self.mean) / self.std, "valid": valid.astype(np.int8),
                "position": positions.astype(np.int32)}

    def __repr__(self) -> str:
        return self._repr
