"""`python -m vljax.sweep run`: the smoke grid's two settings at one seed, 4-step tiny runs on the session's phantom
fixture, trained by real `python -m vljax.train` children, then reported; started again, it skips them.

What a killed, stopped or failing sweep leaves, and how the same command continues it, is tested with
tests/sweep/fake_trainer.py as the trainer: a process with the trainer's contract (flags, config.json,
checkpoints, SIGTERM, resume, results.json) that starts in a tenth of a second. The real trainer's side
of that contract (SIGTERM saves and exits 0; a restart resumes exactly) is tested in tests/test_train.py."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vljax.sweep import runner, spec

BC = "configs/sweeps/batch_composition.py"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _overrides(phantom_dir, total_steps: int = 4, ckpt_every: int = 2) -> dict:
    """`tests/runs.py:tiny_config` as sweep-wide overrides: the fixture phantom and its identity, few steps."""
    phantom = json.loads((pathlib.Path(phantom_dir) / "phantom_info.json").read_text())["config"]
    return {"data.dir": str(phantom_dir), "data.phantom_studies": phantom["num_studies"],
            "data.phantom_seed": phantom["seed"], "data.phantom_signs": phantom["signs"],
            "total_steps": total_steps, "optim.warmup_steps": 1, "log_every": 1, "eval_every": 0,
            "ckpt_every": ckpt_every}


def _child_env() -> dict:
    """The children share the session's compilation cache and XLA_FLAGS (conftest puts them in the environment)."""
    return dict(os.environ)


def _sweep(phantom_dir, arg: str = "smoke", **kw) -> spec.Sweep:
    return spec.load_sweep(f"{BC}:{arg}", _overrides(phantom_dir, **kw))


FAKE = "tests.sweep.fake_trainer"


def _run(sweep, workdir, parallel: int = 1, trainer: str | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = runner.run_sweep(sweep, workdir, parallel=parallel, env=_child_env(), log=lines.append, poll_s=0.2,
                          trainer=trainer)
    return rc, lines


def _said(lines, run: str) -> list[str]:
    return [ln.split(": ", 1)[1] for ln in lines if ln.startswith(f"{run}: ")]


def _results(workdir, run) -> dict:
    return json.loads((pathlib.Path(workdir) / run / "results.json").read_text())


def _mtimes(workdir) -> dict:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in pathlib.Path(workdir).glob("*/seed_*/results.json")}


RUNS = ["random/seed_0", "alternating/seed_0"]


@pytest.fixture(scope="module")
def finished(phantom_dir, tmp_path_factory):
    """The smoke grid's two settings at one seed (CI time: each run is a process start), 4 steps each,
    2 runs at once: (sweep, directory, exit status, output, seconds)."""
    workdir = tmp_path_factory.mktemp("sweep") / "smoke"
    sweep = _sweep(phantom_dir, "smoke,seeds=1")
    start = time.monotonic()
    rc, lines = _run(sweep, workdir, parallel=2)
    return sweep, workdir, rc, lines, time.monotonic() - start


@pytest.mark.slow
def test_a_sweep_trains_every_run_in_its_own_workdir_with_the_grids_config(finished):
    sweep, workdir, rc, lines, _ = finished
    assert rc == 0, "\n".join(lines)
    p = runner.plan(sweep, workdir)
    saved = json.loads((workdir / "sweep.json").read_text())
    assert saved == p.manifest and [r["workdir"] for r in saved["runs"]] == RUNS
    state = json.loads((workdir / runner.STATE_FILE).read_text())["runs"]
    for run, config in zip(p.runs, p.configs):
        assert _said(lines, run.workdir)[0] == "new, starting"
        # The child trained with exactly the config built here from the grid.
        child = json.loads((workdir / run.workdir / "config.json").read_text())
        assert child == spec.config_json(config) == _results(workdir, run.workdir)["config"]
        assert (child["seed"], child["data_seed"], child["data"]["sampling"]) == \
            (run.seed_index, run.seed_index, run.setting)
        assert "vljax.sweep start: " in (workdir / run.workdir / "train.log").read_text()
        assert state[run.workdir]["status"] == "done" and state[run.workdir]["attempts"] == 1
    progress = [ln for ln in lines if ln.startswith("[sweep] ")]
    assert progress[0] == "[sweep] runs 0/2 done, 1 running, 0 failed, ETA ?"
    assert progress[-1] == "[sweep] runs 2/2 done, 0 running, 0 failed, ETA 0:00"
    # Between them (when the two runs do not end within one poll): an ETA from the finished run's time.
    assert all(re.fullmatch(r"\[sweep\] runs [01]/2 done, [012] running, 0 failed, ETA (\?|\d+:\d\d)", ln)
               for ln in progress[1:-1])
    assert max(int(m) for m in re.findall(r"(\d) running", "\n".join(progress))) == 2
    assert lines[-1] == f"sweep batch_composition_smoke: all 2 runs finished in {workdir}"


