"""MetricWriter read back through TensorBoard's own EventAccumulator and metrics.jsonl; Progress
rates/ETA under a fake clock; format_duration."""

from __future__ import annotations

import json
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import vljax.metric_writer as mw
from vljax.metric_writer import MetricWriter, Progress, format_duration

ALL = {"compressedHistograms": 0, "images": 0, "audio": 0, "scalars": 0, "histograms": 0,
       "tensors": 0}


def _load(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance=ALL)
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _text(acc, tag):
    (ev,) = acc.Tensors(tag)
    return ev.step, tensor_util.make_ndarray(ev.tensor_proto).item().decode()


def _jsonl(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_no_tensorflow_needed():
    assert "tensorflow" not in sys.modules


def test_scalars_texts_hparams_roundtrip(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write_hparams({"model": {"dim": 64, "name": "vit|b"}, "lr": np.float32(0.5),
                         "seq": (1, 2)})
        w.write_scalars(1, {"loss": 2.5, "lr": np.float32(1e-4)})
        w.write_scalars(10, {"loss": jnp.asarray(1.25), "acc": np.array(0.1)})
        w.write_scalars(20, {"loss": 0.3})
        w.write_texts(10, {"sample": "a **bold** report"})

    acc = _load(tmp_path)
    assert _scalars(acc, "loss") == [(1, 2.5), (10, 1.25), (20, float(np.float32(0.3)))]
    assert _scalars(acc, "lr") == [(1, float(np.float32(1e-4)))]
    assert _scalars(acc, "acc") == [(10, float(np.float32(0.1)))]
    assert _text(acc, "sample") == (10, "a **bold** report")
    assert _text(acc, "hparams") == (0, "| name | value |\n|---|---|\n| model.dim | 64 |\n"
                                        "| model.name | vit\\|b |\n| lr | 0.5 |\n| seq | [1, 2] |")
    (meta,) = {acc.SummaryMetadata(t).plugin_data.plugin_name for t in ("sample", "hparams")}
    assert meta == "text"

    assert json.loads((tmp_path / "hparams.json").read_text()) == {
        "model.dim": 64, "model.name": "vit|b", "lr": 0.5, "seq": [1, 2]}

    rows = _jsonl(tmp_path)
    times = [r.pop("time") for r in rows]
    assert rows == [{"step": 1, "loss": 2.5, "lr": float(np.float32(1e-4))},
                    {"step": 10, "loss": 1.25, "acc": float(np.array(0.1))},
                    {"step": 20, "loss": 0.3}]
    assert all(isinstance(t, float) for t in times) and times == sorted(times)
    wall = [e.wall_time for e in acc.Scalars("loss")]
    assert wall == pytest.approx(times, abs=1e-3)


def test_disabled_writer_creates_nothing(tmp_path):
    logdir = tmp_path / "logs"
    with MetricWriter(logdir, enabled=False) as w:
        w.write_hparams({"a": 1})
        w.write_scalars(1, {"loss": np.ones((3,))})  # not even validated
        w.write_texts(1, {"t": "x"})
        w.flush()
    assert not logdir.exists()


@pytest.mark.parametrize("bad", [np.zeros((2,)), jnp.ones((1,)), np.zeros((1, 1))])
def test_non_scalar_raises_naming_key(tmp_path, bad):
    with MetricWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="'weird/metric'"):
            w.write_scalars(3, {"loss": 1.0, "weird/metric": bad})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert "loss" not in _load(tmp_path).Tags()["scalars"]


def test_reserved_and_non_numeric_names_rejected(tmp_path):
    with MetricWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="'step'"):
            w.write_scalars(1, {"step": 1.0})
        with pytest.raises(ValueError, match="'name'"):
            w.write_scalars(1, {"name": "abc"})


