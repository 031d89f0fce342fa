"""What a run writes into its workdir besides checkpoints and TensorBoard events.

  config.json          the resolved config (`config_json`)
  results.json         final evaluation on `config.final_eval_split` (`results_<split>.json` for others)
  run_stats.json       what the run's batches contain (a pure function of the seeds and the steps)
  train_batches.jsonl  text unit and study ids of every step trained (`BatchLog`)
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time

import jax
import ml_collections

from vljax.data import sampling as sampling_lib


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def code_version() -> dict:
    """vljax version and, when run from a git checkout, the commit and whether it had local changes."""
    import vljax

    out = {"vljax": vljax.__version__, "jax": jax.__version__}
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def geometry_record(config) -> dict:
    """The volume geometry the run trained on: the recipe name (`configs/merlin.py` geometry=), the
    backend `auto` was resolved on, voxel size and shape (None for runs from before the record)."""
    d = config.data
    return {"name": d.get("geometry"), "backend": d.get("geometry_backend"),
            "spacing_mm": [float(x) for x in d.spacing], "shape": [int(x) for x in d.shape]}


def write_json_atomic(path: pathlib.Path, payload) -> pathlib.Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def write_results(workdir: pathlib.Path, split: str, step: int, result: dict, config) -> pathlib.Path:
    name = "results.json" if split == "test" else f"results_{split}.json"
    payload = {"split": split, "step": step, **result, "geometry": geometry_record(config),
               "config": config_json(config),
               "code_version": code_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_json_atomic(pathlib.Path(workdir) / name, payload)


def write_run_stats(workdir: pathlib.Path, config: ml_collections.ConfigDict, sampler) -> dict:
    """WORKDIR/run_stats.json: what the batches of the whole run contain (they are a pure function of
    the seeds and the step, so this holds for every run of this config, resumed or not)."""
    stats = sampling_lib.run_statistics(sampler, config.total_steps)
    stats = {"sampling": config.data.sampling, "train_fraction": config.data.train_fraction,
             "seeds": {"model": config.seed, "data_order": config.data_seed, "subset": config.subset_seed},
             **stats}
    (pathlib.Path(workdir) / "run_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


class BatchLog:
    """`train_batches.jsonl`: one line per step trained (step, text unit, the global batch's study ids).

    The lines come from the sampler (a batch is a pure function of the seeds and the step), so they
    name every process's studies. They are kept in memory and appended at `flush()` (the trainer
    flushes at log and checkpoint steps, not every step). `start(step)` drops the lines of steps >=
    `step`, which a run resumed from the checkpoint at `step` trains again: a resumed run's file
    equals an uninterrupted one's.
    """

    def __init__(self, path: pathlib.Path, sampler, study_ids, enabled: bool = True):
        self.path, self.sampler, self.study_ids, self.enabled = pathlib.Path(path), sampler, tuple(study_ids), enabled
        self._lines: list[str] = []

    def start(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] < step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def add(self, step: int) -> None:
        if self.enabled:
            b = self.sampler.batch(step)
            self._lines.append(json.dumps({"step": int(step), "unit": sampling_lib.UNITS[int(b.unit)],
                                           "studies": [self.study_ids[i] for i in b.indices]}))

    def flush(self) -> None:
        if self._lines:
            with self.path.open("a") as f:
                f.write("".join(ln + "\n" for ln in self._lines))
            self._lines = []
