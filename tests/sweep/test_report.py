"""`vljax.sweep.report` (with `results` and `plots`) on sweep directories built here (fake results.json
files with known numbers and a predictions file), and the predictions file a real final evaluation
writes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from vljax import run_files
from vljax.data.findings import FINDINGS
from vljax.evals import zero_shot
from vljax.sweep import report, stats
from vljax.sweep import results as results_lib

T975_DF2 = 4.302652729911275  # t_{0.975}(2), from tables
PNG = b"\x89PNG\r\n\x1a\n"


def t2_sf(t: float) -> float:
    """Upper tail of Student's t with 2 degrees of freedom, in closed form."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def fake_results(macro_f1, *, overrides=None, seeds=(0, 0, 0), excluded=("fracture",), auroc=0.7, recall=0.1):
    per = {f: {"f1": round(macro_f1 + 0.001 * i, 6), "auroc": 0.7, "n_pos": 3, "n_neg": 9}
           for i, f in enumerate(FINDINGS)}
    for f in excluded:
        per[f].update(f1=0.0, auroc=None, n_pos=0)
    config = {"seed": seeds[0], "data_seed": seeds[1], "subset_seed": seeds[2], "final_eval_split": "test",
              "data": {"train_fraction": 1.0, "sampling": "alternating", "balance_ratio": 0.5}}
    for key, value in (overrides or {}).items():
        config["data"][key.removeprefix("data.")] = value
    return {"split": "test", "step": 10, "num_studies": 12,
            "zero_shot": {"macro_f1": macro_f1, "macro_auroc": auroc, "n_findings": 29, "excluded": list(excluded),
                          "per_finding": per, "baselines": {"all_positive": 0.3, "random": 0.25}},
            "retrieval": {"r1": recall, "r5": 3 * recall, "r10": 5 * recall, "n": 12}, "config": config}


def toy_predictions(n=36, seed=3):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(n, 30), p=[0.2, 0.5, 0.3]).astype(np.int8)
    scores = rng.normal(0, 1, (n, 30)) + (labels == 1)
    img = rng.normal(size=(n, 8)).astype(np.float32)
    txt = (img + rng.normal(scale=1.0, size=(n, 8))).astype(np.float32)
    return scores, labels, img, txt


def write_run(root, setting, k, results=None, predictions=None, config_only=False):
    d = root / setting / f"seed_{k}"
    d.mkdir(parents=True)
    if config_only:  # a run that started and never finished
        (d / "config.json").write_text(json.dumps({"final_eval_split": "test"}))
        return d
    (d / "results.json").write_text(json.dumps(results))
    if predictions is not None:
        from vljax.evaluator import Predictions

        scores, labels, img, txt = predictions
        run_files.write_predictions(d, "test", 10, Predictions(tuple(f"s{i}" for i in range(len(scores))), scores,
                                                               labels, img, txt))
    return d


F1 = {"random": [0.60, 0.62, 0.64], "balanced": [0.57, 0.60, 0.61], "fraction_20": [0.50, 0.52],
      "fraction_40": [0.55, 0.56], "random_init": [0.61, 0.63, 0.62], "random_data": [0.60, 0.64, 0.62]}
OVERRIDES = {"random": {"data.sampling": "random"}, "balanced": {"data.sampling": "balanced"},
             "alternating": {"data.sampling": "alternating"},
             "fraction_20": {"data.sampling": "alternating", "data.train_fraction": 0.2},
             "fraction_40": {"data.sampling": "alternating", "data.train_fraction": 0.4},
             "random_init": {"data.sampling": "random"}, "random_data": {"data.sampling": "random"}}


def seeds_of(setting, k):
    if setting == "random_init":
        return (k, 0, 0)
    if setting == "random_data":
        return (0, k, 0)
    return (k, k, k)


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    runs = []
    for setting, values in F1.items():
        for k, v in enumerate(values):
            write_run(root, setting, k, fake_results(v, overrides=OVERRIDES[setting], seeds=seeds_of(setting, k),
                                                     auroc=v + 0.1))
            runs.append((setting, k))
    # Listed as random seed 3, but trained with seed 7: left out, and said.
    write_run(root, "random", 3, fake_results(0.9, overrides=OVERRIDES["random"], seeds=(7, 3, 3)))
    runs.append(("random", 3))
    preds = toy_predictions()
    zs = zero_shot.zero_shot_metrics(preds[0], preds[1], seed=0)
    ret = zero_shot.retrieval_metrics(preds[2], preds[3])
    alt = {**fake_results(0.0, overrides=OVERRIDES["alternating"]), "zero_shot": zs, "retrieval": ret}
    write_run(root, "alternating", 0, alt, predictions=preds)
    runs.append(("alternating", 0))
    write_run(root, "fraction_40", 2, config_only=True)
    runs += [("fraction_40", 2), ("balanced", 3)]  # balanced seed 3: listed, never started
    meta = {"name": "batch_composition", "spec": "configs/sweeps/batch_composition.py:test", "baseline": "random",
            "comparisons": {"balanced": "alternating", "fraction_40": "gone"},
            "decomposition": {"init_only": ["random_init"], "data_only": ["random_data"], "both": ["random"]},
            "runs": [{"setting": s, "seed_index": k,
                      "seeds": dict(zip(("seed", "data_seed", "subset_seed"), seeds_of(s, k))),
                      "overrides": OVERRIDES[s], "workdir": f"{s}/seed_{k}"} for s, k in runs]}
    (root / "sweep.json").write_text(json.dumps(meta))
    (root / "sweep_state.json").write_text(json.dumps({"runs": {
        "fraction_40/seed_2": {"status": "failed", "exit_code": 1, "error": "ValueError: boom"}}}))
    return root, preds, zs, ret


