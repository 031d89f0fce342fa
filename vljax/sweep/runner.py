"""`python -m vljax.sweep run`: every run of a sweep as its own `python -m vljax.train` process.

DIR/sweep.json describes the grid (`spec.manifest`); run `<setting>/seed_<k>` trains in
DIR/<setting>/seed_<k>/ (a normal vljax.train workdir) and logs to its train.log. DIR/sweep_state.json
records each run's last outcome (done, interrupted, failed with its exit status, running with its
pid) and how long finished runs took (the ETA is their mean).

Started again on the same DIR, a run is
  finished     results.json there, with the grid entry's config: skipped;
  interrupted  a checkpoint and no results.json: started again, the trainer resumes from it;
  failed       its last attempt exited non-zero: started again (once per invocation);
  new          started.
A crash of one run does not stop the others. SIGINT/SIGTERM to the sweep sends SIGTERM to the runs
(each checkpoints and exits 0) and ends the sweep; the same command continues it. The runs also get
SIGTERM when the sweep process dies without passing it on (Linux PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

import ml_collections

from vljax.sweep import spec as spec_lib

STATE_FILE = "sweep_state.json"
TRAINER = "vljax.train"  # the module each run executes (`python -m TRAINER FLAGS --workdir=RUN_DIR`)
LOG_FILE = "train.log"


# --------------------------------------------------------------------------------------------------
# The plan: runs, their trainer flags and configs
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    sweep: spec_lib.Sweep
    runs: list[spec_lib.Run]
    flags: list[list[str]]                     # each run's --config flags (absolute config path)
    configs: list[ml_collections.ConfigDict]   # what those flags build (`spec.build_config`)
    manifest: dict                             # DIR/sweep.json


def plan(sweep: spec_lib.Sweep, workdir: pathlib.Path | None = None, *, config_path: str | None = None) -> Plan:
    """Resolves the grid. With `workdir` (a local `run`), phantom runs without a data.dir share one
    phantom in DIR/phantom instead of generating one each; `config_path` replaces the base config's
    path in the flags (default: resolved to an absolute path)."""
    config_path = config_path or str(spec_lib.resolve_path(sweep.config.partition(":")[0]))
    if workdir is not None:
        shared = _shared_phantom(spec_lib.run_configs(sweep, sweep.runs()), pathlib.Path(workdir).resolve() / "phantom")
        if shared:
            sweep = sweep.with_overrides(shared)
    runs = sweep.runs()
    flags = [spec_lib.trainer_flags(sweep, run, config_path) for run in runs]
    configs = spec_lib.run_configs(sweep, runs)
    return Plan(sweep, runs, flags, configs, spec_lib.manifest(sweep, runs, configs))


def _shared_phantom(configs: list[ml_collections.ConfigDict], folder: pathlib.Path) -> dict | None:
    """The override that points every run at one phantom in `folder`, when all of them would generate the
    same phantom (CT: `data.dir`; CXR-CLIP: `data.dirs`); None otherwise."""
    from vljax import cxr

    kinds = {cxr.is_cxr(c) for c in configs}
    if len(kinds) != 1 or not all(c.data.phantom for c in configs):
        return None
    if kinds == {True}:
        keys = ("phantom_studies", "phantom_seed", "phantom_image_size", "phantom_label_only_fraction")
        if any(c.data.dirs for c in configs) or len({tuple(c.data[k] for k in keys) for c in configs}) != 1:
            return None
        return {"data.dirs": (str(folder),)}
    identities = {(c.data.phantom_studies, c.data.phantom_seed, c.data.get("phantom_signs")) for c in configs}
    if any(c.data.dir for c in configs) or len(identities) != 1:
        return None
    return {"data.dir": str(folder)}


# --------------------------------------------------------------------------------------------------
# State of the runs on disk
# --------------------------------------------------------------------------------------------------
class State:
    """DIR/sweep_state.json: {"runs": {workdir: {"status", "exit_code", "seconds", "fresh", "pid", ...}}}."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.runs: dict[str, dict] = json.loads(path.read_text())["runs"] if path.exists() else {}

    def update(self, run: str, **fields) -> None:
        self.runs[run] = {**self.runs.get(run, {}), **fields}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"runs": self.runs}, indent=2))
        tmp.replace(self.path)

    def mean_seconds(self) -> float | None:
        """Mean wall time of runs finished in one go (of all finished ones when none was)."""
        done = [r for r in self.runs.values() if r.get("status") == "done" and r.get("seconds")]
        fresh = [r["seconds"] for r in done if r.get("fresh")] or [r["seconds"] for r in done]
        return sum(fresh) / len(fresh) if fresh else None


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


