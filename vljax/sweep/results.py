"""A sweep directory read back: its grid (DIR/sweep.json, written by `vljax.sweep run`), each run's
status and, for finished runs, results.json and predictions_<split>.npz (`run_files`).

A run is "done" when its results.json is readable and its saved config agrees with its sweep.json
entry (overrides and seeds; data.dir may move); otherwise its status says why not: not started,
unfinished or interrupted (with its last checkpoint), failed (the runner's DIR/sweep_state.json
record), unreadable, or left out because its config contradicts sweep.json. Without sweep.json (or
without its runs) the runs are the DIR/<setting>/seed_<k>/ folders and their seeds come from each
run's config; `Sweep.notes` says what was derived.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

SEED_KEYS = ("seed", "data_seed", "subset_seed")
MOVABLE_KEYS = ("data.dir",)  # may differ between sweep.json and a run's config (vljax.sweep.spec)


@dataclasses.dataclass
class Run:
    """One grid entry: where it lives, its status ("done", or why not: "not started", "unfinished",
    "interrupted, ...", "failed (...)", "unreadable (...)", "left out: ...") and, when done, its
    results and predictions file."""

    setting: str
    seed_index: int
    path: pathlib.Path
    seeds: dict | None = None
    overrides: dict | None = None
    status: str = "not started"
    results: dict | None = None
    predictions: pathlib.Path | None = None


@dataclasses.dataclass
class Sweep:
    """The grid of DIR/sweep.json (or of the folders), its runs in grid order, and what was derived."""

    root: pathlib.Path
    name: str
    spec: str | None
    baseline: str | None
    decomposition: dict | None
    runs: list[Run]
    notes: list[str]
    comparisons: dict[str, str] = dataclasses.field(default_factory=dict)  # setting -> reference

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(r.setting for r in self.runs))

    @property
    def one_factor_grids(self) -> set[str]:
        """Settings that exist for the variance decomposition only (init-only and data-only grids)."""
        dec = self.decomposition or {}
        names = [dec.get(k) or [] for k in ("init_only", "data_only")]
        return {n for g in names for n in ([g] if isinstance(g, str) else g)}


def _scan(root: pathlib.Path) -> list[dict]:
    entries = []
    for d in sorted(root.glob("*/seed_*")):
        m = re.fullmatch(r"seed_(\d+)", d.name)
        if d.is_dir() and m:
            entries.append({"setting": d.parent.name, "seed_index": int(m.group(1)),
                            "workdir": f"{d.parent.name}/{d.name}"})
    return entries


def _results_path(path: pathlib.Path) -> pathlib.Path | None:
    if (path / "results.json").is_file():
        return path / "results.json"
    try:  # a run whose config.final_eval_split is not "test" writes results_<split>.json
        split = json.loads((path / "config.json").read_text()).get("final_eval_split", "test")
    except (OSError, ValueError):
        return None
    candidate = path / f"results_{split}.json"
    return candidate if candidate.is_file() else None


def _unfinished(run: Run, record: dict) -> str:
    """Why a run has no results: the sweep runner's record (DIR/sweep_state.json) and its checkpoints."""
    ckpt = run.path / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    at = f", checkpoint at step {steps[-1]}" if steps else ", no checkpoint"
    status = record.get("status")
    if status == "failed":
        return f"failed (exit {record.get('exit_code')}{': ' + record['error'] if record.get('error') else ''}{at})"
    if status == "running":
        return f"running or killed while running{at}"
    return ("interrupted" if steps else "unfinished") + (at if steps else "")


def _mismatch(run: Run) -> list[str]:
    """Fields where the run's saved config contradicts its sweep.json entry (overrides and seeds;
    data.dir may move)."""
    config = run.results.get("config") or {}
    expected = {k: v for k, v in (run.overrides or {}).items() if k not in MOVABLE_KEYS}
    expected.update(run.seeds or {})
    bad = []
    for key, want in expected.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and json.loads(json.dumps(node)) != json.loads(json.dumps(want)):
            bad.append(f"{key}={node!r}, sweep.json {want!r}")
    return bad