def read_csv(path):
    rows = list(csv.DictReader(path.open()))
    return {(r["section"], r["setting"], r["reference"], r["metric"]): r for r in rows}, rows


def test_report_on_a_synthetic_sweep_has_the_expected_numbers(sweep_dir):
    root, preds, zs, ret = sweep_dir
    out = report.write_report(root, resamples=40, seed=2)
    assert set(out) == {"report.md", "report.csv", "macro_f1.png", "per_finding_f1.png", "data_scaling.png"}
    for name in ("macro_f1.png", "per_finding_f1.png", "data_scaling.png"):
        assert (root / name).read_bytes()[:8] == PNG
    rows, all_rows = read_csv(root / "report.csv")
    num = lambda r, k: float(r[k])  # noqa: E731

    # Mean, sample std, t-interval over the three seeds of random.
    r = rows[("summary", "random", "", "macro_f1")]
    assert r["n"] == "3" and num(r, "mean") == pytest.approx(0.62) and num(r, "std") == pytest.approx(0.02)
    assert num(r, "ci_high") == pytest.approx(0.62 + T975_DF2 * 0.02 / math.sqrt(3))
    assert num(rows[("summary", "random", "", "macro_auroc")], "mean") == pytest.approx(0.72)
    assert num(rows[("summary", "random", "", "r5")], "mean") == pytest.approx(0.3)
    finding = rows[("summary", "balanced", "", f"f1/{FINDINGS[2]}")]
    assert num(finding, "mean") == pytest.approx(np.mean(F1["balanced"]) + 0.002)
    assert ("summary", "random", "", "f1/fracture") not in rows  # no positives: not averaged as an F1 of 0

    # balanced - random over seeds 0-2 (balanced seed 3 never ran): d = -0.03, -0.02, -0.03.
    p = rows[("paired", "balanced", "random", "macro_f1")]
    d = np.array([-0.03, -0.02, -0.03])
    t = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(3))
    assert p["n"] == "3" and num(p, "mean") == pytest.approx(d.mean())
    assert num(p, "ci_low") == pytest.approx(d.mean() - T975_DF2 * d.std(ddof=1) / math.sqrt(3))
    assert num(p, "p_t") == pytest.approx(2 * t2_sf(t), rel=1e-9)
    assert num(p, "p_sign_flip") == 2 / 8
    # The data fractions pair with random on seeds 0 and 1; the one-factor grids are not paired.
    assert rows[("paired", "fraction_40", "random", "macro_f1")]["n"] == "2"
    # ... and each data fraction with the largest fraction of its curve (alternating, one run: seed 0).
    p = rows[("paired", "fraction_20", "alternating", "macro_f1")]
    assert p["n"] == "1" and num(p, "mean") == pytest.approx(0.50 - zs["macro_f1"]) and p["p_t"] == ""
    assert not [k for k in rows if k[0] == "paired" and k[1] in ("random_init", "random_data")]
    # A further comparison of sweep.json: balanced against alternating, on their one shared seed index.
    p = rows[("paired", "balanced", "alternating", "macro_f1")]
    assert p["n"] == "1" and num(p, "mean") == pytest.approx(0.57 - zs["macro_f1"])
    assert not [k for k in rows if k[:3] == ("paired", "fraction_40", "gone")]

    # One run: bootstrap over its studies, equal to stats.bootstrap_run on the saved arrays.
    want = stats.bootstrap_run(*preds, resamples=40, seed=2)
    for metric in ("macro_f1", "macro_auroc", "r1", "r5", "r10"):
        b = rows[("bootstrap", "alternating", "", metric)]
        assert (num(b, "mean"), num(b, "ci_low"), num(b, "ci_high")) == (
            want[metric].estimate, want[metric].ci_low, want[metric].ci_high)
        assert b["n"] == "36"
    assert num(rows[("bootstrap", "alternating", "", "macro_f1")], "mean") == zs["macro_f1"]
    assert num(rows[("bootstrap", "alternating", "", "r10")], "mean") == ret["r10"]
    assert rows[("summary", "alternating", "", "macro_f1")]["std"] == ""  # one run: no std

    # Variance decomposition: s² of the init-only, data-only and both grids.
    var = {k[2]: float(v["mean"]) for k, v in rows.items() if k[0] == "variance" and k[3] == "macro_f1"}
    assert var == pytest.approx({"init": 1e-4, "data_order": 4e-4, "both": 4e-4, "init+data_order": 5e-4})

    # Runs not finished are listed, with what is known about them.
    missing = {(r["setting"], r["reference"]): r["note"] for r in all_rows if r["section"] == "missing"}
    assert missing == {("fraction_40", "seed_2"): "failed (exit 1: ValueError: boom, no checkpoint)",
                       ("balanced", "seed_3"): "not started",
                       ("random", "seed_3"): "left out: its config contradicts sweep.json (seed=7, sweep.json 3)"}

    md = (root / "report.md").read_text()
    assert "- fraction_40 seed_2: failed (exit 1: ValueError: boom, no checkpoint)" in md
    assert "- balanced seed_3: not started" in md
    assert "- comparison fraction_40 - gone: not both settings of this sweep, left out" in md
    block = md.split("**Against alternating**")[1].split("**")[0]
    assert "Δ vs alternating (points)" in block
    assert [ln.split(" | ")[0].strip("| ") for ln in block.splitlines() if ln.startswith("| ")][1:] == [
        "alternating", "balanced"]
    assert "1 of 17 finished runs have a predictions file; metrics recomputed from it equal results.json" in md
    # The paper-shaped table: random 62.00 ± 2.00 [CI] and balanced's difference in points.
    lo, hi = 62 - T975_DF2 * 2 / math.sqrt(3), 62 + T975_DF2 * 2 / math.sqrt(3)
    assert f"| random | 100 % | 3 | 62.00 ± 2.00 [{lo:.2f}, {hi:.2f}] |" in md
    assert "| balanced | 100 % | 3 | 59.33 ± 2.08" in md and "-2.67 [" in md
    assert "| fraction_20 | 20 % | 2 |" in md and "random_init |" not in md.split("## Per setting")[0]
    # The data-fraction block ends at 100 %: alternating, which fraction_20/40 differ from only in the fraction.
    block = md.split("**Training-data fraction**")[1].split("##")[0]
    assert "Δ vs alternating (points)" in block
    assert [ln.split(" | ")[0].strip("| ") for ln in block.splitlines() if ln.startswith("| ")][1:] == [
        "fraction_20", "fraction_40", "alternating"]
    assert "![data_scaling.png](data_scaling.png)" in md


