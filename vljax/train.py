r"""Contrastive training of the CT dual encoder, end to end.

  python -m vljax.train --config=configs/merlin.py:phantom --workdir=/tmp/vljax_run

Writes into the workdir: `config.json` (the resolved config), `checkpoints/` (orbax: parameters,
optimiser state, step, RNG, config, dataset fingerprint; asynchronous), `tb/` (TensorBoard events and
`metrics.jsonl`), `run_stats.json` (what the run's batches contain: unique studies, class counts,
steps per text unit, normal fraction per batch), `train_batches.jsonl` (text unit and study ids of
every step trained) and, at the end, `results.json` (zero-shot and retrieval on `config.final_eval_split`)
and `zero_shot_<split>.png` (per-finding F1 and AUROC against the baselines; the log gets the macro
scores and the best and worst findings). Started again on the same workdir, the run resumes from its
newest readable checkpoint with the same data order (refusing another config or other data); SIGTERM
checkpoints the step being trained and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import threading

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from vljax import checkpointing, cli, cxr, inputs, modeling, run_files, sharding, update
from vljax.data import pipeline
from vljax.data import sampling as sampling_lib
from vljax.evals import report
from vljax.evaluator import Evaluator
from vljax.metric_writer import MetricWriter, Progress
from vljax.models import two_tower

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/merlin.py[:args])",
                                          lock_config=True)
_WORKDIR = cli.workdir()
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process run: call jax.distributed.initialize() before anything else (on "
    "TPU pods and SLURM it finds its peers itself; elsewhere set JAX_COORDINATOR_ADDRESS, "
    "VLJAX_NUM_PROCESSES and VLJAX_PROCESS_ID, as tools/launch_local.py does)")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "seconds to wait for every process to join before giving up with an error")


class NonFiniteLossError(RuntimeError):
    """The loss or gradients became NaN/inf; no update from that step was applied or saved."""


class _DropLibraryChatter(logging.logging.Filter):
    """Orbax logs every save phase at INFO through absl; keep its warnings, drop the rest."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _subset(records, max_studies: int):
    return records if not max_studies or len(records) <= max_studies else records[:max_studies]


def _check_config(config, mesh) -> None:
    d = config.data
    sampling_lib.check_options(strategy=d.sampling, balance_ratio=d.balance_ratio, train_fraction=d.train_fraction,
                               sections=d.sections, period=d.section_period, order=d.section_order,
                               seeds={"seed": config.seed, "data_seed": config.data_seed,
                                      "subset_seed": config.subset_seed})
    if config.get("resume", "auto") not in ("auto", "force"):
        raise ValueError(f"config.resume={config.resume!r}: expected 'auto' or 'force'")
    if d.get("on_error", "raise") not in ("raise", "skip"):
        raise ValueError(f"config.data.on_error={d.on_error!r}: expected 'raise' or 'skip'")
    if not 0.0 <= d.get("max_skip_fraction", 0.0) < 1.0:
        raise ValueError(f"config.data.max_skip_fraction={d.max_skip_fraction}: expected a fraction in [0, 1)")
    try:
        inputs.ct_config(config)
    except ValueError as e:  # its messages name CTPreprocessConfig's fields, which are config.data's
        raise ValueError(str(e).replace("CTPreprocessConfig.", "config.data.")) from None
    inputs.volume_cache(config)  # config.data.cache: built, finished, for these settings (else refused)
    spec = two_tower.ModelSpec.from_config(config.model)
    for field, path in (("model.image.init", spec.image_init.partition("torchvision:")[2]),
                        ("model.text.path", spec.text_path if spec.text_init == "pretrained" else None),
                        ("data.tokenizer", d.tokenizer)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.{field}: {path} does not exist")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % mesh.size:
            raise ValueError(f"config.{name}={config[name]} is not divisible by the {mesh.size} devices")
    update.check_accum_steps(config, mesh)


@contextlib.contextmanager
def _sigterm_sets(event: threading.Event):
    """SIGTERM (what a preemption or `kill` sends) sets `event` instead of killing the process: the
    loop then checkpoints the step it finished and returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_workdir(workdir: pathlib.Path) -> None:
    """Creates the workdir, or says in one line why it cannot be used."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".vljax_write_test"
        probe.write_text("")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [workdir, *workdir.parents] if p.exists() and not p.is_dir()), workdir)
        raise ValueError(f"--workdir {workdir} cannot be a directory: {blocker} is a file; choose another "
                         "--workdir") from None
    except PermissionError:
        raise ValueError(f"--workdir {workdir} is not writable by this user; choose a writable --workdir "
                         "(or fix its permissions)") from None
    except OSError as e:
        raise ValueError(f"--workdir {workdir} cannot be created or written ({e.strerror}); choose a "
                         "writable --workdir") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       stop_at_step: int | None = None) -> dict | None:
    """Runs (or resumes) the training job in `workdir`; returns the final results (process 0).

    `stop_at_step` ends the process's work early after saving a checkpoint there, as a preemption
    would (for tests of exact resumption). SIGTERM does the same at the step being trained; both
    return None.
    """
    preempted = threading.Event()
    with _sigterm_sets(preempted):
        return _train_and_evaluate(config, workdir, stop_at_step, preempted)


