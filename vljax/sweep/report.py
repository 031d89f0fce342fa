"""`python -m vljax.sweep report --workdir=DIR`: the statistics of a sweep, from its saved runs alone.

Reads DIR/sweep.json (written by `vljax.sweep run`: settings, seeds, overrides, baseline, further
comparisons, variance decomposition grids) and each run's results.json and predictions_<split>.npz
(`run_files.write_predictions`), and writes

  DIR/report.md           tables: the paper-shaped macro F1 table, per-setting mean ± std and 95 %
                          t-intervals over seeds (macro F1, macro AUROC, R@1/5/10, per-finding F1),
                          paired differences against the baseline setting and the sweep's other
                          comparisons (mean, CI, paired t and exact sign-flip p), bootstrap CIs of
                          single-run settings, the variance decomposition, runs not finished, and a check that every run's predictions
                          file reproduces its results.json
  DIR/report.csv          every number of report.md, one per row (`CSV_COLUMNS`; metrics as fractions
                          in [0, 1], as results.json holds them; differences in the same units)
  DIR/macro_f1.png        macro F1 per setting: the seeds, the mean and its 95 % interval
  DIR/per_finding_f1.png  per-finding F1 per setting with 95 % t-interval error bars
  DIR/data_scaling.png    macro F1 against data.train_fraction with a 95 % band, for settings that
                          differ only in that fraction (when the sweep has them)

Without sweep.json (or with keys missing) settings and seed indices come from the DIR/<setting>/
seed_<k>/ folders and seeds from each run's config; the report says what was derived. Runs listed
but not finished, or whose config contradicts sweep.json, are listed in the report with the reason,
never silently dropped. Reading the directory: `vljax/sweep/results.py`; the statistics' formulas:
`vljax/sweep/stats.py`; the plots: `vljax/sweep/plots.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib

from vljax import run_files
from vljax.data.findings import FINDINGS
from vljax.evals import zero_shot
from vljax.sweep import plots, stats
from vljax.sweep.results import SEED_KEYS, Run, Sweep, load_sweep, run_metrics

FRACTION_KEY = "data.train_fraction"
HEADLINE = (("macro_f1", "macro F1"), ("macro_auroc", "macro AUROC"), ("r1", "R@1"), ("r5", "R@5"),
            ("r10", "R@10"))
CSV_COLUMNS = ("section", "setting", "reference", "metric", "n", "mean", "std", "ci_low", "ci_high",
               "p_t", "p_sign_flip", "note")
LEVEL = 0.95


# ------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class Analysis:
    sweep: Sweep
    values: dict[str, dict[str, dict[int, float]]]  # setting -> metric -> seed index -> value
    summaries: dict[str, dict[str, stats.Summary]]
    # (setting, reference) -> metric -> setting minus reference: against the baseline, and each data
    # fraction against its curve's largest fraction
    paired: dict[tuple[str, str], dict[str, stats.PairedDifference]]
    bootstrap: dict[str, dict[str, stats.BootstrapCI]]  # single-run settings
    decompositions: list[tuple[tuple[str, str, str], dict[str, stats.VarianceDecomposition]]]
    scaling: list[list[tuple[float, str]]]  # curves of (train fraction, setting)
    fractions: dict[str, float]
    checks: list[str]  # predictions files that do not reproduce their results.json
    checked: int
    notes: list[str]
    resamples: int
    seed: int


def _fraction(sweep: Sweep, setting: str) -> float:
    runs = [r for r in sweep.runs if r.setting == setting]
    for r in runs:
        if r.overrides and FRACTION_KEY in r.overrides:
            return float(r.overrides[FRACTION_KEY])
    for r in runs:
        if r.results:
            return float(((r.results.get("config") or {}).get("data") or {}).get("train_fraction", 1.0))
    return 1.0


def _setting_key(sweep: Sweep, setting: str) -> str | None:
    """What a setting is apart from its seeds and data fraction: its overrides, or (without
    sweep.json overrides) its saved config."""
    runs = [r for r in sweep.runs if r.setting == setting]
    if runs and all(r.overrides is not None for r in runs):
        over = {k: v for k, v in runs[0].overrides.items()
                if k != FRACTION_KEY and k.rsplit(".", 1)[-1] not in SEED_KEYS}
        return json.dumps(over, sort_keys=True)
    for r in runs:
        if r.results and "config" in r.results:
            config = json.loads(json.dumps(r.results["config"]))
            for k in SEED_KEYS:
                config.pop(k, None)
            config.get("data", {}).pop("train_fraction", None)
            return json.dumps(config, sort_keys=True)
    return None


def _scaling_curves(sweep: Sweep, fractions: dict[str, float], notes: list[str]) -> list[list[tuple[float, str]]]:
    """Groups of settings that differ only in data.train_fraction (one-factor variance grids left
    out), as (fraction, setting) sorted by fraction; of settings at the same fraction the first."""
    groups: dict[str, dict[float, str]] = {}
    for s in sweep.settings:
        key = _setting_key(sweep, s)
        if key is None or s in sweep.one_factor_grids:
            continue
        group = groups.setdefault(key, {})
        if fractions[s] in group:
            notes.append(f"data scaling: {s} and {group[fractions[s]]} differ only in seeds; the curve uses "
                         f"{group[fractions[s]]}")
            continue
        group[fractions[s]] = s
    return [sorted(g.items()) for g in groups.values() if len(g) >= 2]


def _check_predictions(run: Run, preds: dict) -> list[str]:
    """Differences between results.json and the metrics recomputed from the run's predictions file."""
    m = zero_shot.zero_shot_metrics(preds["scores"], preds["labels"], random_draws=1)
    zs = run.results["zero_shot"]
    bad = [k for k in ("macro_f1", "macro_auroc") if m[k] != zs[k]]
    bad += [f"f1/{f}" for f, v in zs["per_finding"].items() if m["per_finding"].get(f, {}).get("f1") != v["f1"]]
    return bad