def test_report_without_sweep_json_derives_settings_and_seeds(tmp_path):
    root = tmp_path / "sweep"
    for setting, values in (("random", [0.6, 0.7]), ("balanced", [0.5, 0.55])):
        for k, v in enumerate(values):
            write_run(root, setting, k, fake_results(v, seeds=(k, k, k)))
    sweep = results_lib.load_sweep(root)
    assert [(r.setting, r.seed_index, r.seeds["data_seed"]) for r in sweep.runs] == [
        ("balanced", 0, 0), ("balanced", 1, 1), ("random", 0, 0), ("random", 1, 1)]
    assert sweep.baseline == "random"
    report.write_report(root, resamples=10)
    rows, _ = read_csv(root / "report.csv")
    assert num_pair(rows) == pytest.approx(-0.125)
    assert "no sweep.json" in (root / "report.md").read_text()
    assert not (root / "data_scaling.png").exists()


def num_pair(rows):
    return float(rows[("paired", "balanced", "random", "macro_f1")]["mean"])


def test_report_names_a_predictions_file_that_does_not_reproduce_results(tmp_path):
    root = tmp_path / "sweep"
    preds = toy_predictions()
    zs = zero_shot.zero_shot_metrics(preds[0], preds[1], seed=0)
    results = {**fake_results(0.0), "zero_shot": {**zs, "macro_f1": zs["macro_f1"] + 0.01},
               "retrieval": zero_shot.retrieval_metrics(preds[2], preds[3])}
    write_run(root, "random", 0, results, predictions=preds)
    report.write_report(root, resamples=5)
    assert "differ from results.json for: random/seed_0: macro_f1" in (root / "report.md").read_text()
