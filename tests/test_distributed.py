"""Multi-process runs on 127.0.0.1 (`--distributed`, `tools/launch_local.py`): two processes of one
CPU device each train exactly as one process with two devices, resume after one of them is killed, and
a peer that never comes gives a clear error within the timeout, not a hang."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.runs import CONFIG_PATH, load_state, tiny_config
from tools import launch_local

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _trainer(phantom_dir, workdir, *extra) -> list[str]:
    c = tiny_config(phantom_dir)
    return [sys.executable, "-m", "vljax.train", f"--config={CONFIG_PATH}:tiny", f"--workdir={workdir}",
            f"--config.data.dir={phantom_dir}", f"--config.data.phantom_studies={c.data.phantom_studies}",
            f"--config.data.phantom_seed={c.data.phantom_seed}", f"--config.data.phantom_signs={c.data.phantom_signs}",
            f"--config.total_steps={c.total_steps}", f"--config.optim.warmup_steps={c.optim.warmup_steps}",
            "--config.log_every=1", "--config.eval_every=0", "--config.ckpt_every=1", "--config.data.workers=0",
            "--distributed", *extra]


def _launch(processes: int, devices: int, command: list[str], kill_process_at: tuple[int, str] | None = None,
            timeout: float = 300.0) -> tuple[int, str]:
    """Runs `tools/launch_local.py`; with `kill_process_at=(k, marker)`, SIGKILLs process k when process 0
    prints `marker`. Returns (exit status, output)."""
    cmd = [sys.executable, str(ROOT / "tools" / "launch_local.py"), f"--processes={processes}",
           f"--devices-per-process={devices}", "--grace=3", "--", *command]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    lines, pids, deadline = [], {}, time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"\[launch_local\] process (\d+) of \d+: pid (\d+)", line):
                pids[int(m.group(1))] = int(m.group(2))
            if kill_process_at and line.startswith("[0] ") and kill_process_at[1] in line:
                os.killpg(pids[kill_process_at[0]], signal.SIGKILL)
                kill_process_at = None
            assert time.monotonic() < deadline, "".join(lines[-40:])
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, "".join(lines)


def test_process_environment_sets_the_coordinator_the_geometry_and_the_devices():
    env = launch_local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1", "A": "b"},
                                   process_id=1, processes=2, port=1234, devices=3)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["VLJAX_NUM_PROCESSES"], env["VLJAX_PROCESS_ID"], env["A"]) == ("2", "1", "b")
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=3"]
    assert launch_local.main(["--processes", "2"]) == 2  # no command


def test_launcher_reports_each_failure_stops_the_others_and_exits_with_the_first():
    import io

    out = io.StringIO()
    assert launch_local.launch(["bash", "-c", "exit 0"], 2, out=out) == 0
    out = io.StringIO()  # process 1 fails at once; process 0 would sleep 30 s: stopped after the grace
    start = time.monotonic()
    rc = launch_local.launch(["bash", "-c", '[ "$VLJAX_PROCESS_ID" = 1 ] && exit 3; sleep 30'], 2, grace=0.5,
                             out=out)
    assert rc == 3 and time.monotonic() - start < 15, out.getvalue()
    assert "process 1 exited with status 3" in out.getvalue()
    assert "process 0 exited with signal SIGKILL" in out.getvalue()
    out = io.StringIO()  # the geometry each copy sees, and its output prefixed with its number
    assert launch_local.launch(["bash", "-c", 'echo "$VLJAX_PROCESS_ID/$VLJAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS"'],
                               2, port=4321, out=out) == 0
    assert "[0] 0/2 127.0.0.1:4321" in out.getvalue() and "[1] 1/2 127.0.0.1:4321" in out.getvalue()


def test_a_peer_that_never_comes_gives_a_clear_error_within_the_timeout(phantom_dir, tmp_path):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{launch_local.free_port()}", VLJAX_NUM_PROCESSES="2",
               VLJAX_PROCESS_ID="0", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    start = time.monotonic()
    out = subprocess.run(_trainer(phantom_dir, tmp_path / "run", "--distributed_timeout=2"), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert ("error: --distributed: process 0 of 2 waited --distributed_timeout=2 s for the other processes to "
            "connect to it") in out.stderr
    assert "Check failure" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices_and_resume_after_one_is_killed(phantom_dir,
                                                                                           tmp_path):
    # 1 process with 2 devices: the reference.
    rc, out = _launch(1, 2, _trainer(phantom_dir, tmp_path / "one"))
    assert rc == 0, out[-4000:]
    assert "mesh data=2 x fsdp=1 over 2 devices" in out
    # 2 processes with 1 device each; process 1 is killed (SIGKILL) after step 3 is logged. Process 0
    # then stops too: jax's coordination service aborts it, or else the launcher kills it.
    two = tmp_path / "two"
    rc, out = _launch(2, 1, _trainer(phantom_dir, two), kill_process_at=(1, "step 3/4"))
    assert rc in (128 + signal.SIGKILL, 128 + signal.SIGABRT), out[-4000:]
    assert "process 1 exited with signal SIGKILL" in out
    assert not (two / "results.json").exists()
    # The same command again: both processes resume from the newest complete checkpoint and finish.
    # Which one that is depends on how far the asynchronous saves got before the kill landed (step 1
    # under load: step 2's save was still in its temporary folder), so it is read from disk.
    committed = sorted(int(d.name) for d in (two / "checkpoints").iterdir() if d.name.isdigit())
    rc, out = _launch(2, 1, _trainer(phantom_dir, two))
    assert rc == 0, out[-4000:]
    if committed:
        assert re.search(rf"\[0\] .*resuming from .* at step {committed[-1]}\b", out), (committed, out[-4000:])
    else:  # killed before the first save was committed: a fresh start, which must end the same
        assert "resuming from" not in out, out[-4000:]
    assert "mesh data=2 x fsdp=1 over 2 devices" in out
    # Process 0 alone logs and writes results; process 1 logs nothing below a warning.
    assert not re.search(r"^\[1\] I\d{4}", out, re.M), out[-4000:]
    assert len(list((two / "tb").glob("*tfevents*"))) == 1
    # The same parameters, batch statistics and optimiser state, to the bit; the same evaluation.
    config = tiny_config(phantom_dir)
    want, got = load_state(tmp_path / "one", config, 4), load_state(two, config, 4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert json.loads((two / "results.json").read_text())["zero_shot"] == \
        json.loads((tmp_path / "one" / "results.json").read_text())["zero_shot"]
    assert (two / "train_batches.jsonl").read_text() == (tmp_path / "one" / "train_batches.jsonl").read_text()