def _pair(sweep: Sweep, values, s: str, ref: str, notes: list[str]) -> dict[str, stats.PairedDifference]:
    """`s` minus `ref` per headline metric over the seed indices both finished with the same seeds."""
    seeds_s = {r.seed_index: r.seeds for r in sweep.runs if r.setting == s}
    seeds_ref = {r.seed_index: r.seeds for r in sweep.runs if r.setting == ref}
    differ = {k for k in set(seeds_s) & set(seeds_ref) if seeds_s[k] and seeds_ref[k] and seeds_s[k] != seeds_ref[k]}
    if differ:
        notes.append(f"{s} and {ref} have different seeds at seed indices {sorted(differ)}: those are not paired")
    out = {}
    for metric, _ in HEADLINE:
        a_v, b_v = values[s].get(metric, {}), values[ref].get(metric, {})
        shared = sorted(set(a_v) & set(b_v) - differ)
        if shared:
            out[metric] = stats.paired_difference([a_v[k] for k in shared], [b_v[k] for k in shared], LEVEL)
    return out


def analyse(sweep: Sweep, *, resamples: int = 1000, seed: int = 0) -> Analysis:
    """Every statistic of the report (`vljax/sweep/stats.py`), from the runs' saved files."""
    settings = sweep.settings
    notes = list(sweep.notes)
    values: dict[str, dict[str, dict[int, float]]] = {s: {} for s in settings}
    checks, checked = [], 0
    done_runs = {s: [r for r in sweep.runs if r.setting == s and r.status == "done"] for s in settings}
    single: dict[str, dict] = {}  # the predictions of single-run settings, for their bootstrap
    for run in sweep.runs:
        if run.status != "done":
            continue
        for metric, v in run_metrics(run.results).items():
            if v is not None:
                values[run.setting].setdefault(metric, {})[run.seed_index] = float(v)
        if run.predictions is not None:  # one file in memory at a time (embeddings: N x E each)
            preds = run_files.read_predictions(run.predictions)
            checked += 1
            bad = _check_predictions(run, preds)
            if bad:
                checks.append(f"{run.setting}/seed_{run.seed_index}: {', '.join(bad[:5])}")
            if len(done_runs[run.setting]) == 1:
                single[run.setting] = preds
    summaries = {s: {m: stats.summarize(list(v.values()), LEVEL) for m, v in values[s].items()} for s in settings}

    fractions = {s: _fraction(sweep, s) for s in settings}
    curves = _scaling_curves(sweep, fractions, notes)
    pairs = [(s, sweep.baseline) for s in settings
             if sweep.baseline is not None and s != sweep.baseline and s not in sweep.one_factor_grids]
    pairs += [(s, curve[-1][1]) for curve in curves for _, s in curve[:-1] if (s, curve[-1][1]) not in pairs]
    pairs += [(s, ref) for s, ref in sweep.comparisons.items() if (s, ref) not in pairs]
    paired = {(s, ref): _pair(sweep, values, s, ref, notes) for s, ref in pairs}

    bootstrap = {}
    for s in settings:
        done = done_runs[s]
        if len(done) != 1:
            continue
        if s not in single:
            notes.append(f"{s}: a single run without a predictions file: no bootstrap interval")
            continue
        p = single.pop(s)
        bootstrap[s] = stats.bootstrap_run(p["scores"], p["labels"], p["image_emb"], p["text_emb"],
                                           resamples=resamples, seed=seed, level=LEVEL)
        r = done[0].results["retrieval"]
        if any(bootstrap[s][f"r{k}"].estimate != r[f"r{k}"] for k in stats.RETRIEVAL_KS):
            checks.append(f"{s}/seed_{done[0].seed_index}: retrieval R@k")

    decompositions = []
    dec = sweep.decomposition or {}
    groups = [dec.get(k) or [] for k in ("init_only", "data_only", "both")]
    groups = [[g] if isinstance(g, str) else list(g) for g in groups]
    if any(groups):
        if len({len(g) for g in groups}) != 1:
            notes.append("decomposition: init_only, data_only and both list different numbers of settings; "
                         "matched by position up to the shortest")
        for names in zip(*groups):
            if any(n not in values for n in names):
                notes.append(f"decomposition {names}: not all of these settings are in the sweep")
                continue
            decompositions.append((names, {m: stats.variance_decomposition(
                *(list(values[n].get(m, {}).values()) for n in names), level=LEVEL)
                for m in ("macro_f1", "macro_auroc")}))

    return Analysis(sweep, values, summaries, paired, bootstrap, decompositions, curves, fractions, checks,
                    checked, notes, resamples, seed)


