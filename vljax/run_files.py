"""What a run writes into its workdir besides checkpoints and TensorBoard events.

  config.json          the resolved config (`config_json`)
  results.json         final evaluation on `config.final_eval_split` (`results_<split>.json` for others)
  predictions_<split>.npz  the per-study outputs those results are computed from (`write_predictions`)
  run_stats.json       what the run's batches contain (a pure function of the seeds and the steps)
  train_batches.jsonl  text unit and study ids of every step trained (`BatchLog`)
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from vljax.data import sampling as sampling_lib


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


@functools.lru_cache(maxsize=None)
def code_version() -> dict:
    """vljax version and, when run from a git checkout, the commit and whether it had local changes;
    read once per process (the trainer reads it at start-up: the code that runs, not the checkout's
    state when the run ends)."""
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
    if "spacing" not in d:  # a 2D task (CXR-CLIP): square images of data.image_size pixels
        return {"name": "2d", "image_size": int(d.image_size)}
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


PREDICTIONS_FORMAT = 1


def write_predictions(workdir: pathlib.Path, split: str, step: int, predictions) -> pathlib.Path:
    """WORKDIR/predictions_<split>.npz: the per-study outputs of the evaluation whose metrics are in
    results.json / results_<split>.json (`evaluator.Predictions`), so that test-set bootstraps and
    every metric can be recomputed from the saved run alone. Arrays (N readable studies, rows in
    evaluation order, E the embedding width; no report text):

      study_ids  [N] str          findings   [30] str (score/label column order)
      scores     [N, 30] float64  zero-shot scores, positive when > 0 (float64: exactly the evaluated ones)
      labels     [N, 30] int8     1, 0, -1 (not mentioned)
      image_emb  [N, E] float32   image embeddings; text_emb [N, E] float32 full-report embeddings
                                  (the towers' float32 outputs; O(N E), smaller than an N x N
                                  similarity for N > 2E and enough for retrieval)
      split, step, format        scalars

    `zero_shot.zero_shot_metrics(scores, labels, seed=0)` and `zero_shot.retrieval_metrics(image_emb,
    text_emb)` reproduce results.json's "zero_shot" and "retrieval" (`read_predictions`)."""
    from vljax.data.findings import FINDINGS

    n = len(predictions.study_ids)
    arrays = {
        "study_ids": np.asarray(predictions.study_ids, dtype=str).reshape(n),
        "findings": np.asarray(FINDINGS, dtype=str),
        "scores": np.asarray(predictions.scores, np.float64),
        "labels": np.asarray(predictions.labels, np.int8),
        "image_emb": np.asarray(predictions.image_emb, np.float32),
        "text_emb": np.asarray(predictions.text_emb, np.float32),
        "split": np.asarray(split), "step": np.asarray(step, np.int64), "format": np.asarray(PREDICTIONS_FORMAT),
    }
    for key in ("scores", "labels", "image_emb", "text_emb"):
        if arrays[key].shape[0] != n:
            raise ValueError(f"predictions: {key} has {arrays[key].shape[0]} rows for {n} studies")
    path = pathlib.Path(workdir) / f"predictions_{split}.npz"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)
    return path


