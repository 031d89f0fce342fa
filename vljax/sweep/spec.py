"""Sweep specifications: a grid of training runs (settings x seeds) over one base config.

A sweep module (e.g. `configs/sweeps/batch_composition.py`) has `get_sweep(arg) -> Sweep`, chosen on
the command line as `--sweep=configs/sweeps/batch_composition.py:phantom,seeds=3`. Each run of the grid
is the base config (`Sweep.config`, e.g. `configs/merlin.py:phantom`) with its setting's overrides,
the sweep-wide overrides (`--set key=value`) and the seeds of its seed index (`seeds_for`).

A run reaches `python -m vljax.train` as `--config=PATH:ARGS` (the config module's own arguments:
`seed=`, `sampling=`, ...) plus `--config.key=value` flags for the other fields (`trainer_flags`);
`build_config` parses exactly those flags with `config_flags`, as the trainer does, so the config a
child trains with is the one built here. `sweep.json` (`manifest`) describes the grid for `report`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import re
from typing import Any, Mapping, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SEED_KEYS = ("seed", "data_seed", "subset_seed")
# Which seeds a seed index moves (`seeds_for`): all three, only the initialisation, only the data order.
VARY = ("all", "init", "data")
# Config fields that configs/merlin.py also takes as arguments after ':' (its ARGS), so a child's
# --config reads like the README's commands (`configs/merlin.py:phantom,sampling=random,seed=1`).
CONFIG_ARGS = {"seed": "seed", "data_seed": "data_seed", "subset_seed": "subset_seed", "total_steps": "steps",
               "batch_size": "batch", "data.sampling": "sampling", "data.balance_ratio": "balance_ratio",
               "data.train_fraction": "train_fraction"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RESERVED_NAMES = ("phantom",)  # DIR/phantom holds the sweep's shared phantom dataset


class SweepError(ValueError):
    """A sweep that cannot run as specified; the message says what to change."""


def seeds_for(vary: str, k: int) -> dict[str, int]:
    """Seed index k -> the run's explicit seeds.

    all:  seed = data_seed = subset_seed = k (index 0 is the base config's own seeds 0, 0, 0);
    init: seed = k + 1, data_seed = subset_seed = 0 (only initialisation and dropout vary);
    data: data_seed = k + 1, seed = subset_seed = 0 (only the order of the training batches varies).
    The + 1 keeps the one-factor grids off the `all` grid's diagonal: no run of one repeats another's.
    """
    if vary == "all":
        return {"seed": k, "data_seed": k, "subset_seed": k}
    if vary == "init":
        return {"seed": k + 1, "data_seed": 0, "subset_seed": 0}
    if vary == "data":
        return {"seed": 0, "data_seed": k + 1, "subset_seed": 0}
    raise SweepError(f"vary={vary!r}; choose one of {list(VARY)}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One grid entry: a setting at one seed index."""
    setting: str
    seed_index: int
    seeds: Mapping[str, int]
    overrides: Mapping[str, Any]  # dotted config key -> value (the setting's, then the sweep-wide ones)

    @property
    def workdir(self) -> str:
        return f"{self.setting}/seed_{self.seed_index}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid: every setting x seed indices 0..seeds-1, over the base config `config`.

    settings:      setting name -> {dotted config key: value}; names are directory names.
    baseline:      the setting others are compared with (paired by seed index), or None.
    comparisons:   more paired differences, setting -> reference setting (e.g. each balanced ratio
                   against the alternating schedule it runs on: the difference a class ratio alone makes).
    decomposition: {"init_only": [...], "data_only": [...], "both": [...]} setting names whose seeds
                   vary only the initialisation, only the data order, or both (variance decomposition).
    vary:          setting -> "init" | "data" (default "all": `seeds_for`).
    overrides:     applied to every run after the setting's (`--set key=value` adds here).
    required:      override keys the user must give (the full recipe's data.dir).
    spec:          the --sweep string that made it (set by `load_sweep`).
    """
    name: str
    config: str
    settings: Mapping[str, Mapping[str, Any]]
    seeds: int = 3
    baseline: str | None = None
    comparisons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    decomposition: Mapping[str, Sequence[str]] | None = None
    vary: Mapping[str, str] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    spec: str = ""

    def __post_init__(self):
        if not self.settings:
            raise SweepError(f"sweep {self.name}: no settings")
        for name, overrides in self.settings.items():
            if not _NAME.match(name) or name in RESERVED_NAMES:
                raise SweepError(f"sweep {self.name}: setting name {name!r} is not a plain directory name "
                                 f"(letters, digits, _ . + -; not {', '.join(RESERVED_NAMES)})")
            seeded = sorted(set(overrides) & set(SEED_KEYS))
            if seeded:
                raise SweepError(f"sweep {self.name}: setting {name!r} sets {seeded}; seeds come from the "
                                 "seed index (spec.seeds_for), use `vary` to choose which ones move")
        if self.seeds < 1:
            raise SweepError(f"sweep {self.name}: seeds={self.seeds}; at least 1")
        if self.baseline is not None and self.baseline not in self.settings:
            raise SweepError(f"sweep {self.name}: baseline {self.baseline!r} is not a setting "
                             f"({sorted(self.settings)})")
        for name, ref in self.comparisons.items():
            if name not in self.settings or ref not in self.settings or name == ref:
                raise SweepError(f"sweep {self.name}: comparison {name!r} - {ref!r} needs two different "
                                 f"settings ({sorted(self.settings)})")
        for name, vary in self.vary.items():
            if name not in self.settings or vary not in VARY:
                raise SweepError(f"sweep {self.name}: vary[{name!r}] = {vary!r}: needs a setting and one of {VARY}")
        for kind, names in (self.decomposition or {}).items():
            if kind not in ("init_only", "data_only", "both"):
                raise SweepError(f"sweep {self.name}: decomposition kind {kind!r}; use init_only, data_only, both")
            want = {"init_only": "init", "data_only": "data", "both": "all"}[kind]
            for name in names:
                if name not in self.settings or self.vary.get(name, "all") != want:
                    raise SweepError(f"sweep {self.name}: decomposition {kind} lists {name!r}, which is not "
                                     f"a setting with vary={want!r}")
        clash = sorted(k for k in self.overrides if k in SEED_KEYS or
                       any(k in s for s in self.settings.values()))
        if clash:
            raise SweepError(f"sweep {self.name}: --set {', '.join(clash)} would override what the grid "
                             "varies (its settings or seeds); change the sweep spec instead")

    def with_overrides(self, extra: Mapping[str, Any]) -> Sweep:
        return dataclasses.replace(self, overrides={**self.overrides, **extra})

    def runs(self) -> list[Run]:
        """Every grid entry, setting by setting in the spec's order, seed index by seed index."""
        missing = [k for k in self.required if k not in self.overrides]
        if missing:
            raise SweepError(f"sweep {self.name} needs " + " ".join(f"--set={k}=..." for k in missing) +
                             (" (e.g. --set=data.dir=/data/merlin)" if "data.dir" in missing else ""))
        return [Run(name, k, seeds_for(self.vary.get(name, "all"), k), {**overrides, **self.overrides})
                for name, overrides in self.settings.items() for k in range(self.seeds)]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def resolve_path(path: str) -> pathlib.Path:
    """A config or sweep file: as given (relative to the working directory), else in this repository."""
    p = pathlib.Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def _load_module(path: str, name: str):
    file = resolve_path(path)
    if not file.is_file():
        raise SweepError(f"there is no file {path!r} (relative to the working directory or {REPO_ROOT})")
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_set(items: Sequence[str]) -> dict[str, str]:
    """['data.dir=/data/merlin', 'optim.lr=1e-4'] -> {'data.dir': '/data/merlin', ...} (values stay
    the strings the trainer's --config.key=value flags will parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. --set=data.dir=/data/merlin")
        out[key] = value
    return out


def load_sweep(spec: str, overrides: Mapping[str, Any] | None = None) -> Sweep:
    """`configs/sweeps/batch_composition.py:ARG` -> its Sweep, with `overrides` for every run."""
    path, _, arg = spec.partition(":")
    module = _load_module(path, "vljax_sweep_spec")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} has no get_sweep(arg)")
    sweep = module.get_sweep(arg or None)
    return dataclasses.replace(sweep.with_overrides(overrides or {}), spec=spec)


VARIANTS = ("phantom", "smoke", "full")  # a sweep spec's size: the phantom default, the tiny config, the recipe


def variant_of(args: Mapping[str, Any], where: str) -> str:
    """The one of `VARIANTS` that a spec's parsed arguments name (default "phantom")."""
    chosen = [v for v in VARIANTS if args.get(v)]
    if len(chosen) > 1:
        raise SweepError(f"{where}: choose one of {', '.join(VARIANTS)} (got {chosen})")
    return chosen[0] if chosen else "phantom"


def parse_args(arg: str | None, kinds: Mapping[str, type], where: str) -> dict:
    """'phantom,seeds=3,settings=a+b' -> typed dict; bare names are booleans (or the key's default
    string ''), unknown keys and bad values raise SweepError naming the valid ones."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if key not in kinds:
            raise SweepError(f"{where}: unknown argument {key!r}; the arguments are {sorted(kinds)}")
        kind = kinds[key]
        if kind is bool:
            if sep:
                raise SweepError(f"{where}: argument {key!r} takes no value")
            out[key] = True
        elif kind is str and not sep:
            out[key] = ""
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise SweepError(f"{where}: argument {key}={value!r} is not a valid {kind.__name__}") from None
    return out


# --------------------------------------------------------------------------------------------------
# Configs of the runs
# --------------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as `config_flags` parses it back to the same value (and as a config argument)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"override value {value!r} is not finite")
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise SweepError(f"override value {value!r} ({type(value).__name__}) cannot be passed on a command line")


@functools.lru_cache(maxsize=8)
def _config_module_args(path: str) -> Mapping[str, type]:
    return getattr(_load_module(path, "vljax_sweep_config"), "ARGS", {})


def trainer_flags(sweep: Sweep, run: Run, config_path: str | None = None) -> list[str]:
    """The --config flags of `python -m vljax.train` for `run`: `--config=PATH:ARGS` with the config
    module's own arguments, then `--config.key=value` for the other overrides. `config_path` replaces
    the base config's path (e.g. by an absolute one)."""
    path, _, base_arg = sweep.config.partition(":")
    module_args = _config_module_args(path)
    args: dict[str, str | None] = {}
    for item in filter(None, (s.strip() for s in base_arg.split(","))):
        key, sep, value = item.partition("=")
        args[key.strip()] = value.strip() if sep else None
    extra = []
    for key, value in {**run.overrides, **run.seeds}.items():
        text = format_value(value)
        arg = CONFIG_ARGS.get(key)
        if arg in module_args and "," not in text:
            args[arg] = text
        else:
            extra.append(f"--config.{key}={text}")
    arg_text = ",".join(k if v is None else f"{k}={v}" for k, v in args.items())
    return [f"--config={config_path or path}" + (f":{arg_text}" if arg_text else ""), *extra]


def build_config(config_flag_args: Sequence[str]) -> ml_collections.ConfigDict:
    """The config that `python -m vljax.train` builds from these --config flags: the same parser
    (`config_flags`, locked) on a private flag registry."""
    argv = ["vljax.sweep", *config_flag_args]
    registry = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "training config", flag_values=registry,
                                             lock_config=True, sys_argv=argv)
    registry(argv)
    return holder.value


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def run_configs(sweep: Sweep, runs: Sequence[Run]) -> list[ml_collections.ConfigDict]:
    """Every run's config (built from its trainer flags, config path resolved), checked distinct."""
    path = str(resolve_path(sweep.config.partition(":")[0]))
    configs = []
    for run in runs:
        try:
            configs.append(build_config(trainer_flags(sweep, run, path)))
        except Exception as e:  # noqa: BLE001 - any config error, said in one line with the run
            why = _why(e)
            raise SweepError(f"sweep {sweep.name}: the config of {run.workdir} cannot be built: {why} "
                             f"(flags: {' '.join(trainer_flags(sweep, run))})") from e
    check_distinct(runs, configs)
    return configs


def check_distinct(runs: Sequence[Run], configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Refuses a grid in which two entries are the same training run (same resolved config)."""
    seen: dict[str, Run] = {}
    same = []
    for run, config in zip(runs, configs):
        key = config.to_json(sort_keys=True)
        if key in seen:
            same.append(f"{seen[key].workdir} = {run.workdir}")
        else:
            seen[key] = run
    if same:
        raise SweepError("these grid entries are the same training run and would run twice: "
                         f"{'; '.join(same)}. Make the settings differ (or drop one; e.g. 100 % data is "
                         "`alternating` itself), and do not --set what the grid varies")


def _why(e: BaseException) -> str:
    chain, inner = [], e
    while inner is not None and len(chain) < 10:
        chain.append(inner)
        inner = inner.__cause__ or inner.__context__
    missing = [x for x in chain if isinstance(x, (KeyError, AttributeError))]
    if missing:  # the innermost names the field; an outer one may suggest a spelling
        names = re.findall(r"'([A-Za-z_]\w*)'", str(missing[-1]))
        hint = re.search(r'Did you mean "([^"]+)"', " ".join(map(str, missing)))
        if names:
            return f"the config has no field {names[0]!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def typed_overrides(run: Run, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run's overrides with the values its config holds (--set values arrive as strings)."""
    out = {}
    for key in run.overrides:
        value = functools.reduce(lambda node, field: node[field], key.split("."), config)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------------------------------
# sweep.json
# --------------------------------------------------------------------------------------------------
def manifest(sweep: Sweep, runs: Sequence[Run], configs: Sequence[ml_collections.ConfigDict]) -> dict:
    """DIR/sweep.json: what `report` reads. Each run's workdir is relative to DIR."""
    return {"name": sweep.name, "spec": sweep.spec, "baseline": sweep.baseline,
            "comparisons": dict(sweep.comparisons),
            "decomposition": ({k: list(v) for k, v in sweep.decomposition.items()}
                              if sweep.decomposition else None),
            "runs": [{"setting": r.setting, "seed_index": r.seed_index, "seeds": dict(r.seeds),
                      "overrides": typed_overrides(r, c), "workdir": r.workdir}
                     for r, c in zip(runs, configs)]}


# Fields of a run that may differ between two descriptions of the same run: where the data lives
# (the trainer itself resumes on moved data, checking the dataset's fingerprint).
MOVABLE_KEYS = ("data.dir",)


def _run_identity(entry: dict) -> dict:
    return {**entry, "overrides": {k: v for k, v in entry["overrides"].items() if k not in MOVABLE_KEYS}}


def write_manifest(directory: pathlib.Path, new: dict, log=print) -> None:
    """Writes DIR/sweep.json, or refuses when DIR holds another sweep: another name, or a run (same
    workdir) defined differently. Growing a sweep (more seeds or settings) is allowed and said."""
    path = pathlib.Path(directory) / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("name") != new["name"]:
            raise SweepError(f"{directory} holds sweep {old.get('name')!r} ({old.get('spec')}), not "
                             f"{new['name']!r} ({new['spec']}); choose another --workdir")
        old_runs = {r["workdir"]: _run_identity(r) for r in old.get("runs", [])}
        changed = [r["workdir"] for r in new["runs"]
                   if r["workdir"] in old_runs and old_runs[r["workdir"]] != _run_identity(r)]
        if changed:
            raise SweepError(f"{directory} holds sweep {old['name']!r} ({old.get('spec')}) whose runs "
                             f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} are defined "
                             f"differently from {new['spec']}'s; choose another --workdir")
        if old == new:
            return
        added = sorted(set(r["workdir"] for r in new["runs"]) - set(old_runs))
        dropped = sorted(set(old_runs) - set(r["workdir"] for r in new["runs"]))
        log(f"sweep.json: {old.get('spec')} -> {new['spec']}" + (f", {len(added)} runs added" if added else "") +
            (f", {len(dropped)} runs no longer in the grid (left on disk): {', '.join(dropped)}" if dropped else ""))
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("sweep.json.tmp")
    tmp.write_text(json.dumps(new, indent=2, allow_nan=False))
    tmp.replace(path)