_ABSENT = object()


def _differing_keys(a: dict, b: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """(keys both configs hold with different values, keys only one of them holds)."""
    differ, one_side = [], []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(x, dict) and isinstance(y, dict):
            d, o = _differing_keys(x, y, f"{prefix}{key}.")
            differ, one_side = differ + d, one_side + o
        elif x is _ABSENT or y is _ABSENT:
            one_side.append(f"{prefix}{key}")
        elif x != y:
            differ.append(f"{prefix}{key}")
    return differ, one_side


def _config_conflict(saved: dict, expected: dict) -> tuple[list[str], list[str]]:
    """Fields where a run's saved config contradicts its grid entry's, and fields only one of them has.
    The second are not a conflict: the code that wrote the run had fewer (or more) config fields than
    this one, as when a sweep is continued after an upgrade; the trainer's resume checks its own."""
    differ, one_side = _differing_keys(saved, expected)
    return [k for k in differ if k not in spec_lib.MOVABLE_KEYS], one_side


def _alive(pid: int | None, run_dir: pathlib.Path, trainer: str = TRAINER) -> bool:
    """Whether `pid` is still a trainer of `run_dir` (e.g. one left by a sweep that was SIGKILLed)."""
    if not pid:
        return False
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and trainer in cmdline and f"--workdir={run_dir}" in cmdline


@dataclasses.dataclass
class Decision:
    action: str   # skip | start | resume | rerun | conflict | busy
    reason: str


def classify(run_dir: pathlib.Path, expected: dict, record: dict, trainer: str = TRAINER) -> Decision:
    """What to do with one run, from its workdir and its last recorded outcome."""
    if record.get("status") == "running" and _alive(record.get("pid"), run_dir, trainer):
        return Decision("busy", f"still being trained by pid {record['pid']} (left over from an earlier sweep "
                                "process); left alone: stop it, or wait, and run the sweep again")
    results = run_dir / "results.json"
    if results.is_file():
        differ, one_side = _config_conflict(json.loads(results.read_text()).get("config", {}), expected)
        if differ:
            return Decision("conflict", f"finished with another config (differs in {', '.join(differ[:6])}); "
                                        "move its workdir away or use another --workdir")
        other_code = (f" (written by code with other config fields: {', '.join(one_side[:6])}"
                      f"{' ...' if len(one_side) > 6 else ''})") if one_side else ""
        return Decision("skip", f"finished (results.json), skipping{other_code}")
    saved = run_dir / "config.json"
    if saved.is_file():
        differ, _ = _config_conflict(json.loads(saved.read_text()), expected)
        if differ:
            return Decision("conflict", f"was started with another config (differs in {', '.join(differ[:6])}); "
                                        "move its workdir away or use another --workdir")
    steps = checkpoint_steps(run_dir)
    where = f"from its checkpoint at step {steps[-1]}" if steps else "from the start (no checkpoint)"
    if record.get("status") == "failed":
        return Decision("rerun", f"failed earlier (exit {record.get('exit_code')}), rerunning {where}")
    if steps:
        return Decision("resume", f"interrupted, resuming {where}")
    if run_dir.exists():
        return Decision("start", "interrupted before its first checkpoint, starting again")
    return Decision("start", "new, starting")


# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------
# Run in a small Python process that the trainer's exec replaces: SIGTERM when the sweep process dies
# (prctl PR_SET_PDEATHSIG = 1 survives exec), and no start at all when it is already gone. Done there,
# not in a preexec_fn: that would run Python between fork and exec in a process with JAX's threads.
_TERM_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                     "os.getppid() == int(sys.argv[1]) or sys.exit(143); os.execv(sys.argv[2], sys.argv[2:])")