def read_predictions(path: pathlib.Path) -> dict:
    """A `write_predictions` file as {study_ids: list, findings: list, scores, labels, image_emb,
    text_emb: arrays, split: str, step: int}; no pickled objects are loaded."""
    with np.load(pathlib.Path(path), allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["study_ids"], out["findings"] = out["study_ids"].tolist(), out["findings"].tolist()
    out["split"], out["step"], out["format"] = str(out["split"]), int(out["step"]), int(out["format"])
    return out


def write_run_stats(workdir: pathlib.Path, config: ml_collections.ConfigDict, sampler, left_out=()) -> dict:
    """WORKDIR/run_stats.json: what the batches of the whole run contain (they are a pure function of
    the seeds and the step, so this holds for every run of this config, resumed or not), and the
    studies left out because their volumes cannot be read (`config.data.on_error=skip`): at start-up
    (`left_out`: header problems) and during training (`SkipLog`)."""
    stats = sampling_lib.run_statistics(sampler, config.total_steps)
    stats = {"sampling": config.data.sampling, "train_fraction": config.data.train_fraction,
             "seeds": {"model": config.seed, "data_order": config.data_seed, "subset": config.subset_seed},
             **stats,
             "left_out_at_start": [{"study_id": p.study_id, "kind": p.kind, "file": p.path} for p in left_out]}
    write_json_atomic(pathlib.Path(workdir) / "run_stats.json", stats)
    return stats


class SkipLog:
    """Training studies whose volume could not be read (`config.data.on_error=skip`): each is named
    once in the log and in run_stats.json ("skipped_in_training": study, file, first step; and the
    count of stand-ins used), and the run stops when more than `max_fraction` of the training
    studies have failed. `record` returns a step's stand-ins {batch position: study index} for the
    batch log, from which `start` recounts them when the run resumes."""

    def __init__(self, stats_path: pathlib.Path, source, max_fraction: float, enabled: bool = True):
        self.stats_path, self.enabled, self.max_fraction = pathlib.Path(stats_path), enabled, max_fraction
        self.records, self.sampler, self.slice = source.loader.records, source.sampler, source.slice
        self.failed: dict[str, dict] = {}
        self.stand_ins = 0
        self._dirty = False

    def start(self, batch_log: pathlib.Path) -> None:
        """Recounts what the steps kept in the batch log (those before the restored step) skipped."""
        if not batch_log.exists():
            return
        for line in batch_log.read_text().splitlines():
            entry = json.loads(line)
            for sid in entry.get("stand_ins", {}):
                self.failed.setdefault(sid, {"study_id": sid, "first_step": entry["step"]})
                self.stand_ins += 1
        for sid, item in self.failed.items():
            item["file"] = next((r.image for r in self.records if r.study_id == sid), None)
        self._dirty = bool(self.failed)  # run_stats.json is rewritten at start-up

    def record(self, step: int, meta) -> dict[int, int] | None:
        skipped = meta.get("skipped")
        if skipped is None or not len(skipped):
            return None
        local = np.asarray(meta["study_index"])
        planned = self.sampler.indices(step)[self.slice]
        stand = {self.slice.start + k: int(n) for k, (o, n) in enumerate(zip(planned, local)) if o != n}
        self.stand_ins += len(stand)
        self._dirty = True
        for i in np.asarray(skipped):
            r = self.records[int(i)]
            if r.study_id not in self.failed:
                self.failed[r.study_id] = {"study_id": r.study_id, "file": r.image, "first_step": int(step)}
                logging.warning("study %s (%s) cannot be read; stand-ins from its class stream take its place "
                                "(config.data.on_error=skip)", r.study_id, r.image)
        if len(self.failed) > self.max_fraction * len(self.records):
            self.flush()
            raise ValueError(f"{len(self.failed)} of {len(self.records)} training studies cannot be read (e.g. "
                             f"{sorted(self.failed)[:5]}), more than config.data.max_skip_fraction="
                             f"{self.max_fraction}; run `python -m vljax.validate --data_dir=... --deep` and fix "
                             "or remove them")
        return stand

    def flush(self) -> None:
        if self.enabled and self._dirty and self.stats_path.exists():
            stats = json.loads(self.stats_path.read_text())
            stats["skipped_in_training"] = {"studies": sorted(self.failed.values(), key=lambda x: x["first_step"]),
                                            "stand_ins_used": self.stand_ins}
            write_json_atomic(self.stats_path, stats)
            self._dirty = False


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

    def add(self, step: int, stand_ins: dict[int, int] | None = None) -> None:
        """Step `step`'s line; `stand_ins` ({batch position: study index}, `SkipLog.record`) replace
        unreadable studies, and the line names them ({skipped id: stand-in id})."""
        if self.enabled:
            b = self.sampler.batch(step)
            studies = [self.study_ids[i] for i in b.indices]
            entry = {"step": int(step), "unit": sampling_lib.UNITS[int(b.unit)], "studies": studies}
            if stand_ins:
                entry["stand_ins"] = {}
                for pos, new in sorted(stand_ins.items()):
                    entry["stand_ins"][studies[pos]] = self.study_ids[new]
                    studies[pos] = self.study_ids[new]
            self._lines.append(json.dumps(entry))

    def flush(self) -> None:
        if self._lines:
            with self.path.open("a") as f:
                f.write("".join(ln + "\n" for ln in self._lines))
            self._lines = []