@pytest.mark.slow
def test_report_on_the_finished_smoke_sweep_writes_its_three_files(finished, tmp_path):
    from vljax.sweep import report

    _, done, _, _, _ = finished
    workdir = tmp_path / "smoke"
    shutil.copytree(done, workdir, ignore=shutil.ignore_patterns("checkpoints", "phantom"))
    assert report.main(str(workdir)) in (0, None)
    text = (workdir / "report.md").read_text()
    for run in RUNS:  # each run's numbers, as its results.json has them
        f1 = _results(workdir, run)["zero_shot"]["macro_f1"]
        assert f"{100 * f1:.2f}" in text, (run, f1)
    rows = list(csv.DictReader((workdir / "report.csv").open()))
    assert {r["setting"] for r in rows} >= {"random", "alternating"}
    pngs = sorted(workdir.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
def test_a_second_run_skips_every_finished_run(finished):
    sweep, workdir, _, _, _ = finished
    before = _mtimes(workdir)
    rc, lines = _run(sweep, workdir)
    assert rc == 0 and _mtimes(workdir) == before
    assert [_said(lines, r) for r in RUNS] == [["finished (results.json), skipping"]] * 2
    assert not [ln for ln in lines if ln.startswith("[sweep]")]


@pytest.fixture(scope="module")
def fake_finished(phantom_dir, tmp_path_factory):
    """The fixture's sweep with the fake trainer: (sweep, directory)."""
    workdir = tmp_path_factory.mktemp("fake_sweep") / "smoke"
    sweep = _sweep(phantom_dir, "smoke,seeds=1")
    rc, lines = _run(sweep, workdir, parallel=2, trainer=FAKE)
    assert rc == 0, "\n".join(lines)
    assert lines[-1] == f"sweep batch_composition_smoke: all 2 runs finished in {workdir}"
    return sweep, workdir


def test_a_killed_sweep_continues_without_rerunning_finished_runs(fake_finished, tmp_path):
    """What a SIGKILLed sweep leaves: one run checkpointed at step 2 and marked running by a process that
    is gone. Only it trains, resuming from its checkpoint. (A run never started is "new, starting", as
    every run of the fixture's first sweep.)"""
    sweep, done = fake_finished
    workdir = tmp_path / "smoke"
    shutil.copytree(done, workdir)
    (workdir / "random/seed_0/results.json").unlink()
    shutil.rmtree(workdir / "random/seed_0/checkpoints/4")
    state = runner.State(workdir / runner.STATE_FILE)
    state.update("random/seed_0", status="running", pid=2 ** 22 + 1)
    kept = {k: v for k, v in _mtimes(workdir).items() if not k.startswith("random/seed_0")}

    rc, lines = _run(sweep, workdir, parallel=2, trainer=FAKE)
    assert rc == 0, "\n".join(lines)
    assert _said(lines, "alternating/seed_0")[0] == "finished (results.json), skipping"
    assert _said(lines, "random/seed_0")[0] == "interrupted, resuming from its checkpoint at step 2"
    assert {k: v for k, v in _mtimes(workdir).items() if k in kept} == kept and len(kept) == 1
    assert "resuming from" in (workdir / "random/seed_0/train.log").read_text()
    new, old = _results(workdir, "random/seed_0"), _results(done, "random/seed_0")  # as uninterrupted
    assert new == old


def test_a_failed_run_is_rerun_once_per_invocation(fake_finished, tmp_path):
    sweep, done = fake_finished
    workdir = tmp_path / "smoke"
    shutil.copytree(done, workdir)
    run_dir = workdir / "alternating/seed_0"
    for name in ("results.json", "config.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "config.json").mkdir()  # the trainer cannot write its config.json: it fails

    rc, lines = _run(sweep, workdir, parallel=2, trainer=FAKE)
    assert rc == 1
    said = _said(lines, "alternating/seed_0")
    assert said[0] == "interrupted before its first checkpoint, starting again"
    assert len([s for s in said if s.startswith("start (pid")]) == 1  # tried once in this invocation
    assert re.match(r"FAILED \(exit 1\) after \d+:\d\d: .*IsADirectoryError", said[-1]), said
    assert "[sweep] runs 1/2 done, 0 running, 1 failed, ETA 0:00" in lines
    state = json.loads((workdir / runner.STATE_FILE).read_text())["runs"]["alternating/seed_0"]
    assert state["status"] == "failed" and state["exit_code"] == 1
    assert "run the same command again to rerun the failed ones (finished runs are kept)" in lines

    (run_dir / "config.json").rmdir()
    rc, lines = _run(sweep, workdir, trainer=FAKE)
    assert rc == 0, "\n".join(lines)
    assert _said(lines, "alternating/seed_0")[0] == "failed earlier (exit 1), rerunning from the start (no checkpoint)"
    assert [_said(lines, r)[0] for r in RUNS if r != "alternating/seed_0"] == ["finished (results.json), skipping"]
    assert _results(workdir, "alternating/seed_0") == _results(done, "alternating/seed_0")


def test_a_directory_of_another_sweep_or_a_run_of_another_config_is_refused(phantom_dir, tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "other", "spec": "x.py", "runs": []}))
    with pytest.raises(spec.SweepError, match="holds sweep 'other' \\(x.py\\), not 'batch_composition_smoke'"):
        _run(_sweep(phantom_dir, "smoke,settings=random,seeds=1"), tmp_path)

    # A finished run whose config differs from its grid entry's: never overwritten, said, exit 1.
    workdir = tmp_path / "conflict"
    sweep = _sweep(phantom_dir, "smoke,settings=random,seeds=1")
    config = spec.config_json(runner.plan(sweep, workdir).configs[0])
    (workdir / "random/seed_0").mkdir(parents=True)
    results = workdir / "random/seed_0/results.json"
    results.write_text(json.dumps({"config": {**config, "seed": 5, "data": {**config["data"], "dir": "/moved"}}}))
    rc, lines = _run(sweep, workdir)
    assert rc == 1 and json.loads(results.read_text())["config"]["seed"] == 5
    assert _said(lines, "random/seed_0") == ["finished with another config (differs in seed); move its workdir "
                                             "away or use another --workdir"]
    assert not (workdir / "random/seed_0/train.log").exists()

    # A run finished by older code, whose config lacks a field this code has (and has one it dropped):
    # skipped, and said; a field both hold with another value is still a conflict.
    old = {**config, "dropped_field": 1, "data": {k: v for k, v in config["data"].items() if k != "prefetch"}}
    results.write_text(json.dumps({"config": old}))
    rc, lines = _run(sweep, workdir)
    assert rc == 0 and json.loads(results.read_text())["config"] == old
    assert _said(lines, "random/seed_0") == ["finished (results.json), skipping (written by code with other "
                                             "config fields: data.prefetch, dropped_field)"]


