r"""Zero-shot classification (30 findings) and image→report retrieval of a trained run.

  python -m vljax.evaluate --workdir=/tmp/vljax_run [--split=test] [--step=N] [--data_dir=...]

Reads the run's `config.json` and a checkpoint (the latest by default), evaluates the split and
writes `WORKDIR/results.json` (test split) or `WORKDIR/results_<split>.json`, with the numbers, the
geometry, the config and the code version, and `WORKDIR/zero_shot_<split>.png` (per-finding F1 and
AUROC against the baselines); the log gets the macro scores and the best and worst findings. The
trainer calls the same code at the end of training.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from vljax import train
from vljax.evals import report, zero_shot

_WORKDIR = train._WORKDIR  # the trainer's --workdir flag (defined once per process)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "split to evaluate")
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "override config.data.dir (data moved since training)")
_PROMPTS = flags.DEFINE_enum("prompts", None, list(zero_shot.PROMPT_SETS),
                             "zero-shot prompt set (default: the run's config.zero_shot_prompts)")


def load_run(workdir: str | pathlib.Path, step: int = -1, data_dir: str | None = None) -> dict:
    """Config, data, model and restored state of checkpoint `step` (-1: the latest) of a run.

    Returns a dict with config, manifest, tokenizer, mesh, model, params, rest and step.
    """
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: --workdir must be a directory written by "
                                "vljax.train")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if data_dir:
        config.data.dir = data_dir
    manifest = train.resolve_data(config, workdir)
    tokenizer = train.tokenizer_for(config)
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    model = train.abstract_model(train.model_spec(config, manifest), config.seed)
    tx, _ = train.make_optimizer(config)
    abstract = train.abstract_train_state(model, tx, config.seed, replicated)
    mngr = train.checkpoint_manager(workdir, config)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir / 'checkpoints'}")
        if step < 0:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}")
        state = train.restore_state(mngr, step, abstract)
    finally:
        mngr.close()
    return dict(config=config, manifest=manifest, tokenizer=tokenizer, mesh=mesh, model=model,
                params=state["params"], rest=state["rest"], step=step)


def evaluate_run(workdir: str | pathlib.Path, split: str = "test", step: int = -1,
                 data_dir: str | None = None, prompts: str | None = None) -> tuple[dict, pathlib.Path]:
    """Evaluates checkpoint `step` of the run in `workdir`; returns (results, path written).
    `prompts` replaces the run's zero-shot prompt set (recorded in the results' config).

    Process 0 also logs the zero-shot summary and writes the split's chart (`evals/report.py`)."""
    run = load_run(workdir, step, data_dir)
    config = run["config"]
    if prompts:
        zero_shot.prompts_for(prompts)  # an unknown name fails here, before any work
        config.zero_shot_prompts = prompts
    result = train.evaluate_split(config, run["model"], run["params"], run["rest"],
                                  run["manifest"].split(split), run["tokenizer"], run["mesh"])
    path = None
    if jax.process_index() == 0:
        path = train.write_results(pathlib.Path(workdir), split, run["step"], result, config)
        report.write_report(result["zero_shot"], split, workdir, step=run["step"], log=logging.info)
    return result, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        result, path = evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _DATA_DIR.value, _PROMPTS.value)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    zs, r = result["zero_shot"], result["retrieval"]
    logging.info("%s: zero-shot macro F1 %.4f (all-positive %.4f, random %.4f); R@1/5/10 %.3f/%.3f/%.3f -> %s",
                 _SPLIT.value, zs["macro_f1"], zs["baselines"]["all_positive"], zs["baselines"]["random"],
                 r["r1"], r["r5"], r["r10"], path)


if __name__ == "__main__":
    app.run(main)
