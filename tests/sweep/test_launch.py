"""`python -m vljax.sweep launch`: the TPU and SLURM scripts of a 2x2 grid, run by bash with stand-ins
for `gcloud` and `python` that record their arguments: each run's trainer command is the one the
grid specifies, quoting included."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from vljax.sweep import launch, runner, spec

BC = "configs/sweeps/batch_composition.py"
ROOT = pathlib.Path(__file__).resolve().parents[2]
# Quotes, spaces and a $ in the paths: what shlex.quote must carry through two shells.
WORKDIR = "/tmp/sweep it's $HOME"
DATA = "/data/merlin's \"copy\""


@pytest.fixture
def recorder(tmp_path):
    """A bin/ folder whose `gcloud` and `python` append their argv (JSON) to calls.jsonl."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("gcloud", "python"):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(calls)!r}, 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n")
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(script: pathlib.Path, **extra) -> tuple[int, list[list[str]]]:
        calls.unlink(missing_ok=True)
        rc = subprocess.run(["bash", str(script)], env={**env, **extra}, cwd=tmp_path,
                            capture_output=True, text=True).returncode
        return rc, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return run


def _grid():
    sweep = spec.load_sweep(f"{BC}:smoke", {"data.dir": DATA})
    return sweep, runner.plan(sweep, None, config_path="configs/merlin.py")


def test_tpu_script_has_one_gcloud_ssh_line_per_run(tmp_path, recorder):
    sweep, p = _grid()
    text, manifest = launch.launch(sweep, WORKDIR, "tpu", tpu_name="my-tpu", zone="us-central2-b")
    lines = [ln for ln in text.splitlines() if ln.startswith("gcloud ")]
    assert len(lines) == 4 and [r["workdir"] for r in manifest["runs"]] == [r.workdir for r in p.runs]
    script = tmp_path / "tpu.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    rc, calls = recorder(script)
    assert rc == 0 and len(calls) == 4
    for call, run, flags in zip(calls, p.runs, p.flags):
        assert call[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                            "--worker=all"]
        assert call[9] == "--command" and len(call) == 11
        cd, sep, train = call[10].partition(" && ")
        assert cd == "cd ~/vljax" and sep
        # What the TPU VM's shell runs: the grid's trainer command, on every worker, distributed.
        assert shlex.split(train) == ["python", "-m", "vljax.train", *flags,
                                      f"--workdir={WORKDIR}/{run.workdir}", "--distributed"]
        assert spec.config_json(spec.build_config(shlex.split(train)[3:-2])) == \
            spec.config_json(p.configs[p.runs.index(run)])


def test_slurm_script_is_an_array_with_one_task_per_run(tmp_path, recorder):
    sweep, p = _grid()
    text, _ = launch.launch(sweep, WORKDIR, "slurm", sbatch=["--gres=gpu:1", "--time=02:00:00"], max_concurrent=2)
    assert "#SBATCH --array=0-3%2\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert f"#SBATCH --output={WORKDIR}/slurm-%A_%a.log\n" in text
    assert f"cd {shlex.quote(str(ROOT))}\n" in text
    script = tmp_path / "sweep.sbatch"
    script.write_text(text)
    for task, (run, flags) in enumerate(zip(p.runs, p.flags)):
        rc, calls = recorder(script, SLURM_ARRAY_TASK_ID=str(task))
        assert rc == 0 and calls == [["python", "-m", "vljax.train", *flags, f"--workdir={WORKDIR}/{run.workdir}"]]
    assert recorder(script, SLURM_ARRAY_TASK_ID="4") == (2, [])
    assert recorder(script)[0] != 0  # outside an array task it runs nothing


def test_tpu_phantom_runs_get_an_explicit_geometry():
    sweep = spec.load_sweep(f"{BC}:phantom,settings=random,seeds=1")
    text, _ = launch.launch(sweep, "gs://bucket/sweep", "tpu", tpu_name="t", zone="z")
    assert "--config=configs/merlin.py:phantom,geometry=accelerator,sampling=random," in text
    with pytest.raises(spec.SweepError, match="needs --tpu_name=NAME and --zone=ZONE"):
        launch.launch(sweep, "gs://bucket/sweep", "tpu")


def test_launch_command_writes_the_script_and_sweep_json(tmp_path):
    out, workdir = tmp_path / "launch_slurm.sh", tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "vljax.sweep", "launch", f"--sweep={BC}:smoke",
                           f"--workdir={workdir}", "--target=slurm", f"--out={out}", "--set=data.dir=/data/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3\n" in out.read_text() and os.access(out, os.X_OK)
    saved = json.loads((workdir / "sweep.json").read_text())
    assert saved["spec"] == f"{BC}:smoke" and len(saved["runs"]) == 4
    assert not list(workdir.glob("*/seed_*"))  # nothing ran
    bad = subprocess.run([sys.executable, "-m", "vljax.sweep", "launch", f"--sweep={BC}:smoke",
                          f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "launch needs --target=tpu or --target=slurm" in bad.stderr
