r"""The batch-composition study as a seed sweep: sampling strategy and data fraction x N seeds.

  python -m vljax.sweep run --sweep=configs/sweeps/batch_composition.py:phantom,seeds=3 \
      --workdir=/tmp/sweeps/batch_composition
  python -m vljax.sweep report --workdir=/tmp/sweeps/batch_composition

The published grid (settings; every one on the same steps and learning-rate schedule):

  random                 full reports, random order
  alternating            Merlin's full-report / organ-section alternation (the data-fraction 100 % point)
  balanced_25_75         balanced on the alternating schedule, 25 % normal : 75 % abnormal per batch
  balanced_50_50         ... 50:50
  balanced_75_25         ... 75:25
  fraction_20            alternating on a seeded 20 % subset of the training split
  fraction_40            ... 40 %

100 % data is `alternating` itself (no `fraction_100` run: it would be the same run twice).
The baseline for paired differences is `random`. Each balanced ratio is also paired with `alternating`,
the schedule it runs on: that difference is the class ratio's alone (same steps, learning-rate and
alternation schedule, same seeds), and it is the published study's comparison (its unbalanced
baseline is the Merlin reproduction, which alternates). Seed index k sets seed = data_seed = subset_seed = k
(`vljax.sweep.spec.seeds_for`), so seed index 0 of `alternating` is the recipe's own default run.

Arguments after ':' (comma-separated):
  phantom          (default) `configs/merlin.py:phantom`, sized for 2 CPU cores: about 15 minutes per run
                   alone (a run of the phantom default takes 15 min 23 s - 15 min 51 s with its 1.5-minute
                   phantom generation; a sweep generates the phantom once, in DIR/phantom). 7 settings x 3
                   seeds = 21 runs, about 5 h 15 min with --parallel=1 (a second run in parallel on 2 cores
                   only halves each one's speed).
  smoke            `configs/merlin.py:tiny` (64-study phantom, 20 steps), settings random and alternating x 2
                   seeds: the machinery end to end; its numbers mean nothing. Measured: 3 min 38 s wall with
                   --parallel=2 on 2 cores that other test runs were loading (load average 9; each run
                   1:45-1:49), then `report` 2 s.
  full             the full-scale Merlin recipe `configs/merlin.py`; needs --set=data.dir=/data/merlin.
  seeds=N          seed indices 0..N-1 (default 3; smoke 2).
  settings=A+B     only these settings of the grid above (e.g. settings=random+balanced_50_50).
  decomposition    variance decomposition for the baseline (random): adds `random_init_only` (only the
                   init seed varies: seed = k + 1, data_seed = subset_seed = 0) and `random_data_only`
                   (only the data-order seed varies: data_seed = k + 1, seed = subset_seed = 0); `random`
                   itself is the "both" grid. `decomposition=alternating+random` names the settings.
                   Each decomposed setting adds 2 x seeds runs (phantom: 6 runs, about 1.5 h, at seeds=3).

Any config field can be set for every run with --set=KEY=VALUE (e.g. --set=data.dir=/data/merlin,
--set=total_steps=2000), except what the grid varies.
"""

from __future__ import annotations

from vljax.sweep.spec import Sweep, SweepError, parse_args, variant_of

ARGS = {"phantom": bool, "smoke": bool, "full": bool, "seeds": int, "settings": str, "decomposition": str}

SETTINGS = {
    "random": {"data.sampling": "random"},
    "alternating": {"data.sampling": "alternating"},
    "balanced_25_75": {"data.sampling": "balanced", "data.balance_ratio": 0.25},
    "balanced_50_50": {"data.sampling": "balanced", "data.balance_ratio": 0.5},
    "balanced_75_25": {"data.sampling": "balanced", "data.balance_ratio": 0.75},
    "fraction_20": {"data.sampling": "alternating", "data.train_fraction": 0.2},
    "fraction_40": {"data.sampling": "alternating", "data.train_fraction": 0.4},
}
BASELINE = "random"
COMPARISONS = {"balanced_25_75": "alternating", "balanced_50_50": "alternating", "balanced_75_25": "alternating"}
SMOKE_SETTINGS = ("random", "alternating")


def _names(text: str, default: tuple[str, ...], what: str) -> list[str]:
    names = [n for n in text.split("+") if n] if text else list(default)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SweepError(f"configs/sweeps/batch_composition.py: {what} {unknown}: not settings of the grid "
                         f"({', '.join(SETTINGS)})")
    return list(dict.fromkeys(names))


def get_sweep(arg: str | None = None) -> Sweep:
    args = parse_args(arg, ARGS, "configs/sweeps/batch_composition.py")
    variant = variant_of(args, "configs/sweeps/batch_composition.py")
    config = {"phantom": "configs/merlin.py:phantom", "smoke": "configs/merlin.py:tiny",
              "full": "configs/merlin.py"}[variant]
    default = SMOKE_SETTINGS if variant == "smoke" else tuple(SETTINGS)
    names = _names(args.get("settings", ""), default, "settings")
    settings = {n: SETTINGS[n] for n in names}

    vary, decomposition = {}, None
    if "decomposition" in args:
        decomposed = _names(args["decomposition"], (BASELINE,), "decomposition")
        decomposition = {"init_only": [], "data_only": [], "both": []}
        for name in decomposed:
            settings.setdefault(name, SETTINGS[name])
            for kind, how in (("init_only", "init"), ("data_only", "data")):
                settings[f"{name}_{kind}"] = SETTINGS[name]
                vary[f"{name}_{kind}"] = how
                decomposition[kind].append(f"{name}_{kind}")
            decomposition["both"].append(name)
    return Sweep(name=f"batch_composition_{variant}", config=config, settings=settings,
                 seeds=args.get("seeds", 2 if variant == "smoke" else 3),
                 baseline=BASELINE if BASELINE in settings else None,
                 comparisons={s: r for s, r in COMPARISONS.items() if s in settings and r in settings},
                 decomposition=decomposition, vary=vary,
                 required=("data.dir",) if variant == "full" else ())
