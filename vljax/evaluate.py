r"""Zero-shot classification (30 findings) and image→report retrieval of a trained run.

  python -m vljax.evaluate --workdir=/tmp/vljax_run [--split=test] [--step=N] [--data_dir=...]
  python -m vljax.evaluate --workdir=/tmp/vljax_run --digest [--step=N]

Reads the run's `config.json` and a checkpoint (the latest by default), evaluates the split and
writes `WORKDIR/results.json` (test split) or `WORKDIR/results_<split>.json`, with the numbers, the
geometry, the config and the code version, `WORKDIR/predictions_<split>.npz` (the per-study scores,
labels and embeddings they are computed from: `run_files.write_predictions`) and
`WORKDIR/zero_shot_<split>.png` (per-finding F1 and AUROC against the baselines); the log gets the
macro scores and the best and worst findings. The trainer calls the same code at the end of training.

`--digest` evaluates nothing: it prints SHA-256 digests of the checkpoint's parameters, other model
state (BatchNorm statistics) and optimiser state, so that two runs can be compared bitwise.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
import jax

from vljax import cli, run_files
from vljax.checkpointing import CheckpointError, load_run, tree_digest
from vljax.evals import prompts as prompts_lib
from vljax.evals import report
from vljax.evaluator import Evaluator

_WORKDIR = cli.workdir()
_SPLIT = cli.split()
_STEP = cli.step()
_DATA_DIR = cli.data_dir()
_PROMPTS = flags.DEFINE_enum("prompts", None, list(prompts_lib.PROMPT_SETS),
                             "zero-shot prompt set (default: the run's config.zero_shot_prompts)")
_DIGEST = flags.DEFINE_bool("digest", False, "print SHA-256 digests of the checkpoint's parameters and "
                            "optimiser state instead of evaluating")


def state_digests(workdir: str | pathlib.Path, step: int = -1, data_dir: str | None = None) -> dict:
    """{"step", "params", "model_state", "opt_state"}: SHA-256 of checkpoint `step` (-1: the latest)."""
    run = load_run(workdir, step, data_dir)
    state = run["state"]
    return {"step": run["step"], "params": tree_digest(state["params"]), "model_state": tree_digest(state["rest"]),
            "opt_state": tree_digest(state["opt_state"])}


def evaluate_run(workdir: str | pathlib.Path, split: str = "test", step: int = -1,
                 data_dir: str | None = None, prompts: str | None = None) -> tuple[dict, pathlib.Path]:
    """Evaluates checkpoint `step` of the run in `workdir`; returns (results, path written).
    `prompts` replaces the run's zero-shot prompt set (recorded in the results' config).

    Process 0 also logs the zero-shot summary and writes the split's chart (`evals/report.py`)."""
    run = load_run(workdir, step, data_dir)
    config = run["config"]
    if prompts:
        prompts_lib.prompts_for(prompts)  # an unknown name fails here, before any work
        config.zero_shot_prompts = prompts
    evaluator = Evaluator(config, run["model"], run["mesh"], run["tokenizer"])
    result, predictions = evaluator.evaluate_with_predictions(run["params"], run["rest"], run["manifest"].split(split))
    path = None
    if jax.process_index() == 0:
        path = run_files.write_results(pathlib.Path(workdir), split, run["step"], result, config)
        run_files.write_predictions(pathlib.Path(workdir), split, run["step"], predictions)
        report.write_report(result["zero_shot"], split, workdir, step=run["step"], log=logging.info)
    return result, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        if _DIGEST.value:
            d = state_digests(_WORKDIR.value, _STEP.value, _DATA_DIR.value)
            print(f"step {d['step']}\nparams      {d['params']}\nmodel_state {d['model_state']}\n"
                  f"opt_state   {d['opt_state']}")
            return
        result, path = evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _DATA_DIR.value, _PROMPTS.value)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    zs, r = result["zero_shot"], result["retrieval"]
    logging.info("%s: zero-shot macro F1 %.4f (all-positive %.4f, random %.4f); R@1/5/10 %.3f/%.3f/%.3f -> %s",
                 _SPLIT.value, zs["macro_f1"], zs["baselines"]["all_positive"], zs["baselines"]["random"],
                 r["r1"], r["r5"], r["r10"], path)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
