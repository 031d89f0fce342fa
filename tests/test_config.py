"""configs/merlin.py: its arguments, the backend-dependent phantom geometry, the `tiny` variant and
`--config.*` overrides through absl."""

from __future__ import annotations

import re

from absl import flags
import jax
import pytest
from ml_collections import config_flags

from configs import merlin
from vljax import run_files
from tests.runs import CONFIG_PATH


def test_config_argument_parsing():
    assert merlin.parse_arg("phantom,seed=3,steps=10") == {"phantom": True, "seed": 3, "steps": 10}
    assert merlin.parse_arg("") == {}
    c = merlin.get_config("phantom,seed=3,batch=16")
    assert c.seed == 3 and c.batch_size == 16 and c.data.phantom
    full = merlin.get_config()
    assert full.model.image.depth == 152 and tuple(full.data.shape) == (224, 224, 160)
    assert tuple(full.data.spacing) == (1.5, 1.5, 3.0) and not full.data.phantom
    with pytest.raises(ValueError, match="unknown argument 'phantm'"):
        merlin.get_config("phantm")
    with pytest.raises(ValueError, match="not a valid int"):
        merlin.get_config("seed=x")
    with pytest.raises(ValueError, match="needs a value"):
        merlin.get_config("seed")
    c = merlin.get_config("phantom,sampling=balanced,balance_ratio=0.25,train_fraction=0.4,subset_seed=2")
    assert (c.data.sampling, c.data.balance_ratio, c.data.train_fraction, c.subset_seed) == ("balanced", 0.25, 0.4, 2)
    with pytest.raises(ValueError, match="sampling='stratified'"):
        merlin.get_config("sampling=stratified")


def test_phantom_geometry_follows_the_backend_unless_given(monkeypatch):
    assert merlin.resolve_geometry("auto", "cpu") == "cpu"
    assert merlin.resolve_geometry("auto", "gpu") == merlin.resolve_geometry("auto", "tpu") == "accelerator"
    assert merlin.resolve_geometry("cpu", "gpu") == "cpu" and merlin.resolve_geometry("accelerator", "cpu") == "accelerator"
    with pytest.raises(ValueError, match="geometry='gpu'"):
        merlin.resolve_geometry("gpu", "gpu")

    cpu = merlin.get_config("phantom")  # the tests' backend is CPU (conftest.py)
    assert (cpu.data.geometry, cpu.data.geometry_backend) == ("cpu", "cpu")
    explicit_cpu = merlin.get_config("phantom,geometry=cpu").to_dict()
    assert explicit_cpu["data"]["geometry_backend"] is None
    cpu_dict = cpu.to_dict()
    cpu_dict["data"]["geometry_backend"] = None
    assert cpu_dict == explicit_cpu  # auto on CPU is exactly the CPU recipe of _phantom

    def accelerator_values(c):
        assert tuple(c.data.spacing) == (6.0, 6.0, 8.0) and tuple(c.data.shape) == (72, 72, 48)
        assert c.total_steps == 12000 and c.model.image.width == 32 and c.eval_batch_size == 32
        assert c.total_steps > cpu.total_steps and c.model.image.width > cpu.model.image.width
        assert c.data.phantom and c.model.image.depth == cpu.model.image.depth and c.batch_size == cpu.batch_size

    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        acc = merlin.get_config("phantom")
        assert (acc.data.geometry, acc.data.geometry_backend) == ("accelerator", backend)
        accelerator_values(acc)
        assert run_files.config_json(acc)["data"]["geometry"] == "accelerator"  # what config.json holds
        assert merlin.get_config("phantom,geometry=cpu").to_dict() == explicit_cpu
    assert merlin.get_config("phantom,geometry=accelerator,steps=10").total_steps == 10

    def no_backend():
        raise AssertionError("an explicit geometry must not query (and so initialise) the backend")

    monkeypatch.setattr(jax, "default_backend", no_backend)
    explicit = merlin.get_config("phantom,geometry=accelerator")
    assert (explicit.data.geometry, explicit.data.geometry_backend) == ("accelerator", None)
    accelerator_values(explicit)
    full = merlin.get_config()  # the real-data recipe: Merlin's geometry, no backend query
    assert (full.data.geometry, full.data.geometry_backend) == ("merlin", None)
    with pytest.raises(ValueError, match="phantom default only"):
        merlin.get_config("geometry=accelerator")
    with pytest.raises(ValueError, match=r"geometry='gpu'; choose one of \['auto', 'cpu', 'accelerator'\]"):
        merlin.get_config("phantom,geometry=gpu")


def _parse_flags(*argv):
    fv = flags.FlagValues()
    # config_flags registers the `--config.*` override flags from sys_argv at definition time.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config


def test_config_flag_overrides_and_unknown_keys():
    c = _parse_flags(f"--config={CONFIG_PATH}:phantom,seed=2", "--config.optim.lr=0.125",
                     "--config.data.dir=/some/where")
    assert c.seed == 2 and c.optim.lr == 0.125 and c.data.dir == "/some/where"
    with pytest.raises(Exception, match="nope"):
        _parse_flags(f"--config={CONFIG_PATH}:phantom", "--config.optim.nope=1")
    with pytest.raises(Exception, match="lr"):
        _parse_flags(f"--config={CONFIG_PATH}", "--config.optim.lr=fast")
    with pytest.raises(Exception, match="phantm"):
        _parse_flags(f"--config={CONFIG_PATH}:phantm")
    assert _parse_flags(f"--config={CONFIG_PATH}:phantom,geometry=accelerator").data.geometry == "accelerator"
    with pytest.raises(Exception, match="geometry='fast'"):
        _parse_flags(f"--config={CONFIG_PATH}:phantom,geometry=fast")
    with pytest.raises(AttributeError):  # configs are locked: no new fields by mistake
        c.optim.new_field = 1


