"""vljax.sweep.spec and configs/sweeps/batch_composition.py: the grid, the seed mapping, the configs
the runs get (built the way the trainer builds them), duplicates, and sweep.json."""

from __future__ import annotations

import functools
import json

import pytest

from configs import merlin
from vljax.sweep import spec

BC = "configs/sweeps/batch_composition.py"
PUBLISHED = {
    "random": {"data.sampling": "random"},
    "alternating": {"data.sampling": "alternating"},
    "balanced_25_75": {"data.sampling": "balanced", "data.balance_ratio": 0.25},
    "balanced_50_50": {"data.sampling": "balanced", "data.balance_ratio": 0.5},
    "balanced_75_25": {"data.sampling": "balanced", "data.balance_ratio": 0.75},
    "fraction_20": {"data.sampling": "alternating", "data.train_fraction": 0.2},
    "fraction_40": {"data.sampling": "alternating", "data.train_fraction": 0.4},
}


def _get(config, key):
    return functools.reduce(lambda node, field: node[field], key.split("."), config)


def test_phantom_grid_is_the_published_study_times_seeds():
    sweep = spec.load_sweep(f"{BC}:phantom,seeds=3")
    runs = sweep.runs()
    assert sweep.name == "batch_composition_phantom" and sweep.config == "configs/merlin.py:phantom"
    assert dict(sweep.settings) == PUBLISHED and sweep.baseline == "random" and sweep.decomposition is None
    # Each balanced ratio is also paired with the alternating schedule it runs on.
    assert dict(sweep.comparisons) == {f"balanced_{r}": "alternating" for r in ("25_75", "50_50", "75_25")}
    assert spec.load_sweep(f"{BC}:phantom,settings=random+balanced_50_50").comparisons == {}
    assert [(r.setting, r.seed_index) for r in runs] == [(s, k) for s in PUBLISHED for k in range(3)]
    assert [r.workdir for r in runs[:2]] == ["random/seed_0", "random/seed_1"]
    configs = spec.run_configs(sweep, runs)
    for run, config in zip(runs, configs):
        assert dict(run.seeds) == {"seed": run.seed_index, "data_seed": run.seed_index,
                                   "subset_seed": run.seed_index}
        assert (config.seed, config.data_seed, config.subset_seed) == (run.seed_index,) * 3
        assert config.data.phantom and config.total_steps == merlin.get_config("phantom").total_steps
        for key, value in PUBLISHED[run.setting].items():
            assert _get(config, key) == value
        fraction = PUBLISHED[run.setting].get("data.train_fraction", 1.0)
        assert config.data.train_fraction == fraction
    # Seed index 0 of `alternating` is the recipe's own default run; 100 % data is that setting.
    assert spec.config_json(configs[3]) == spec.config_json(merlin.get_config("phantom"))
    assert spec.load_sweep(BC).seeds == 3  # phantom, 3 seeds by default


def test_smoke_and_full_variants():
    smoke = spec.load_sweep(f"{BC}:smoke")
    assert smoke.config == "configs/merlin.py:tiny" and list(smoke.settings) == ["random", "alternating"]
    assert len(smoke.runs()) == 4 and smoke.baseline == "random"
    full = spec.load_sweep(f"{BC}:full,seeds=2")
    with pytest.raises(spec.SweepError, match=r"needs --set=data.dir=\.\.\."):
        full.runs()
    full = spec.load_sweep(f"{BC}:full,seeds=2", spec.parse_set(["data.dir=/data/merlin"]))
    configs = spec.run_configs(full, full.runs())
    assert len(configs) == 14 and {c.data.dir for c in configs} == {"/data/merlin"}
    assert not configs[0].data.phantom and configs[0].model.image.depth == 152


@pytest.mark.parametrize("arg, message", [
    ("smoke,full", "choose one of phantom, smoke, full"),
    ("phantm", "unknown argument 'phantm'"),
    ("seeds=two", "not a valid int"),
    ("settings=random+fraction_100", r"\['fraction_100'\]: not settings of the grid"),
    ("decomposition=nope", "not settings of the grid"),
    ("seeds=0", "at least 1"),
])
def test_bad_sweep_arguments_say_what_is_wrong(arg, message):
    with pytest.raises(spec.SweepError, match=message):
        spec.load_sweep(f"{BC}:{arg}")


def test_decomposition_grids_vary_only_the_init_or_only_the_data_order_seed():
    sweep = spec.load_sweep(f"{BC}:phantom,settings=alternating,decomposition,seeds=3")
    assert sweep.decomposition == {"init_only": ["random_init_only"], "data_only": ["random_data_only"],
                                   "both": ["random"]}
    assert list(sweep.settings) == ["alternating", "random", "random_init_only", "random_data_only"]
    seeds = {}
    for run in sweep.runs():
        seeds.setdefault(run.setting, []).append(tuple(run.seeds[k] for k in spec.SEED_KEYS))
    assert seeds["random"] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert seeds["random_init_only"] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert seeds["random_data_only"] == [(0, 1, 0), (0, 2, 0), (0, 3, 0)]
    assert sweep.settings["random_init_only"] == sweep.settings["random_data_only"] == PUBLISHED["random"]
    configs = spec.run_configs(sweep, sweep.runs())  # no two entries are the same run
    assert len({c.to_json() for c in configs}) == 12