# ------------------------------------------------------------------------------------------------
# report.csv


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x)) if isinstance(x, float) else str(x)


def csv_rows(a: Analysis) -> list[dict]:
    rows = []

    def add(section, setting, metric, reference="", n="", mean=None, std=None, lo=None, hi=None, p_t=None,
            p_flip=None, note=""):
        rows.append(dict(zip(CSV_COLUMNS, (section, setting, reference, metric, _num(n), _num(mean), _num(std),
                                           _num(lo), _num(hi), _num(p_t), _num(p_flip), note))))

    for s in a.sweep.settings:
        for metric, summ in a.summaries[s].items():
            add("summary", s, metric, n=summ.n, mean=summ.mean, std=summ.std, lo=summ.ci_low, hi=summ.ci_high,
                note="mean, sample std and 95% t-interval over seeds")
    for (s, ref), per in a.paired.items():
        for metric, d in per.items():
            add("paired", s, metric, reference=ref, n=d.n, mean=d.mean, std=d.std, lo=d.ci_low,
                hi=d.ci_high, p_t=d.t_p, p_flip=d.sign_flip_p,
                note="setting minus reference over shared seed indices; paired t and exact sign-flip p")
    for s, per in a.bootstrap.items():
        for metric, ci in per.items():
            add("bootstrap", s, metric, n=ci.n, mean=ci.estimate, lo=ci.ci_low, hi=ci.ci_high,
                note=f"one run; percentile bootstrap over {ci.n} studies, B={ci.resamples} ({ci.valid} valid), "
                     f"seed={ci.seed}")
    for names, per in a.decompositions:
        for metric, dec in per.items():
            for part, name, v in (("init", names[0], dec.init), ("data_order", names[1], dec.data),
                                  ("both", names[2], dec.both)):
                add("variance", name, metric, reference=part, n=v.n, mean=v.variance, lo=v.ci_low, hi=v.ci_high,
                    note="sample variance (ddof=1) over seeds; 95% chi-square interval")
            add("variance", "+".join(names[:2]), metric, reference="init+data_order", mean=dec.total,
                note=f"sum of the two one-factor variances; ratio to both {_num(dec.ratio)}, init share "
                     f"{_num(dec.init_share)}")
    for r in a.sweep.runs:
        if r.status != "done":
            add("missing", r.setting, "", reference=f"seed_{r.seed_index}", note=r.status)
    return rows


