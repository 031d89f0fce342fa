"""The committed phantom study (docs/study/batch_composition): its report is a function of the saved runs
kept beside it. Recomputing it from those files alone gives every number of the committed report.csv."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import pytest

from vljax.sweep import report

STUDY = pathlib.Path(__file__).resolve().parents[2] / "docs" / "study" / "batch_composition"


def _rows(path: pathlib.Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_the_committed_study_report_is_recomputed_from_its_saved_runs(tmp_path):
    if not (STUDY / "report.csv").is_file():
        pytest.fail(f"{STUDY} has no report.csv: the study record is missing")
    root = tmp_path / "study"
    shutil.copytree(STUDY, root, ignore=shutil.ignore_patterns("report.*", "*.png", "train.log"))
    sweep = json.loads((root / "sweep.json").read_text())
    assert len(sweep["runs"]) == 21 and all((root / r["workdir"] / "results.json").is_file() for r in sweep["runs"])
    report.write_report(root)
    want, got = _rows(STUDY / "report.csv"), _rows(root / "report.csv")
    # Every row of the committed report. The study's own directory also held the predictions files; they
    # add no row here (only single-run settings are bootstrapped from them, and every setting has 3 runs).
    assert got == want
    assert {r["section"] for r in want} >= {"summary", "paired"}
    paired = {(r["setting"], r["reference"]) for r in want if r["section"] == "paired" and r["metric"] == "macro_f1"}
    assert {("balanced_50_50", "random"), ("balanced_50_50", "alternating"), ("fraction_20", "alternating")} <= paired
