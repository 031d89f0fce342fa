r"""Seed sweeps from the command line.

  python -m vljax.sweep run --sweep=configs/sweeps/batch_composition.py:phantom,seeds=3 \
      --workdir=/tmp/sweeps/bc [--parallel=1] [--set=KEY=VALUE ...]
  python -m vljax.sweep launch --sweep=configs/sweeps/batch_composition.py:full --set=data.dir=/data/merlin \
      --workdir=gs://bucket/sweeps/bc --target=tpu --tpu_name=NAME --zone=us-central2-b --out=launch_tpu.sh
  python -m vljax.sweep launch --sweep=... --workdir=/shared/sweeps/bc --target=slurm --out=sweep.sbatch \
      [--parallel=8] [--sbatch=--gres=gpu:1 ...]
  python -m vljax.sweep report --workdir=/tmp/sweeps/bc

`run` trains every run of the grid here, each as its own `python -m vljax.train` process
(`vljax.sweep.runner`); started again it skips finished runs, resumes interrupted ones and reruns failed
ones. `launch` writes a script that runs them elsewhere (`vljax.sweep.launch`). `report` computes the
statistics of the finished runs (`vljax.sweep.report`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

from absl import app, flags

from vljax import cli
from vljax.sweep import spec as spec_lib

COMMANDS = ("run", "launch", "report")

_SWEEP = flags.DEFINE_string("sweep", None, "sweep spec: configs/sweeps/batch_composition.py[:ARGS]")
_WORKDIR = cli.workdir()
_PARALLEL = flags.DEFINE_integer("parallel", None, "run: runs at once (default 1); launch --target=slurm: "
                                 "array tasks at once (default: no limit)", lower_bound=1)
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE: set config field KEY of every run (repeatable), "
                                 "e.g. --set=data.dir=/data/merlin")
_TARGET = flags.DEFINE_enum("target", None, ["tpu", "slurm"], "launch: the engine")
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "launch --target=tpu: the TPU VM's name")
_ZONE = flags.DEFINE_string("zone", None, "launch --target=tpu: its zone")
_OUT = flags.DEFINE_string("out", None, "launch: the script to write (default: standard output)")
_REPO_DIR = flags.DEFINE_string("repo_dir", None, "launch: the vljax checkout on the target "
                                "(tpu: ~/vljax, slurm: this checkout)")
_PYTHON = flags.DEFINE_string("python", "python", "launch: the Python interpreter on the target")
_SBATCH = flags.DEFINE_multi_string("sbatch", [], "launch --target=slurm: an extra #SBATCH option "
                                    "(repeatable), e.g. --sbatch=--gres=gpu:1")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (--set repeats), with a one-line error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {str(e).strip().splitlines()[0]}\nPass --helpshort to see the flags.\n")
        sys.exit(2)


def _load() -> spec_lib.Sweep:
    if not _SWEEP.value or not _WORKDIR.value:
        raise app.UsageError("--sweep and --workdir are required, e.g. "
                             "--sweep=configs/sweeps/batch_composition.py:smoke --workdir=/tmp/sweeps/smoke")
    return spec_lib.load_sweep(_SWEEP.value, spec_lib.parse_set(_SET.value))


def _run() -> int:
    from vljax.sweep import runner

    # This process only builds configs (configs/merlin.py:phantom asks JAX for the backend): keep it
    # from reserving accelerator memory the runs need. The runs get the environment as it was.
    env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return runner.run_sweep(_load(), _WORKDIR.value, parallel=_PARALLEL.value or 1, env=env)


def _launch() -> int:
    from vljax.sweep import launch

    if _TARGET.value is None:
        raise app.UsageError("launch needs --target=tpu or --target=slurm")
    text, manifest = launch.launch(_load(), _WORKDIR.value, _TARGET.value, tpu_name=_TPU_NAME.value,
                                   zone=_ZONE.value, repo_dir=_REPO_DIR.value, python=_PYTHON.value,
                                   max_concurrent=_PARALLEL.value, sbatch=_SBATCH.value,
                                   command_line=shlex.join(["python", "-m", "vljax.sweep", *sys.argv[1:]]))
    if _OUT.value:
        out = pathlib.Path(_OUT.value)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}: {len(manifest['runs'])} runs ({_TARGET.value})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if "://" not in _WORKDIR.value:
        spec_lib.write_manifest(pathlib.Path(_WORKDIR.value).expanduser(), manifest,
                                log=lambda m: print(m, file=sys.stderr))
        print(f"wrote {pathlib.Path(_WORKDIR.value) / 'sweep.json'} (for `report`)", file=sys.stderr)
    elif _OUT.value:
        side = pathlib.Path(_OUT.value).with_suffix(".sweep.json")
        side.write_text(json.dumps(manifest, indent=2))
        print(f"wrote {side}: copy it to {_WORKDIR.value.rstrip('/')}/sweep.json for `report`", file=sys.stderr)
    return 0


def _report() -> int:
    if not _WORKDIR.value:
        raise app.UsageError("report needs --workdir=DIR (a sweep's directory)")
    from vljax.sweep import report  # the statistics (scipy) are only imported for this command

    return report.main(_WORKDIR.value) or 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m vljax.sweep {{{'|'.join(COMMANDS)}}} --workdir=DIR [flags]; "
                             f"got {argv[1:]}")
    try:
        return {"run": _run, "launch": _launch, "report": _report}[argv[1]]()
    except spec_lib.SweepError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