# ---------------------------------------------------------------------------------------------------
# Tasks: what differs between the CT model and CXR-CLIP (data, model spec, source, step, evaluation)
# ---------------------------------------------------------------------------------------------------


class _CTTask:
    """Merlin-style 3D CT CLIP (configs/merlin.py)."""

    def __init__(self, config, workdir: pathlib.Path, mesh):
        _check_config(config, mesh)  # before any work: a bad option costs nothing
        self.config = config
        manifest = inputs.resolve_data(config, workdir)
        self.manifest, self.excluded = inputs.check_volume_headers(config, manifest)  # before the model is built
        self.tokenizer = inputs.tokenizer_for(config)
        records = inputs.train_records(config, self.manifest)
        self.fingerprint = checkpointing.dataset_fingerprint(self.manifest, records,
                                                             inputs.make_sampler(config, records)[0])

    def model_spec(self, mesh):
        return modeling.model_spec(self.config, self.manifest, mesh)

    def source(self, text_fn):
        return inputs.train_source(self.config, self.manifest, self.tokenizer, text_fn)

    def logs(self, workdir, source, is_main):
        skips = run_files.SkipLog(workdir / "run_stats.json", source, self.config.data.max_skip_fraction,
                                  enabled=is_main)
        batch_log = run_files.BatchLog(workdir / "train_batches.jsonl", source.sampler,
                                       [r.study_id for r in source.loader.records], enabled=is_main)
        return batch_log, skips

    def write_run_stats(self, workdir, source) -> None:
        config = self.config
        stats = run_files.write_run_stats(workdir, config, source.sampler, self.excluded)
        logging.info("sampling %s: %d training studies, %d steps (%s), normal fraction per batch "
                     "min/mean/max %.3f/%.3f/%.3f -> %s", config.data.sampling, stats["train_studies"],
                     config.total_steps, ", ".join(f"{k} {v}" for k, v in stats["steps_per_unit"].items()),
                     *stats["normal_fraction_per_batch"]["all"].values(), workdir / "run_stats.json")

    def train_step(self, model, tx, schedule, mesh, state_shardings):
        return update.jit_train_step(model, tx, schedule, self.config, mesh, state_shardings)

    def evaluator(self, model, mesh):
        return Evaluator(self.config, model, mesh, self.tokenizer)

    def validate(self, evaluator, state, done) -> dict:
        config = self.config
        val = evaluator.evaluate(state["params"], state["rest"],
                                 _subset(self.manifest.split("val"), config.eval_max_studies))
        logging.info("step %d val: loss %s zero-shot macro F1 %.4f (all-positive %.4f)", done,
                     val["loss"], val["zero_shot"]["macro_f1"], val["zero_shot"]["baselines"]["all_positive"])
        return {"val/loss": val["loss"] or float("nan"), "val/zero_shot_macro_f1": val["zero_shot"]["macro_f1"],
                "val/retrieval_r5": val["retrieval"]["r5"]}

    def final(self, evaluator, state, workdir, last_step, writer, is_main) -> dict:
        config, split = self.config, self.config.final_eval_split
        result, predictions = evaluator.evaluate_with_predictions(state["params"], state["rest"],
                                                                  self.manifest.split(split))
        zs = result["zero_shot"]
        writer.write_scalars(last_step, {f"{split}/zero_shot_macro_f1": zs["macro_f1"],
                                         f"{split}/retrieval_r1": result["retrieval"]["r1"]})
        if is_main:
            path = run_files.write_results(workdir, split, last_step, result, config)
            run_files.write_predictions(workdir, split, last_step, predictions)
            logging.info("%s zero-shot macro F1 %.4f (baselines: all-positive %.4f, random %.4f); R@1/5/10 "
                         "%.3f/%.3f/%.3f -> %s", split, zs["macro_f1"], zs["baselines"]["all_positive"],
                         zs["baselines"]["random"], result["retrieval"]["r1"], result["retrieval"]["r5"],
                         result["retrieval"]["r10"], path)
            report.write_report(zs, split, workdir, step=last_step, log=logging.info)
        return result


def _make_task(config, workdir, mesh):
    if cxr.is_cxr(config):
        from vljax.cxr_task import CXRTask

        return CXRTask(config, workdir, mesh)
    return _CTTask(config, workdir, mesh)


# ---------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------