def _load_run(run: Run, record: dict) -> None:
    if not run.path.is_dir():
        run.status = "not started"
        return
    results_path = _results_path(run.path)
    if results_path is None:
        run.status = _unfinished(run, record)
        return
    try:
        run.results = json.loads(results_path.read_text())
        _ = run.results["zero_shot"]["macro_f1"], run.results["retrieval"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        run.status, run.results = f"unreadable ({results_path.name}: {type(e).__name__})", None
        return
    bad = _mismatch(run)
    if bad:
        run.status, run.results = f"left out: its config contradicts sweep.json ({'; '.join(bad[:3])})", None
        return
    run.status = "done"
    if run.seeds is None:
        config = run.results.get("config", {})
        run.seeds = {k: config.get(k) for k in SEED_KEYS}
    predictions = run.path / f"predictions_{run.results.get('split', 'test')}.npz"
    run.predictions = predictions if predictions.is_file() else None


def load_sweep(workdir: str | pathlib.Path) -> Sweep:
    """The sweep in `workdir` with every run's status and results (module docstring)."""
    root = pathlib.Path(workdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    notes: list[str] = []
    meta = {}
    if (root / "sweep.json").is_file():
        meta = json.loads((root / "sweep.json").read_text())
    else:
        notes.append("no sweep.json: settings and seed indices are the DIR/<setting>/seed_<k>/ folders, seeds "
                     "each run's config")
    entries = meta.get("runs")
    if entries is None:
        if meta:
            notes.append("sweep.json lists no runs: they are the DIR/<setting>/seed_<k>/ folders")
        entries = _scan(root)
    state = {}
    if (root / "sweep_state.json").is_file():  # the runner's record of each run's last outcome
        try:
            state = json.loads((root / "sweep_state.json").read_text()).get("runs", {})
        except ValueError:
            notes.append("sweep_state.json is unreadable: unfinished runs are described from their folders")
    runs = []
    for e in entries:
        rel = e.get("workdir") or f"{e['setting']}/seed_{e['seed_index']}"
        index = e.get("seed_index")
        if index is None:
            m = re.search(r"seed_(\d+)$", rel)
            index = int(m.group(1)) if m else len(runs)
        run = Run(e["setting"], int(index), root / rel, e.get("seeds"), e.get("overrides"))
        _load_run(run, state.get(rel, {}))
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"{root} holds no sweep: no sweep.json with runs and no <setting>/seed_<k>/ "
                                "folders (pass the --workdir given to `python -m vljax.sweep run`)")
    settings = list(dict.fromkeys(r.setting for r in runs))
    if "baseline" in meta:
        baseline = meta["baseline"]
    else:
        baseline = "random" if "random" in settings else None
        notes.append(f"no baseline in sweep.json: {baseline!r} is used" if baseline else
                     "no baseline in sweep.json and no setting named 'random': no paired differences")
    if baseline is not None and baseline not in settings:
        notes.append(f"baseline {baseline!r} is not a setting of this sweep: no paired differences")
        baseline = None
    for key in ("name", "spec"):
        if meta and key not in meta:
            notes.append(f"sweep.json has no {key!r}")
    comparisons = {}
    for name, ref in (meta.get("comparisons") or {}).items():
        if name in settings and ref in settings:
            comparisons[name] = ref
        else:
            notes.append(f"comparison {name} - {ref}: not both settings of this sweep, left out")
    return Sweep(root, meta.get("name", root.name), meta.get("spec"), baseline, meta.get("decomposition"), runs,
                 notes, comparisons)


def run_metrics(results: dict) -> dict[str, float | None]:
    """macro_f1, macro_auroc, r1, r5, r10 and f1/<finding> of one results.json (None: undefined, or a
    finding without both classes on the split). CXR-CLIP runs (`vljax/cxr_task.py`): the binary
    zero-shot's macro F1 / AUROC and f1/<class>, and the linear probes' macro AUROC as probe<fraction>."""
    zs, r = results["zero_shot"], results["retrieval"] or {}
    out = {"macro_f1": zs["macro_f1"], "macro_auroc": zs["macro_auroc"], "r1": r.get("r1"), "r5": r.get("r5"),
           "r10": r.get("r10")}
    for fraction, probe in (results.get("linear_probe") or {}).items():
        out[f"probe{fraction}"] = probe["macro_auroc"]
    excluded = set(zs.get("excluded", ()))
    for f, v in zs.get("per_finding", zs.get("per_class", {})).items():
        out[f"f1/{f}"] = None if f in excluded else v["f1"]
    return out
