"""Class prompt banks: chest X-ray labels → text (CXR-CLIP's image-label expansion, DESIGN.md §2).

A bank is JSON, `{class: {"pos": [...], "neg": [...], "unc": [...]}}`: report-style sentences that say
the class is present (label 1), absent (0) or uncertain (-1). `pos` and `neg` must be non-empty; `unc`
may be empty or missing, and then uncertain labels use the `unc_fallback` list (default "pos": CheXpert's
"U-Ones" reading of an uncertain mention; "neg" is "U-Zeros"). Any other key is refused.

A study's labels become text by picking one random sentence per labelled class from the list of its
label, shuffling the chosen sentences and joining them with spaces (`labels_to_text`); missing labels
(None or NaN) contribute nothing. `two_draws` gives a study's two texts for one training step from a
generator seeded by (seed, study index, step), so a batch is a pure function of seeds and step;
`validation_text` is fixed: the first sentence of each list, classes in bank order.

The shipped bank (`cxr_prompt_bank.json`, `load_bank()`) covers the phantom chest X-ray classes and
the CheXpert and ChestX-ray14 label names, lower-case ("pleural effusion", "no finding", ...).
Error messages name classes, keys and label values only, never other text of a study.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import numbers
import os
from typing import Mapping, NamedTuple

import numpy as np

DEFAULT_BANK_FILE = "cxr_prompt_bank.json"   # inside the `vljax.data` package
KINDS = ("pos", "neg", "unc")
LABEL_KINDS = {1: "pos", 0: "neg", -1: "unc"}
UNC_FALLBACKS = ("pos", "neg")


class ClassPrompts(NamedTuple):
    """The sentences of one class, per label; `unc` already holds the fallback where the bank had none."""
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    unc: tuple[str, ...]


PromptBank = dict[str, ClassPrompts]   # in the bank's (file) order
Labels = Mapping[str, int | float | None]   # 1 / 0 / -1 (uncertain); None or NaN: missing


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so that repeated keys can be refused."""


def _unique(pairs: _Pairs, where: str) -> dict:
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise ValueError(f"{where}: key {repeated!r} appears more than once")
    return dict(pairs)


def parse_bank(obj: Mapping, unc_fallback: str = "pos", source: str = "prompt bank") -> PromptBank:
    """Validate a decoded bank and return it as {class: ClassPrompts}; `source` names it in errors."""
    if unc_fallback not in UNC_FALLBACKS:
        raise ValueError(f"unc_fallback={unc_fallback!r}: choose one of {list(UNC_FALLBACKS)}")
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: expected a non-empty JSON object {{class: {{\"pos\": [...], \"neg\": [...], "
                         f"\"unc\": [...]}}}}")
    bank: PromptBank = {}
    for cls, entry in obj.items():
        if not isinstance(cls, str) or not cls.strip():
            raise ValueError(f"{source}: class names must be non-empty strings, found {cls!r}")
        where = f"{source}: class {cls!r}"
        if isinstance(entry, _Pairs):
            entry = _unique(entry, where)
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected an object with sentence lists \"pos\", \"neg\" (and \"unc\")")
        unknown = sorted(str(k) for k in entry if k not in KINDS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(KINDS)}")
        lists = {}
        for kind in KINDS:
            items = entry.get(kind, [])
            if not isinstance(items, list) or isinstance(items, _Pairs) or not all(
                    isinstance(s, str) and s.strip() for s in items):
                raise ValueError(f"{where}: {kind!r} must be a list of non-empty sentences (strings)")
            if not items and kind != "unc":
                raise ValueError(f"{where}: {kind!r} is missing or empty; give at least one sentence")
            lists[kind] = tuple(s.strip() for s in items)
        bank[cls] = ClassPrompts(lists["pos"], lists["neg"], lists["unc"] or lists[unc_fallback])
    return bank


def load_bank(path: str | os.PathLike | None = None, unc_fallback: str = "pos") -> PromptBank:
    """Read and validate a bank JSON file (None: the shipped `cxr_prompt_bank.json`)."""
    if path is None:
        source = f"vljax/data/{DEFAULT_BANK_FILE}"
        text = importlib.resources.files("vljax.data").joinpath(DEFAULT_BANK_FILE).read_text(encoding="utf-8")
    else:
        source = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(obj, _Pairs):
        obj = _unique(obj, source)
    return parse_bank(obj, unc_fallback, source)


def _label_kind(cls: str, value) -> str | None:
    """"pos" / "neg" / "unc" for a label 1 / 0 / -1 (ints, floats, numpy scalars); None when missing."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return None
    if isinstance(value, numbers.Real) and value in LABEL_KINDS:
        return LABEL_KINDS[int(value)]
    shown = repr(value) if isinstance(value, numbers.Real) else f"a {type(value).__name__}"
    raise ValueError(f"label of class {cls!r} is {shown}: use 1 (positive), 0 (negative), -1 (uncertain) "
                     "or None (missing)")


def _sentence_lists(labels: Labels, bank: PromptBank) -> list[tuple[str, ...]]:
    """The sentence list of each labelled class, in bank order."""
    for cls in labels:
        if cls not in bank:
            raise ValueError(f"label class {cls!r} is not in the prompt bank; its classes are {list(bank)}")
    lists = []
    for cls, prompts in bank.items():
        kind = _label_kind(cls, labels[cls]) if cls in labels else None
        if kind is not None:
            lists.append(getattr(prompts, kind))
    if not lists:
        raise ValueError(f"no labelled class among the {len(labels)} labels (all missing): a study needs at "
                         "least one label 1, 0 or -1 to have a text")
    return lists


def labels_to_text(labels: Labels, bank: PromptBank, rng: np.random.Generator) -> str:
    """One random sentence per labelled class from the list of its label, shuffled, joined by spaces."""
    chosen = [sentences[rng.integers(len(sentences))] for sentences in _sentence_lists(labels, bank)]
    return " ".join(chosen[i] for i in rng.permutation(len(chosen)))


def two_draws(labels: Labels, bank: PromptBank, seed: int, study_index: int, step: int) -> tuple[str, str]:
    """A study's two independent texts for `step` (CXR-CLIP's T1, T2 for an image-label study), drawn
    from a generator seeded by (seed, study_index, step): the same arguments give the same texts."""
    for name, v in (("seed", seed), ("study_index", study_index), ("step", step)):
        if not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"two_draws: {name}={v!r} must be a non-negative integer")
    rng = np.random.default_rng([int(seed), int(study_index), int(step)])
    return labels_to_text(labels, bank, rng), labels_to_text(labels, bank, rng)


def validation_text(labels: Labels, bank: PromptBank) -> str:
    """The fixed text of a study for evaluation: the first sentence of each labelled class's list, in
    bank order."""
    return " ".join(sentences[0] for sentences in _sentence_lists(labels, bank))