def test_resume_appends(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write_scalars(1, {"loss": 4.0})
        w.write_scalars(2, {"loss": 3.0})
    with MetricWriter(tmp_path) as w:
        w.write_scalars(3, {"loss": 2.0})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert [(r["step"], r["loss"]) for r in _jsonl(tmp_path)] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert _scalars(_load(tmp_path), "loss") == [(1, 4.0), (2, 3.0), (3, 2.0)]


@pytest.fixture
def clock(monkeypatch):
    t = [100.0]
    monkeypatch.setattr(mw, "perf_counter", lambda: t[0])
    return t


def test_progress_rates_and_eta(clock):
    p = Progress(total_steps=600, start_step=100, batch_size=8)
    clock[0] += 10.0  # 20 steps in 10 s
    r = p.update(120)
    assert r == {"steps_per_sec": 2.0, "examples_per_sec": 16.0, "eta_sec": 240.0}
    clock[0] += 5.0  # rate from the previous call only: 30 steps in 5 s
    assert p.update(150) == {"steps_per_sec": 6.0, "examples_per_sec": 48.0, "eta_sec": 75.0}
    clock[0] += 1.0
    r = p.update(150)  # no progress: unknown ETA
    assert r["steps_per_sec"] == 0.0 and math.isinf(r["eta_sec"])
    clock[0] += 2.0
    assert p.update(600)["eta_sec"] == 0.0


def test_progress_format(clock):
    p = Progress(total_steps=600, start_step=0, batch_size=8)
    clock[0] += 97.5608  # 120 steps -> 1.23 steps/s, 480 left -> 390 s
    line = p.format(120, {"loss": jnp.asarray(2.0123), "lr": 3e-5})
    assert line == ("step 120/600 (20.0%) loss 2.0123 lr 3.000e-05 | 1.23 steps/s 9.8 ex/s | "
                    "ETA 6:30")


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00"), (12, "0:12"), (12.4, "0:12"), (59.6, "1:00"), (390, "6:30"), (3599, "59:59"),
    (3720, "1:02:00"), (3725, "1:02:05"), (86399, "23:59:59"), (2 * 86400 + 3 * 3600 + 59, "51:00:59"),
    (-5, "0:00"),
    (math.inf, "?"), (math.nan, "?"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _raw_scalars(logdir):
    """(step, tag, value) of every scalar event in every event file, as stored (no TensorBoard
    purging of out-of-order steps, which would hide duplicates)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out = []
    for path in sorted(logdir.glob("*tfevents*")):
        for e in LegacyEventFileLoader(str(path)).Load():
            out += [(e.step, v.tag, v.simple_value) for v in e.summary.value if v.HasField("simple_value")]
    return out


def test_resume_keeps_one_event_file_and_each_step_once(tmp_path):
    with MetricWriter(tmp_path) as w:          # the first process: steps 1..5, then killed
        w.write_hparams({"lr": 0.1})
        for s in range(1, 6):
            w.write_scalars(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "ti')             # a line cut by the kill
    with MetricWriter(tmp_path, keep_until=2) as w:   # restored at step 2: logs 3.. again
        for s in range(3, 7):
            w.write_scalars(s, {"loss": 10.0 * s})
    with MetricWriter(tmp_path, keep_until=4) as w:   # and again from step 4
        for s in range(5, 8):
            w.write_scalars(s, {"loss": 100.0 * s})

    assert len(list(tmp_path.glob("*tfevents*"))) == 1
    want = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 500.0), (6, 600.0), (7, 700.0)]
    assert sorted((s, v) for s, tag, v in _raw_scalars(tmp_path) if tag == "loss") == want
    assert [(r["step"], r["loss"]) for r in _jsonl(tmp_path)] == want
    assert _text(_load(tmp_path), "hparams")[0] == 0   # the first process's hparams survive
    with MetricWriter(tmp_path, keep_until=-1) as w:   # restarted from scratch: nothing kept
        w.write_scalars(1, {"loss": 0.5})
    assert [(s, v) for s, _, v in _raw_scalars(tmp_path)] == [(1, 0.5)] and len(_jsonl(tmp_path)) == 1


def test_resume_after_a_kill_between_copy_and_delete_keeps_each_event_once(tmp_path, monkeypatch):
    with MetricWriter(tmp_path) as w:
        for s in range(1, 4):
            w.write_scalars(s, {"loss": float(s)})
    monkeypatch.setattr(mw.os, "remove", lambda path: None)   # old files survive the carry-over
    MetricWriter(tmp_path, keep_until=2).close()
    monkeypatch.undo()
    assert len(list(tmp_path.glob("*tfevents*"))) == 2
    with MetricWriter(tmp_path, keep_until=2) as w:
        w.write_scalars(3, {"loss": 3.5})
    assert len(list(tmp_path.glob("*tfevents*"))) == 1
    assert sorted((s, v) for s, _, v in _raw_scalars(tmp_path)) == [(1, 1.0), (2, 2.0), (3, 3.5)]
