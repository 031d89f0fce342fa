"""A stand-in for `python -m vljax.train` in the sweep's orchestration tests (`runner.run_sweep(trainer=...)`).

It keeps the trainer's contract with `vljax.sweep.runner` and nothing else, in a process that starts in a
tenth of a second instead of the trainer's tens of seconds (imports, compilation, phantom):
  - the same flags: `--config=...` (built by the same parser, `spec.build_config`) and `--workdir=DIR`;
  - DIR/config.json, the resolved config (a directory in its place makes it fail, exit 1);
  - a checkpoint DIR/checkpoints/<step>/ every `ckpt_every` steps; started again, it resumes from the
    newest one and says "resuming from ... at step N";
  - SIGTERM: saves a checkpoint at the current step, says "SIGTERM: saved a checkpoint at step N" and
    exits 0;
  - DIR/results.json with the config and the step, and "numbers" that are a hash chain over the steps
    from the seeds: a run resumed from its checkpoint ends with the numbers of an uninterrupted one.
Each step sleeps FAKE_TRAINER_STEP_S seconds (default 0.02), so that a test can signal it mid-run.

`python -m tests.sweep.fake_trainer sweep run --sweep=... --workdir=...` is `python -m vljax.sweep run ...`
with this module as the trainer of every run.

The real trainer's side of the contract is tested on the real trainer: SIGTERM, resume and restart in
tests/test_train.py, and a whole sweep of real runs in tests/sweep/test_runner.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sys
import time

from vljax.sweep import spec


def _save(ckpt: pathlib.Path, step: int, chain: str) -> None:
    (ckpt / str(step)).mkdir(parents=True, exist_ok=True)
    (ckpt / str(step) / "state.json").write_text(json.dumps({"step": step, "chain": chain}))


def main(argv: list[str]) -> int:
    workdir = pathlib.Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")))
    config = spec.build_config([a for a in argv if a.startswith("--config")])
    saved = spec.config_json(config)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    (workdir / "config.json").write_text(json.dumps(saved))
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    step, chain = 0, f"{config.seed}/{config.data_seed}/{config.subset_seed}/{config.data.sampling}"
    if steps:
        state = json.loads((ckpt / str(steps[-1]) / "state.json").read_text())
        step, chain = state["step"], state["chain"]
        print(f"resuming from {ckpt} at step {step}", flush=True)
    pause = float(os.environ.get("FAKE_TRAINER_STEP_S", "0.02"))
    while step < config.total_steps:
        if stop:
            _save(ckpt, step, chain)
            print(f"SIGTERM: saved a checkpoint at step {step} and stopped", flush=True)
            return 0
        time.sleep(pause)
        step += 1
        chain = hashlib.sha256(f"{chain}:{step}".encode()).hexdigest()
        print(f"step {step}/{config.total_steps} ", flush=True)
        if config.ckpt_every and step % config.ckpt_every == 0:
            _save(ckpt, step, chain)
    number = int(chain[:8], 16) / 16 ** 8
    results = {"step": step, "config": saved, "zero_shot": {"macro_f1": number, "chain": chain},
               "retrieval": {"r1": number / 2}}
    (workdir / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        from absl import app

        from vljax.sweep import __main__ as sweep_cli
        from vljax.sweep import runner

        runner.TRAINER = "tests.sweep.fake_trainer"
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        app.run(sweep_cli.main, flags_parser=sweep_cli._parse_flags)
    sys.exit(main(sys.argv[1:]))