def format_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# report.md


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _cell(a: Analysis, s: str, metric: str) -> str:
    summ = a.summaries[s].get(metric)
    if summ is None or summ.n == 0:
        return "n/a"
    if summ.n >= 2:
        return f"{_pct(summ.mean)} ± {_pct(summ.std)} [{_pct(summ.ci_low)}, {_pct(summ.ci_high)}]"
    ci = a.bootstrap.get(s, {}).get(metric)
    if ci is not None:
        return f"{_pct(summ.mean)} [{_pct(ci.ci_low)}, {_pct(ci.ci_high)}]ᵇ"
    return f"{_pct(summ.mean)} (1 run)"


def _diff_cells(a: Analysis, s: str, ref: str | None, metric: str = "macro_f1") -> tuple[str, str]:
    d = a.paired.get((s, ref), {}).get(metric)
    if d is None:
        return ("", "") if s == ref or ref is None else ("n/a", "n/a")
    ci = f" [{_pct(d.ci_low)}, {_pct(d.ci_high)}]" if d.n >= 2 else ""
    return f"{'+' if d.mean >= 0 else ''}{_pct(d.mean)}{ci} (n={d.n})", f"{_p(d.t_p)} / {_p(d.sign_flip_p)}"


def curve_top(a: Analysis, s: str) -> str | None:
    """The largest-fraction setting of the data-scaling curve holding `s` (None: in no curve)."""
    return next((curve[-1][1] for curve in a.scaling if s in {m for _, m in curve}), None)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def format_markdown(a: Analysis, plots: list[str]) -> str:
    sw = a.sweep
    settings = sw.settings
    done = [r for r in sw.runs if r.status == "done"]
    base = sw.baseline
    lines = [f"# Sweep report: {sw.name}", ""]
    if sw.spec:
        lines += [f"Spec: `{sw.spec}`", ""]
    lines += [f"{len(done)} of {len(sw.runs)} runs finished, {len(settings)} settings. Written by "
              f"`python -m vljax.sweep report --workdir={sw.root}` from the runs' results.json and "
              "predictions files alone; every number is in report.csv. Metrics in %, differences in points. "
              "Intervals are 95 %: t-intervals over seeds, or (ᵇ) percentile bootstrap intervals over the "
              f"test studies of a single run (B = {a.resamples}, seed {a.seed}). Formulas: "
              "`vljax/sweep/stats.py`.", ""]
    lines += [f"- {n}" for n in a.notes] + ([""] if a.notes else [])

    # The paper's layout: strategies at the full data against the baseline, the sweep's further
    # comparisons by reference, then each data-fraction curve against its largest fraction.
    scaled = {s for curve in a.scaling for _, s in curve}
    blocks = [("Batch composition", base, [s for s in settings if s not in sw.one_factor_grids
                                           and (s not in scaled or s == curve_top(a, s))])]
    for ref in dict.fromkeys(sw.comparisons.values()):
        blocks.append((f"Against {ref}", ref, [ref] + [s for s in settings if sw.comparisons.get(s) == ref]))
    blocks += [("Training-data fraction", curve[-1][1], [s for _, s in curve]) for curve in a.scaling]
    lines += ["## Macro F1 (the published study's table)", ""]
    for title, ref, members in blocks:
        head = ["Setting", "Train fraction", "Seeds", "Macro F1 (%) mean ± std [95 % CI]"]
        if ref:
            head += [f"Δ vs {ref} (points) [95 % CI]", "p (paired t / sign flip)"]
        rows = []
        for s in members:
            n = a.summaries[s].get("macro_f1", stats.Summary(0, *[math.nan] * 4)).n
            row = [s, f"{100 * a.fractions[s]:g} %", str(n), _cell(a, s, "macro_f1")]
            rows.append(row + (list(_diff_cells(a, s, ref)) if ref else []))
        lines += [f"**{title}**", ""] + _table(head, rows)

    lines += ["## Per setting", "", "mean ± std [95 % t-interval] over seeds (ᵇ: one run, bootstrap interval).", ""]
    lines += _table(["Setting", "Seeds"] + [label for _, label in HEADLINE],
                    [[s, str(sum(r.setting == s and r.status == "done" for r in sw.runs))]
                     + [_cell(a, s, m) for m, _ in HEADLINE] for s in settings])

    if a.paired:
        lines += ["## Paired differences", "",
                  "Setting minus reference over the seed indices both finished with the same seeds: mean "
                  "difference [95 % t-interval] (n), then p of the paired t-test / exact sign-flip test.", ""]
        rows = [[s, ref] + [" ; ".join(_diff_cells(a, s, ref, m)) for m, _ in HEADLINE] for s, ref in a.paired]
        lines += _table(["Setting", "Reference"] + [label for _, label in HEADLINE], rows)

    if a.bootstrap:
        lines += ["## Single runs: bootstrap over test studies", "",
                  f"Percentile intervals from B = {a.resamples} resamples of the studies (seed {a.seed}); R@k "
                  "resamples the query images against the full gallery.", ""]
        rows = [[s, str(next(iter(per.values())).n)] + [
            f"{_pct(per[m].estimate)} [{_pct(per[m].ci_low)}, {_pct(per[m].ci_high)}]" if m in per else "n/a"
            for m, _ in HEADLINE] for s, per in a.bootstrap.items()]
        lines += _table(["Setting", "Studies"] + [label for _, label in HEADLINE], rows)

    if a.decompositions:
        lines += ["## Variance decomposition", "",
                  "Sample variances (ddof=1) over seeds of grids that vary only the init seed, only the data-order "
                  "seed, or both, in points² with 95 % chi-square intervals. With deterministic runs the first two "
                  "should add up to the third.", ""]
        rows = []
        for names, per in a.decompositions:
            for m in ("macro_f1", "macro_auroc"):
                d = per[m]
                cells = [f"{_sq(v.variance)} [{_sq(v.ci_low)}, {_sq(v.ci_high)}] (n={v.n})"
                         for v in (d.init, d.data, d.both)]
                rows.append([" / ".join(names), dict(HEADLINE)[m]] + cells + [
                    _sq(d.total), "n/a" if math.isnan(d.ratio) else f"{d.ratio:.2f}",
                    "n/a" if math.isnan(d.init_share) else f"{100 * d.init_share:.0f} %"])
        lines += _table(["Grids (init / data / both)", "Metric", "Init", "Data order", "Both", "Init + data",
                         "(Init + data) / both", "Init share"], rows)

    lines += ["## Per-finding F1 (%)", "", "mean ± std over seeds; n/a: the finding has no positive or no negative "
              "test study.", ""]
    rows = []
    for f in FINDINGS:
        cells = []
        for s in settings:
            summ = a.summaries[s].get(f"f1/{f}")
            cells.append("n/a" if summ is None else (f"{_pct(summ.mean, 1)} ± {_pct(summ.std, 1)}" if summ.n >= 2
                                                     else _pct(summ.mean, 1)))
        rows.append([f] + cells)
    lines += _table(["Finding"] + settings, rows)

    missing = [r for r in sw.runs if r.status != "done"]
    lines += ["## Runs not finished or left out", ""]
    lines += ([f"- {r.setting} seed_{r.seed_index}: {r.status}" for r in missing] or ["None."]) + [""]
    lines += ["## Reproducibility", "",
              f"{a.checked} of {len(done)} finished runs have a predictions file; metrics recomputed from it "
              + ("equal results.json for all of them." if not a.checks else "differ from results.json for: "
                 + "; ".join(a.checks) + "."), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _sq(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{1e4 * x:.3g}"


# ------------------------------------------------------------------------------------------------
# Entry point


def write_report(workdir: str | pathlib.Path, *, resamples: int = 1000, seed: int = 0) -> dict[str, pathlib.Path]:
    """Writes DIR/report.md, report.csv and the PNG plots (module docstring); returns their paths."""
    sweep = load_sweep(workdir)
    a = analyse(sweep, resamples=resamples, seed=seed)
    root = sweep.root
    out = {}
    if any(a.values[s].get("macro_f1") for s in sweep.settings):
        out["macro_f1.png"] = plots.plot_macro_f1(a, root / "macro_f1.png")
        out["per_finding_f1.png"] = plots.plot_per_finding(a, root / "per_finding_f1.png")
        if a.scaling:
            out["data_scaling.png"] = plots.plot_data_scaling(a, root / "data_scaling.png")
    for name, text in (("report.csv", format_csv(csv_rows(a))), ("report.md", format_markdown(a, list(out)))):
        path = root / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        out[name] = path
    return out


def main(workdir: str, resamples: int = 1000, seed: int = 0) -> None:
    """`python -m vljax.sweep report --workdir=DIR`: writes the report and prints what it wrote; a
    one-line error for a directory that holds no sweep."""
    try:
        paths = write_report(workdir, resamples=resamples, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for path in paths.values():
        print(path)