def _train_and_evaluate(config, workdir, stop_at_step: int | None, preempted: threading.Event) -> dict | None:
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        _make_workdir(workdir)
    mesh = modeling.make_mesh(config)  # a config.mesh that does not fit the devices stops here
    sharding.check_mesh_hosts(mesh)  # each host's slice of the batch is what its devices hold
    task = _make_task(config, workdir, mesh)
    fingerprint = task.fingerprint

    model = modeling.abstract_model(task.model_spec(mesh), config.seed)
    tx, schedule = update.make_optimizer(config)
    mngr = checkpointing.checkpoint_manager(workdir, config)
    abstract_state = checkpointing.abstract_train_state(model, tx, config.seed, mesh, sharding.min_size(config))
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    logging.info("%s", sharding.describe(mesh, state_shardings, abstract_state))
    latest, state = checkpointing.restore_resumable(mngr, workdir, abstract_state, config, fingerprint)
    if latest is not None:
        logging.info("resuming from %s at step %d", workdir / "checkpoints", latest)
    else:
        state = checkpointing.init_train_state(model, tx, config.seed, abstract_state)

    text_fn = None
    if not config.model.text.trainable:  # the locked tower runs once, over every training text
        text_fn = modeling.locked_text_fn(model, state["params"], state["rest"], mesh)
    source = task.source(text_fn)
    del text_fn  # it holds the initial state's buffers, which the first step donates
    # Item k of the source is step k's batch (a pure function of the seeds and k), so resuming at step
    # `start` needs no iterator state: the iterator starts there, whatever the worker count.
    start = int(state["step"])
    data_iter = pipeline.make_iterator(source, workers=config.data.workers, prefetch=config.data.prefetch,
                                       start=start)
    batch_log, skips = task.logs(workdir, source, is_main)
    if is_main:
        (workdir / "config.json").write_text(json.dumps(run_files.config_json(config), indent=2))
        run_files.code_version()  # the commit at start-up, which results.json records
        batch_log.start(start)
        skips.start(batch_log.path)
        task.write_run_stats(workdir, source)

    train_step = task.train_step(model, tx, schedule, mesh, state_shardings)
    evaluator = task.evaluator(model, mesh)
    writer = MetricWriter(workdir / "tb", enabled=is_main, keep_until=start if latest is not None else -1)
    if start == 0:
        writer.write_hparams(run_files.config_json(config))
    progress = Progress(config.total_steps, start, config.batch_size)
    acc, last_step = None, start
    logging.info("training steps %d..%d, global batch %d on %d devices (%d per device)", start,
                 config.total_steps, config.batch_size, mesh.size, config.batch_size // mesh.size)

    def check_finite():
        bad = int(state["bad_step"])
        if bad >= 0:
            raise NonFiniteLossError(_nonfinite_message(bad, mngr.latest_step()))

    try:
        for step in range(start, config.total_steps):
            batch = next(data_iter)
            if int(batch["meta"]["step"]) != step:
                raise RuntimeError(f"data iterator is at step {int(batch['meta']['step'])}, trainer at {step}")
            batch_log.add(step, stand_ins=skips.record(step, batch["meta"]))
            state, m = train_step(state, pipeline.to_global(batch["inputs"], mesh))
            acc = m if acc is None else acc.merge(m)
            done = step + 1
            if done % config.log_every == 0 or done == config.total_steps:
                values = {k: float(v) for k, v in jax.device_get(acc.compute()).items()
                          if k != "phenotype_loss" or config.model.phenotype_weight > 0}
                acc = None
                check_finite()
                batch_log.flush()
                skips.flush()
                speed = progress.update(done)
                writer.write_scalars(done, {**values, **speed})
                logging.info(progress.format(done, values, speed))
            if config.eval_every and done % config.eval_every == 0 and done != config.total_steps:
                writer.write_scalars(done, task.validate(evaluator, state, done))
            stopping = preempted.is_set() or done == stop_at_step
            if done % config.ckpt_every == 0 or done == config.total_steps or stopping:
                check_finite()
                batch_log.flush()
                skips.flush()
                checkpointing.save(mngr, done, state, config, fingerprint)
            last_step = done
            if stopping:
                mngr.wait_until_finished()
                writer.close()
                if done != stop_at_step:
                    logging.warning("SIGTERM: saved a checkpoint at step %d and stopped; start the same "
                                    "command again to resume", done)
                return None
        mngr.wait_until_finished()
    except BaseException:
        batch_log.flush()  # the steps trained so far, the failing one included
        skips.flush()
        mngr.wait_until_finished()  # never leave a half-written checkpoint behind
        writer.close()
        raise
    finally:  # stops Grain's workers and unlinks their shared-memory batches
        pipeline.close_iterator(data_iter)

    result = task.final(evaluator, state, workdir, last_step, writer, is_main)
    writer.close()
    mngr.close()
    return result


def _nonfinite_message(bad_step: int, last_ckpt: int | None) -> str:
    where = f"the last checkpoint (step {last_ckpt})" if last_ckpt is not None else "no checkpoint yet"
    return (f"the loss or its gradient became NaN/inf at step {bad_step}; that update was not applied and "
            f"the run stopped. The workdir holds {where}. Lower config.optim.lr, keep "
            f"config.optim.grad_clip > 0, or check the inputs of that step (train_batches.jsonl).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "--config=configs/merlin.py:phantom --workdir=/tmp/vljax_run")
    logging.get_absl_handler().addFilter(_DropLibraryChatter())
    try:
        if _DISTRIBUTED.value:
            cli.initialize_distributed(_DISTRIBUTED_TIMEOUT.value)
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, NonFiniteLossError, FileNotFoundError, ModuleNotFoundError,
            checkpointing.CheckpointError) as e:
        logging.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