def _spawn_command(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [cmd[0], "-S", "-c", _TERM_WITH_PARENT, str(os.getpid()), *cmd]


@dataclasses.dataclass
class _Child:
    run: spec_lib.Run
    proc: subprocess.Popen
    started: float
    fresh: bool
    log: pathlib.Path


def trainer_command(python: str, flags: Sequence[str], run_dir: pathlib.Path | str, trainer: str = TRAINER) -> list[str]:
    return [python, "-m", trainer, *flags, f"--workdir={run_dir}"]


def _last_error(log: pathlib.Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":", 1)[0]]
    return (errors or lines or [""])[-1][:300]


def _duration(seconds: float | None) -> str:
    """m:ss under an hour, else h:mm:ss (as the trainer's progress line); ? when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------
def run_sweep(sweep: spec_lib.Sweep, workdir: str | os.PathLike, *, parallel: int = 1, python: str = sys.executable,
              env: dict | None = None, log: Callable[[str], None] = print, poll_s: float = 0.5,
              progress_every_s: float = 60.0, trainer: str | None = None) -> int:
    """Runs (or continues) every run of `sweep` under `workdir`, at most `parallel` at once, each as
    `python -m <trainer>` (default TRAINER; tests put a fast stand-in with the trainer's contract there).
    Returns the exit status: 0 when every run has finished (or the sweep got SIGTERM: the runs are
    checkpointed), 130 on SIGINT, 1 when some run failed or could not run."""
    if parallel < 1:
        raise spec_lib.SweepError(f"--parallel={parallel}; at least 1")
    directory = pathlib.Path(workdir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        p = plan(sweep, directory)
        spec_lib.write_manifest(directory, p.manifest, log=log)
        return _Sweeper(p, directory, parallel, python, dict(os.environ if env is None else env), log,
                        poll_s, progress_every_s, trainer or TRAINER).run()


@contextlib.contextmanager
def _exclusive(directory: pathlib.Path):
    with open(directory / ".sweep.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise spec_lib.SweepError(f"another `vljax.sweep run` is running on {directory}; wait for it "
                                      "or stop it first") from None
        yield


class _Sweeper:
    def __init__(self, p: Plan, directory: pathlib.Path, parallel: int, python: str, env: dict, log, poll_s: float,
                 progress_every_s: float, trainer: str):
        self.trainer = trainer
        self.p, self.dir, self.parallel, self.python, self.log = p, directory, parallel, python, log
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.poll_s, self.progress_every_s = poll_s, progress_every_s
        self.state = State(directory / STATE_FILE)
        self.running: dict[str, _Child] = {}
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}   # run -> why (failed now, or could not run)
        self.stop_signal: int | None = None

    # ---------------------------------------------------------------- decisions
    def run(self) -> int:
        queue = []
        for run, flags, config in zip(self.p.runs, self.p.flags, self.p.configs):
            d = classify(self.dir / run.workdir, spec_lib.config_json(config), self.state.runs.get(run.workdir, {}),
                         self.trainer)
            self.log(f"{run.workdir}: {d.reason}")
            if d.action == "skip":
                self.done.add(run.workdir)
            elif d.action in ("conflict", "busy"):
                self.failed[run.workdir] = d.reason
            else:
                queue.append((run, flags, config, d.action))
        total = len(self.p.runs)
        if queue:
            self._prepare_data([c for _, _, c, _ in queue])
            self.log(f"sweep {self.p.sweep.name}: {len(self.done)} of {total} runs finished, {len(queue)} to run, "
                     f"at most {self.parallel} at once")
            self._loop(queue)
        return self._summary()

    def _prepare_data(self, configs) -> None:
        """The shared phantom, generated once before the runs start (they would race to write it)."""
        from vljax import cxr, inputs

        shared = str(self.dir / "phantom")
        where = lambda c: tuple(c.data.dirs or ())[:1] == (shared,) if cxr.is_cxr(c) else c.data.dir == shared  # noqa: E731
        config = next((c for c in configs if c.data.phantom and where(c)), None)
        if config is not None:
            self.log(f"phantom: {config.data.phantom_studies} studies in {shared} (shared by the runs)")
            (cxr.resolve_data if cxr.is_cxr(config) else inputs.resolve_data)(config, self.dir)

    # ---------------------------------------------------------------- the loop
    def _loop(self, queue) -> None:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        last_progress = time.monotonic()
        try:
            while (queue and self.stop_signal is None) or self.running:
                while queue and self.stop_signal is None and len(self.running) < self.parallel:
                    self._start(*queue.pop(0))
                    self._progress()
                    last_progress = time.monotonic()
                time.sleep(self.poll_s)
                for name, child in list(self.running.items()):
                    if child.proc.poll() is not None:
                        self._finished(name, child)
                        self._progress()
                        last_progress = time.monotonic()
                if time.monotonic() - last_progress >= self.progress_every_s:
                    self._progress()
                    last_progress = time.monotonic()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            for child in self.running.values():  # only on an exception in this loop
                child.proc.kill()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop now, without checkpoints
            for child in self.running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
            return
        self.stop_signal = signum
        self.log(f"{signal.Signals(signum).name}: stopping; SIGTERM to {len(self.running)} running run(s), "
                 "which checkpoint and exit (a second signal kills them)")
        for child in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)

    def _start(self, run: spec_lib.Run, flags: list[str], config, action: str) -> None:
        run_dir = self.dir / run.workdir
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / LOG_FILE
        cmd = trainer_command(self.python, flags, run_dir, self.trainer)
        fresh = not checkpoint_steps(run_dir)
        with open(log_path, "a") as f:
            f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} vljax.sweep {action}: "
                    f"{subprocess.list2cmdline(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(_spawn_command(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=spec_lib.REPO_ROOT, env=self.env, start_new_session=True)
        self.running[run.workdir] = _Child(run, proc, time.monotonic(), fresh, log_path)
        self.state.update(run.workdir, status="running", pid=proc.pid, started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                          attempts=self.state.runs.get(run.workdir, {}).get("attempts", 0) + 1)
        self.log(f"{run.workdir}: {action} (pid {proc.pid}), log {log_path}")

    def _finished(self, name: str, child: _Child) -> None:
        del self.running[name]
        rc, seconds = child.proc.returncode, time.monotonic() - child.started
        if rc == 0 and (self.dir / name / "results.json").exists():
            self.done.add(name)
            self.state.update(name, status="done", exit_code=0, seconds=round(seconds, 1), fresh=child.fresh, pid=None)
            self.log(f"{name}: finished in {_duration(seconds)}")
        elif rc == 0:
            self.state.update(name, status="interrupted", exit_code=0, pid=None)
            self.log(f"{name}: stopped with a checkpoint after {_duration(seconds)}; the same command resumes it")
        else:
            why = _last_error(child.log)
            self.failed[name] = f"exit {rc}: {why} (log {child.log})"
            self.state.update(name, status="failed", exit_code=rc, pid=None, error=why)
            self.log(f"{name}: FAILED (exit {rc}) after {_duration(seconds)}: {why}; log {child.log}")

    def _progress(self) -> None:
        total = len(self.p.runs)
        mean = self.state.mean_seconds()
        left = total - len(self.done) - len(self.failed)
        eta = None
        if mean is not None and self.stop_signal is None:
            width = max(1, min(self.parallel, left))
            elapsed = sum(time.monotonic() - c.started for c in self.running.values())
            eta = max(0.0, (mean * left - elapsed) / width)
        self.log(f"[sweep] runs {len(self.done)}/{total} done, {len(self.running)} running, "
                 f"{len(self.failed)} failed, ETA {_duration(eta) if left else '0:00'}")

    def _summary(self) -> int:
        total = len(self.p.runs)
        if self.stop_signal is not None:
            self.log(f"sweep stopped by {signal.Signals(self.stop_signal).name}: {len(self.done)}/{total} runs "
                     "finished; run the same command to continue")
            return 130 if self.stop_signal == signal.SIGINT else 0
        if self.failed:
            self.log(f"sweep {self.p.sweep.name}: {len(self.done)}/{total} runs finished; "
                     f"{len(self.failed)} did not:")
            for name, why in self.failed.items():
                self.log(f"  {name}: {why}")
            self.log("run the same command again to rerun the failed ones (finished runs are kept)")
            return 1
        self.log(f"sweep {self.p.sweep.name}: all {total} runs finished in {self.dir}")
        return 0
