"""Metric logging without TensorFlow: TensorBoard event files plus a ``metrics.jsonl`` side file.

``clu.metric_writers`` imports TensorFlow; this module only needs the pure-python ``tensorboard``
package (the route PyTorch's ``SummaryWriter`` takes). ``Progress`` turns step counts into
throughput/ETA and formats one log line per report.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from time import perf_counter
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_RESERVED = ("step", "time")


def _to_float(key: str, value: Any) -> float:
    """A Python float from a number, 0-d NumPy/JAX array; ValueError naming ``key`` otherwise."""
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"metric {key!r} must be numeric, got dtype {arr.dtype}")
    return float(arr)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or ConfigDicts) to ``{"a.b": leaf}``, keeping insertion order."""
    if hasattr(tree, "to_dict") and not isinstance(tree, Mapping):
        tree = tree.to_dict()
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it; NumPy scalars as Python scalars; anything else as ``str``."""
    if isinstance(value, np.generic):
        return value.item()
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def _md_cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


class MetricWriter:
    """Scalars, texts and hparams to TensorBoard event files in ``logdir`` and ``metrics.jsonl``.

    Pass ``enabled=jax.process_index() == 0``: a disabled writer creates nothing and every method
    is a no-op. ``keep_until`` (a run restarted from its checkpoint at that step; -1 when it restarts
    from scratch) first drops what earlier processes logged at later steps, which the run logs again: the events
    of every earlier event file are rewritten into this writer's one file and the old files removed,
    and ``metrics.jsonl`` keeps only its lines of earlier steps. A resumed run's logs then equal an
    uninterrupted run's (one event file, each step once).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, keep_until: int | None = None):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self._events: EventFileWriter | None = None
        self._jsonl = None
        if enabled:
            os.makedirs(self.logdir, exist_ok=True)
            jsonl = os.path.join(self.logdir, "metrics.jsonl")
            old_files = _event_files(self.logdir)
            self._events = EventFileWriter(self.logdir)
            if keep_until is not None:
                _truncate_jsonl(jsonl, keep_until)
                self._carry_over(old_files, keep_until)
            self._jsonl = open(jsonl, "a", encoding="utf-8")

    def _carry_over(self, old_files: list[str], keep_until: int) -> None:
        """Copies the events of steps <= `keep_until` from `old_files` into this writer's file, then
        deletes them. Events are kept once each (by content), so a process killed between the copy
        and the deletion leaves nothing twice after the next resume."""
        seen, kept = set(), []
        for path in old_files:
            for event in LegacyEventFileLoader(path).Load():  # as stored (no migration)
                if event.HasField("file_version") or event.step > keep_until:
                    continue
                key = event.SerializeToString(deterministic=True)
                if key not in seen:
                    seen.add(key)
                    kept.append(event)
        for event in sorted(kept, key=lambda e: (e.wall_time, e.step)):
            self._events.add_event(event)
        self._events.flush()
        for path in old_files:
            os.remove(path)

    def _add(self, step: int, summary: summary_pb2.Summary, wall_time: float) -> None:
        self._events.add_event(event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One scalar summary per key (``simple_value``) and one JSON line for the whole call."""
        if not self.enabled:
            return
        values = {}
        for key, value in scalars.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved in metrics.jsonl")
            values[key] = _to_float(key, value)
        now = time.time()
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._add(step, summary, now)
        self._jsonl.write(json.dumps({"step": int(step), "time": now, **values}) + "\n")
        self._jsonl.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text-plugin summaries (markdown is rendered by TensorBoard)."""
        if not self.enabled:
            return
        summary = summary_pb2.Summary()
        for key, text in texts.items():
            summary.MergeFrom(text_pb(key, str(text)))
        self._add(step, summary, time.time())

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Flattened hparams as a markdown table (tag ``hparams``, step 0) and ``hparams.json``."""
        if not self.enabled:
            return
        flat = {k: _jsonable(v) for k, v in flatten(hparams).items()}
        rows = [f"| {_md_cell(k)} | {_md_cell(v if isinstance(v, str) else json.dumps(v))} |"
                for k, v in flat.items()]
        self.write_texts(0, {"hparams": "\n".join(["| name | value |", "|---|---|", *rows])})
        with open(os.path.join(self.logdir, "hparams.json"), "w", encoding="utf-8") as f:
            json.dump(flat, f, indent=2)
            f.write("\n")

    def flush(self) -> None:
        """Flush pending events and JSON lines to disk."""
        if self._events is not None:
            self._events.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close; later calls are not allowed (closing twice is fine)."""
        if self._events is not None:
            self._events.close()
            self._jsonl.close()
            self._events = self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event_files(logdir: str) -> list[str]:
    return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n)


def _truncate_jsonl(path: str, keep_until: int) -> None:
    """Keeps the lines of steps <= `keep_until` (atomically; a line cut by a kill is dropped)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= keep_until:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
                continue
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    """``0:12``, ``6:30``, ``1:02:05``, ``51:00:59`` (m:ss under an hour, else h:mm:ss); ``?`` when
    unknown (inf/NaN)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_value(v: float) -> str:
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 or not math.isfinite(v) else f"{v:.3e}"


class Progress:
    """Throughput and ETA between successive reports (``time.perf_counter`` clock)."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = perf_counter()

    def update(self, step: int) -> dict[str, float]:
        """Rates over the steps since the previous call; ETA for the remaining steps at that rate."""
        now = perf_counter()
        dt, dsteps = now - self._last_time, step - self._last_step
        self._last_time, self._last_step = now, step
        sps = dsteps / dt if dt > 0 else 0.0
        remaining = max(self.total_steps - step, 0)
        eta = remaining / sps if sps > 0 else (0.0 if remaining == 0 else math.inf)
        return {"steps_per_sec": sps, "examples_per_sec": sps * self.batch_size, "eta_sec": eta}

    def format(self, step: int, metrics: Mapping[str, float],
               rates: Mapping[str, float] | None = None) -> str:
        """One line: ``step 120/600 (20.0%) loss 2.0123 | 1.23 steps/s 9.8 ex/s | ETA 6:30``.

        Uses `rates` from a preceding `update(step)` when given, else calls `update` itself."""
        r = rates if rates is not None else self.update(step)
        pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
        parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
        parts += [f"{k} {_fmt_value(_to_float(k, v))}" for k, v in metrics.items()]
        return (" ".join(parts) + f" | {r['steps_per_sec']:.2f} steps/s "
                f"{r['examples_per_sec']:.1f} ex/s | ETA {format_duration(r['eta_sec'])}")