def test_identical_grid_entries_give_identical_configs():
    def build():
        sweep = spec.load_sweep(f"{BC}:phantom,seeds=2,decomposition", {"optim.lr": "3e-4"})
        return [c.to_json() for c in spec.run_configs(sweep, sweep.runs())]

    first, second = build(), build()
    assert first == second and len(set(first)) == len(first) == 18


def test_trainer_flags_build_what_get_config_and_assignments_build():
    """The child's flags against an independent construction: get_config(base) then each field set."""
    sweep = spec.load_sweep(f"{BC}:phantom,seeds=2",
                            {"data.shape": "(20, 20, 12)", "data.cache_volumes": "false", "optim.lr": "1e-4",
                             "data.dir": "/data/with, comma", "log_every": "7"})
    runs = sweep.runs()
    for run, config in zip(runs, spec.run_configs(sweep, runs)):
        want = merlin.get_config("phantom")
        for key, value in {**PUBLISHED[run.setting], **run.seeds}.items():
            parent, _, field = key.rpartition(".")
            (_get(want, parent) if parent else want)[field] = value
        want.data.update(shape=(20, 20, 12), cache_volumes=False, dir="/data/with, comma")
        want.optim.lr, want.log_every = 1e-4, 7
        assert spec.config_json(config) == spec.config_json(want), run.workdir
    flags = spec.trainer_flags(sweep, runs[2])
    assert flags[0] == "--config=configs/merlin.py:phantom,sampling=alternating,seed=0,data_seed=0,subset_seed=0"
    assert "--config.data.dir=/data/with, comma" in flags and "--config.data.shape=(20, 20, 12)" in flags


def test_two_settings_that_are_the_same_run_are_refused():
    sweep = spec.Sweep(name="dup", config="configs/merlin.py:tiny", seeds=2,
                       settings={"alternating": {"data.sampling": "alternating"},
                                 "fraction_100": {"data.sampling": "alternating", "data.train_fraction": 1.0}})
    with pytest.raises(spec.SweepError, match="alternating/seed_0 = fraction_100/seed_0; "
                                              "alternating/seed_1 = fraction_100/seed_1"):
        spec.run_configs(sweep, sweep.runs())
    with pytest.raises(spec.SweepError, match="--set seed would override what the grid varies"):
        spec.load_sweep(f"{BC}:smoke", {"seed": "1"})
    with pytest.raises(spec.SweepError, match="--set data.sampling would override"):
        spec.load_sweep(f"{BC}:smoke", {"data.sampling": "random"})
    with pytest.raises(spec.SweepError, match="seeds come from the seed index"):
        spec.Sweep(name="s", config="configs/merlin.py:tiny", settings={"a": {"seed": 3}})
    with pytest.raises(spec.SweepError, match="not a plain directory name"):
        spec.Sweep(name="s", config="configs/merlin.py:tiny", settings={"a/b": {}})
    with pytest.raises(spec.SweepError, match="comparison 'a' - 'b' needs two different settings"):
        spec.Sweep(name="s", config="configs/merlin.py:tiny", settings={"a": {}}, comparisons={"a": "b"})


def test_an_unknown_field_is_refused_naming_it():
    sweep = spec.load_sweep(f"{BC}:smoke", {"optim.lrr": "1e-3"})
    with pytest.raises(spec.SweepError, match=r"random/seed_0 cannot be built: the config has no field .lrr. \(did you mean .lr.\?\)"):
        spec.run_configs(sweep, sweep.runs())


def test_sweep_json_refuses_another_sweep_and_accepts_a_grown_one(tmp_path):
    def manifest(arg, **overrides):
        sweep = spec.load_sweep(f"{BC}:{arg}", overrides)
        runs = sweep.runs()
        return spec.manifest(sweep, runs, spec.run_configs(sweep, runs))

    first = manifest("smoke", **{"data.dir": "/a"})
    spec.write_manifest(tmp_path, first)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved == first and set(saved) == {"name", "spec", "baseline", "comparisons", "decomposition",
                                                  "runs"}
    assert saved["runs"][0] == {"setting": "random", "seed_index": 0,
                                "seeds": {"seed": 0, "data_seed": 0, "subset_seed": 0},
                                "overrides": {"data.sampling": "random", "data.dir": "/a"}, "workdir": "random/seed_0"}
    with pytest.raises(spec.SweepError, match="holds sweep 'batch_composition_smoke'.*not 'batch_composition_phantom'"):
        spec.write_manifest(tmp_path, manifest("phantom"))
    with pytest.raises(spec.SweepError, match="runs random/seed_0, random/seed_1, alternating/seed_0, "
                                              "alternating/seed_1 are defined differently"):
        spec.write_manifest(tmp_path, manifest("smoke", total_steps=5))
    messages = []
    spec.write_manifest(tmp_path, manifest("smoke,seeds=3", **{"data.dir": "/moved"}), log=messages.append)
    assert messages == ["sweep.json: configs/sweeps/batch_composition.py:smoke -> "
                        "configs/sweeps/batch_composition.py:smoke,seeds=3, 2 runs added"]
    assert len(json.loads((tmp_path / "sweep.json").read_text())["runs"]) == 6