def test_tiny_is_a_small_phantom_run_with_its_own_geometry():
    c = merlin.get_config("tiny")
    assert c.data.phantom and c.data.phantom_studies == 64 and c.data.geometry == "tiny"
    assert (c.model.image.width, c.model.text.size, c.model.text.init, c.total_steps) == (4, "tiny", "scratch", 20)
    assert merlin.get_config("tiny,seed=3").seed == 3
    with pytest.raises(ValueError, match="tiny has its own geometry"):
        merlin.get_config("tiny,geometry=accelerator")


# --------------------------------------------------------------------------------------------------
# Command-line and set-up mistakes: one line, before any work
# --------------------------------------------------------------------------------------------------
_CLI_CASES = {
    "unknown field": (["--config.foo=1"], r"^error: unknown config field --config\.foo: config has no field 'foo'"),
    "unknown nested field": (["--config.data.foo.bar=1"],
                             r"^error: unknown config field --config\.data\.foo\.bar: config\.data has no field 'foo'"),
    "bad value": (["--config.optim.lr=abc"], r"^error: flag --config\.optim\.lr=abc: could not convert"),
    "given twice": (["--config.data.shape=8,8,8", "--config.data.shape=4,4,4"],
                    r"^error: flag --config\.data\.shape is given twice \(--config\.data\.shape=8,8,8 and "),
    "missing config file": (None, r"^error: --config: there is no config file 'configs/nope\.py'"),
    "bad config argument": ("bogus", r"^error: configs/merlin\.py: unknown argument 'bogus'"),
}


@pytest.mark.parametrize("name", list(_CLI_CASES))
def test_command_line_mistakes_end_in_one_line_without_a_traceback(name, capsys, monkeypatch):
    """`cli.parse_flags`, the commands' flag parser, on the trainer's flags in a private registry (the
    `--config.*` override flags are defined from the argv, as in a new process)."""
    import pathlib

    from vljax import cli

    extra, pattern = _CLI_CASES[name]
    monkeypatch.chdir(pathlib.Path(CONFIG_PATH).parents[1])
    argv = ["vljax.train", *_cli_args(extra), "--workdir=/tmp/unused"]
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config", flag_values=registry, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory", flag_values=registry)
    with pytest.raises(SystemExit) as stop:
        cli.parse_flags(argv, registry)
        registry["config"].value  # noqa: B018 - the config is built (its overrides applied) when first read
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert re.match(pattern, err.splitlines()[0]), (name, err)


def _cli_args(extra) -> list[str]:
    config = ("--config=configs/nope.py" if extra is None else
              "--config=configs/merlin.py:bogus" if extra == "bogus" else "--config=configs/merlin.py:tiny")
    return [config, *([] if extra in (None, "bogus") else extra)]


def test_the_trainer_command_says_a_mistake_in_one_line_and_starts_nothing(tmp_path):
    """The wiring of `cli.parse_flags` into `python -m vljax.train`: exit 2, one line, no workdir."""
    import pathlib
    import subprocess
    import sys

    extra, pattern = _CLI_CASES["unknown nested field"]
    proc = subprocess.run([sys.executable, "-m", "vljax.train", *_cli_args(extra), f"--workdir={tmp_path / 'run'}"],
                          cwd=pathlib.Path(CONFIG_PATH).parents[1], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("I", "W"))]  # absl's INFO/WARNING lines
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.match(pattern, lines[0]), lines
    assert not (tmp_path / "run").exists()


def test_workdir_that_cannot_be_used_is_named(tmp_path, monkeypatch):
    import pathlib

    from vljax import train

    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"--workdir .*a_file/run cannot be a directory: .*a_file is a file"):
        train._make_workdir(tmp_path / "a_file" / "run")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    with pytest.raises(ValueError, match=r"--workdir .*/run is not writable by this user"):
        train._make_workdir(tmp_path / "run")


@pytest.mark.parametrize("field, value, error", [
    ("data.shape", (8, 8), r"config\.data\.shape must have 3 entries, got 2"),
    ("model.image.init", "torchvision:/nonexistent/resnet.safetensors",
     r"config\.model\.image\.init: /nonexistent/resnet\.safetensors does not exist"),
    ("model.dtype", "float8", r"config\.model\.dtype='float8'"),
    ("data.on_error", "ignore", r"config\.data\.on_error='ignore'"),
    ("data.cache", "/nonexistent/cache", r"volume cache /nonexistent/cache does not exist; build it with "
                                         r"`python tools/preprocess.py"),
    ("resume", "always", r"config\.resume='always'"),
    ("mesh.fsdp", 3, r"config\.mesh data=-1 x fsdp=3 does not divide the 8 devices"),
    ("model.image.bn_stats", "sync", r"config\.model\.image\.bn_stats='sync'"),
])
def test_config_errors_stop_before_the_phantom_or_the_model(tmp_path, field, value, error):
    from vljax import train

    config = merlin.get_config("tiny")
    *parents, key = field.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[key] = value
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "phantom").exists()
