"""`python -m vljax.sweep launch`: a sweep as a script for the engines our users run on, not run here.

  --target=tpu    one `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command "..."` line per
                  run, one after another on one TPU VM (every worker runs the trainer with --distributed);
  --target=slurm  a SLURM array job, one array task per run (`sbatch FILE`).

Each run trains in DIR/<setting>/seed_<k> exactly as `python -m vljax.sweep run` would (the same
`--config=...` flags), and DIR/sweep.json is written where DIR is a local or shared path, so that
`python -m vljax.sweep report --workdir=DIR` reads the runs afterwards. A run started again resumes
from its checkpoint; a finished run started again is only evaluated again.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
from typing import Sequence

from vljax.sweep import runner, spec as spec_lib

TARGETS = ("tpu", "slurm")


def _cd(path: str) -> str:
    """`cd PATH`, leaving a leading ~/ unquoted so that the remote shell expands it."""
    if path == "~" or path.startswith("~/"):
        rest = path[2:]
        return "cd ~" + (f"/{shlex.quote(rest)}" if rest else "")
    return f"cd {shlex.quote(path)}"


def _run_dir(workdir: str, run: spec_lib.Run) -> str:
    return f"{workdir.rstrip('/')}/{run.workdir}"


def for_tpu(sweep: spec_lib.Sweep) -> spec_lib.Sweep:
    """On a multi-host TPU the phantom's geometry must be explicit: `geometry=auto` would query the JAX
    backend while the config loads, before the trainer's jax.distributed.initialize()."""
    path, _, arg = sweep.config.partition(":")
    items = [s.strip() for s in arg.split(",") if s.strip()]
    keys = {s.partition("=")[0] for s in items}
    if "phantom" in keys and not keys & {"tiny", "geometry"}:
        return dataclasses.replace(sweep, config=f"{path}:{','.join([*items, 'geometry=accelerator'])}")
    return sweep


def tpu_script(p: runner.Plan, workdir: str, tpu_name: str, zone: str, *, repo_dir: str = "~/vljax",
               python: str = "python", command_line: str = "") -> str:
    lines = ["#!/bin/bash",
             f"# Sweep {p.sweep.name} ({p.sweep.spec}): {len(p.runs)} runs on TPU VM {tpu_name} ({zone}), one after",
             "# another; each line returns when its run ends. A failed run does not stop the script; running the",
             "# script again resumes unfinished runs from their checkpoints.",
             *([f"# Written by: {command_line}"] if command_line else []),
             "set -u", ""]
    for run, flags in zip(p.runs, p.flags):
        train = shlex.join([python, "-m", "vljax.train", *flags, f"--workdir={_run_dir(workdir, run)}",
                            "--distributed"])
        lines += [f"# {run.workdir}",
                  shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--zone", zone,
                              "--worker=all", "--command", f"{_cd(repo_dir)} && {train}"])]
    return "\n".join(lines) + "\n"


def slurm_script(p: runner.Plan, workdir: str, *, repo_dir: str = str(spec_lib.REPO_ROOT), python: str = "python",
                 max_concurrent: int | None = None, sbatch: Sequence[str] = (), command_line: str = "") -> str:
    n = len(p.runs)
    array = f"0-{n - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={p.sweep.name}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={workdir.rstrip('/')}/slurm-%A_%a.log",
             *(f"#SBATCH {s}" for s in sbatch),
             f"# Sweep {p.sweep.name} ({p.sweep.spec}): {n} runs, one array task each (sbatch THIS_FILE).",
             "# A task started again resumes its run from the last checkpoint.",
             *([f"# Written by: {command_line}"] if command_line else []),
             "set -euo pipefail",
             _cd(repo_dir),
             'case "${SLURM_ARRAY_TASK_ID:?run this script with sbatch (an array task)}" in']
    for i, (run, flags) in enumerate(zip(p.runs, p.flags)):
        train = shlex.join([python, "-m", "vljax.train", *flags, f"--workdir={_run_dir(workdir, run)}"])
        lines += [f"  {i})  # {run.workdir}", f"    exec {train} ;;"]
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID (0-' + str(n - 1) + ')" >&2; exit 2 ;;',
              "esac"]
    return "\n".join(lines) + "\n"


def launch(sweep: spec_lib.Sweep, workdir: str, target: str, *, tpu_name: str | None = None,
           zone: str | None = None, repo_dir: str | None = None, python: str = "python",
           max_concurrent: int | None = None, sbatch: Sequence[str] = (), command_line: str = "",
           log=print) -> tuple[str, dict]:
    """The launch script for `target` and the sweep's manifest (sweep.json). The runs' --config keeps
    the spec's relative config path (the script runs from the repository on the target)."""
    if target not in TARGETS:
        raise spec_lib.SweepError(f"--target={target!r}; choose one of {list(TARGETS)}")
    remote = "://" in workdir
    if not remote:
        workdir = str(pathlib.Path(workdir).expanduser().resolve())
    if target == "tpu":
        if not tpu_name or not zone:
            raise spec_lib.SweepError("--target=tpu needs --tpu_name=NAME and --zone=ZONE")
        sweep = for_tpu(sweep)
    p = runner.plan(sweep, None, config_path=sweep.config.partition(":")[0])
    if target == "tpu":
        text = tpu_script(p, workdir, tpu_name, zone, repo_dir=repo_dir or "~/vljax", python=python,
                          command_line=command_line)
    else:
        text = slurm_script(p, workdir, repo_dir=repo_dir or str(spec_lib.REPO_ROOT), python=python,
                            max_concurrent=max_concurrent, sbatch=sbatch, command_line=command_line)
    return text, p.manifest