def _wait_for(path: pathlib.Path, pattern: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace"), re.S):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


def _gone(pid: int, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_or_stopped_sweep_checkpoints_its_run_and_the_same_command_continues(phantom_dir, tmp_path):
    """The sweep command (with the fake trainer: `python -m vljax.sweep` otherwise), stopped twice while
    its run trains: SIGKILL (the run gets SIGTERM as its parent dies), then SIGTERM (passed on); each
    time the run checkpoints and exits 0, and the same command resumes it from that checkpoint."""
    workdir = tmp_path / "sweep"
    run_dir, state_file = workdir / "random/seed_0", workdir / runner.STATE_FILE
    sets = [f"--set={k}={spec.format_value(v)}" for k, v in _overrides(phantom_dir, 400, 1000).items()]
    cmd = [sys.executable, "-m", FAKE, "sweep", "run", f"--sweep={BC}:smoke,settings=random,seeds=1",
           f"--workdir={workdir}", *sets]

    def start_then(sig: int, after: str) -> tuple[int, str]:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            _wait_for(run_dir / "train.log", after, proc)
            child = json.loads(state_file.read_text())["runs"]["random/seed_0"]["pid"]
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=180)
            assert _gone(child), "the run outlived the sweep"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode, out

    rc, _ = start_then(signal.SIGKILL, r"step \d+/400 ")
    assert rc == -signal.SIGKILL
    first = runner.checkpoint_steps(run_dir)
    assert len(first) == 1 and 0 < first[0] < 400 and not (run_dir / "results.json").exists()
    assert "SIGTERM: saved a checkpoint at step" in (run_dir / "train.log").read_text()

    rc, out = start_then(signal.SIGTERM, rf"resuming from .* at step {first[0]}\n.*step \d+/400 ")
    assert rc == 0, out
    assert f"random/seed_0: interrupted, resuming from its checkpoint at step {first[0]}" in out
    assert "SIGTERM: stopping; SIGTERM to 1 running run(s)" in out
    assert "sweep stopped by SIGTERM: 0/1 runs finished; run the same command to continue" in out
    second = runner.checkpoint_steps(run_dir)[-1]
    assert first[0] < second < 400 and not (run_dir / "results.json").exists()
    assert json.loads(state_file.read_text())["runs"]["random/seed_0"]["status"] == "interrupted"

    done = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"random/seed_0: interrupted, resuming from its checkpoint at step {second}" in done.stdout
    assert _results(workdir, "random/seed_0")["step"] == 400
