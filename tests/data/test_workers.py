"""Grain worker processes end with their parent, and a closed iterator leaves no shared memory.

Each test runs a child Python process (own session) that builds `pipeline.make_iterator` with 2
workers over a tiny in-memory source and reports its worker pids, the resource tracker's pid and the
shared-memory segments of the batches it holds."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from vljax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 10.0

# For each scenario prints one JSON line {"workers": [...], "tracker": [...], "sleepers": [...], "shm":
# [...]}, then "kill": waits to be killed; "close": closes the iterator and prints the processes left
# ({"after_close": [...]}). "close" runs an iterator abandoned with batches prefetched and one whose
# workers reached the end of the source (the trainer's case: the source has exactly its steps).
CHILD = r'''
import json, os, subprocess, sys, time
import numpy as np
from vljax.data import pipeline

class TinySource:
    """Item i: a small array (crosses in shared memory) and the pid of a `sleep` its worker started."""
    def __init__(self, n, spawn):
        self.n, self.spawn, self.sleeper = n, spawn, 0
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        if self.spawn and not self.sleeper:
            self.sleeper = subprocess.Popen(["sleep", "600"]).pid
        return {"x": np.full((32, 32), i, np.float32), "sleeper": np.int64(self.sleeper)}

def children():
    pids = []
    for tid in os.listdir("/proc/self/task"):
        pids += [int(p) for p in open(f"/proc/self/task/{tid}/children").read().split()]
    return pids

def kind(pid):
    cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    return "tracker" if b"resource_tracker" in cmd else "workers" if b"spawn_main" in cmd else "other"

def run(mode, n, pulls):
    source = TinySource(n, spawn=mode == "kill")
    with pipeline.closing_iterator(pipeline.make_iterator(source, workers=2, prefetch=2)) as it:
        batches = [next(it) for _ in range(2)]  # one from each worker: both have started
        report = {"workers": [], "tracker": [], "other": []}
        for pid in children():
            report[kind(pid)].append(pid)
        batches += [next(it) for _ in range(pulls - 2)]
        time.sleep(1.0)  # the workers fill their buffers, or reach the end of the source
        report["sleepers"] = sorted({int(b["sleeper"]) for b in batches} - {0})
        report["shm"] = [b["x"].shm.name.lstrip("/") for b in batches]
        print(json.dumps(report), flush=True)
        if mode == "kill":
            time.sleep(600)
    print(json.dumps({"after_close": [p for p in children() if kind(p) != "tracker"]}), flush=True)

mode = sys.argv[1]
run(mode, 1000, 4)
if mode == "close":
    run(mode, 8, 8)
'''


class _Child:
    """The child process running CHILD in `mode`, in its own session; stdout read line by line on a
    thread, stderr to a file."""

    def __init__(self, mode: str, tmp_path: pathlib.Path):
        self.stderr_path = tmp_path / f"{mode}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_json(self, timeout: float = 120.0) -> dict:
        line = self.lines.get(timeout=timeout)
        assert line, f"the child exited: {self.proc.wait()} {self.stderr_path.read_text()}"
        return json.loads(line)

    def cleanup(self) -> None:
        """Kills what a failed test may have left in the child's process group (its workers and their
        children are in it), all but the resource tracker, which then unlinks the shared memory of the
        dead and exits by itself; the group is killed outright only if it does not."""
        for pid in _group_members(self.proc.pid):
            if b"resource_tracker" not in _cmdline(pid):
                _kill(pid)
        self.proc.wait()
        for pid in _wait_gone(_group_members(self.proc.pid)):
            _kill(pid)


def _group_members(pgid: int) -> list[int]:
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids, timeout: float = GONE_WITHIN_S) -> list[int]:
    """The pids still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_workers_tracker_and_their_children_die_with_a_sigkilled_parent(tmp_path):
    child = _Child("kill", tmp_path)
    try:
        report = child.read_json()
        assert len(report["workers"]) == 2 and len(report["tracker"]) == 1, report
        assert len(report["sleepers"]) == 2, report  # one `sleep` started by each worker
        assert all(pathlib.Path("/dev/shm", n).exists() for n in report["shm"])
        t0 = time.monotonic()
        os.kill(child.proc.pid, signal.SIGKILL)
        assert child.proc.wait(timeout=10) == -signal.SIGKILL
        pids = report["workers"] + report["sleepers"] + report["tracker"]
        assert _wait_gone(pids) == [], f"still running {time.monotonic() - t0:.1f} s after SIGKILL"
        # The tracker exits at EOF, once the workers are gone, after unlinking what the dead left.
        assert [n for n in report["shm"] if pathlib.Path("/dev/shm", n).exists()] == []
    finally:
        child.cleanup()


def test_closed_iterators_stop_workers_and_leak_no_shared_memory(tmp_path):
    child, pids, shm = _Child("close", tmp_path), [], []
    try:
        for scenario in ("abandoned", "exhausted"):
            report = child.read_json()
            assert len(report["workers"]) == 2 and len(report["tracker"]) == 1, (scenario, report)
            pids += report["workers"] + report["tracker"]
            shm += report["shm"]
            assert child.read_json() == {"after_close": []}, scenario  # stopped by the close
        assert child.proc.wait(timeout=60) == 0
        stderr = child.stderr_path.read_text()
        assert "leaked" not in stderr and "resource_tracker" not in stderr, stderr
        assert _wait_gone(pids) == []
        assert [n for n in shm if pathlib.Path("/dev/shm", n).exists()] == []
    finally:
        child.cleanup()


def test_close_iterator_without_workers_is_idempotent():
    source = [{"x": np.full((2,), i, np.float32)} for i in range(5)]
    it = pipeline.make_iterator(source, workers=0)
    assert [int(next(it)["x"][0]) for _ in range(2)] == [0, 1]
    pipeline.close_iterator(it)
    pipeline.close_iterator(it)
