"""Flags shared by the commands (`vljax.train`, `vljax.evaluate`, `vljax.diagnose`).

absl keeps one flag registry per process, so a flag that several commands take is defined here, once,
whichever command module is imported first; each command reads it through the holder it gets back.
`parse_flags` is the commands' flag parser: command-line mistakes end in one line, not a traceback.
"""

from __future__ import annotations

import os
import sys

from absl import flags


def _once(define, name: str, *args, **kwargs) -> flags.FlagHolder:
    if name in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return define(name, *args, **kwargs)


def workdir() -> flags.FlagHolder:
    return _once(flags.DEFINE_string, "workdir", None, "run directory (checkpoints, logs, results)")


def split() -> flags.FlagHolder:
    return _once(flags.DEFINE_enum, "split", "test", ["train", "val", "test"], "split to evaluate")


def step() -> flags.FlagHolder:
    return _once(flags.DEFINE_integer, "step", -1, "checkpoint step (-1: the latest)")


def data_dir() -> flags.FlagHolder:
    return _once(flags.DEFINE_string, "data_dir", None, "override config.data.dir (data moved since training)")


def initialize_distributed(timeout_s: int) -> None:
    """`jax.distributed.initialize()` for `--distributed`, before any other JAX call.

    The process geometry comes from VLJAX_NUM_PROCESSES / VLJAX_PROCESS_ID when set (tools/launch_local.py
    and hand-written launchers set them, with JAX_COORDINATOR_ADDRESS), else from jax's own cluster
    detection (TPU pods, SLURM, Open MPI). When the job is not complete within `timeout_s` (a peer not
    started, a wrong address or count), jax aborts the process from C++ with a gRPC status and a stack
    dump; a timer a little earlier says instead, in one line, which process gave up and what to check,
    and exits with status 1. Processes other than 0 then log warnings and errors only: process 0 alone
    writes the run's log.
    """
    import threading

    import jax
    from absl import logging

    env = os.environ
    geometry = {}
    if "VLJAX_NUM_PROCESSES" in env or "VLJAX_PROCESS_ID" in env:
        try:
            geometry = dict(num_processes=int(env["VLJAX_NUM_PROCESSES"]), process_id=int(env["VLJAX_PROCESS_ID"]))
        except (KeyError, ValueError):
            raise ValueError("--distributed: set both VLJAX_NUM_PROCESSES and VLJAX_PROCESS_ID to integers (got "
                             f"{env.get('VLJAX_NUM_PROCESSES')!r}, {env.get('VLJAX_PROCESS_ID')!r})") from None
    who = f"process {geometry['process_id']} of {geometry['num_processes']}" if geometry else "this process"
    coordinator = env.get("JAX_COORDINATOR_ADDRESS", "the auto-detected coordinator")
    waiting_for = ("the other processes to connect to it" if geometry.get("process_id") == 0
                   else f"the coordinator {coordinator} and its peers")

    def give_up():
        sys.stderr.write(
            f"error: --distributed: {who} waited --distributed_timeout={timeout_s} s for {waiting_for}, in vain. "
            "Start every process with the same JAX_COORDINATOR_ADDRESS (process 0's host:port) and process "
            "count, each with its own process id; check that process 0 runs and its port is reachable, and "
            "that no process has already exited.\n")
        sys.stderr.flush()
        os._exit(1)

    if geometry.get("process_id", 0) > 0:
        logging.set_verbosity(logging.WARNING)  # jax's own start-up messages included
    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:  # jax's own deadline a little later, so that the line above is what the user sees
        jax.distributed.initialize(initialization_timeout=timeout_s + 10, **geometry)
    finally:
        timer.cancel()
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)


def _flag_name(arg: str) -> str | None:
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg[2:].split("=", 1)[0]
    return name[2:] if name.startswith("no") and "." not in name and "=" not in arg else name


def _check_repeats(args: list[str]) -> None:
    seen: dict[str, str] = {}
    for arg in args:
        if arg == "--":
            break
        name = _flag_name(arg)
        if name is None:
            continue
        if name in seen:
            raise UsageError(f"flag --{name} is given twice ({seen[name]} and {arg}); give it once (a tuple "
                             f"is one flag: --{name}=a,b,c)")
        seen[name] = arg


def _check_config_file(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if path and not os.path.isfile(path):
                raise UsageError(f"--config: there is no config file {path!r} (relative to {os.getcwd()}); "
                                 "run from the repository root or give the path of configs/merlin.py")


def _unknown_field(args: list[str], key: str) -> str | None:
    for arg in args:
        name = _flag_name(arg) or ""
        if name.startswith("config.") and key in name.split(".")[1:]:
            return name
    return None


class UsageError(Exception):
    """A command line that cannot run: said in one line, without a traceback."""


def _explain(e: BaseException, args: list[str]) -> str:
    if isinstance(e, UsageError):
        return str(e)
    if isinstance(e, (AttributeError, KeyError)):
        key = str(e).strip("\"'")
        name = _unknown_field(args, key)
        if name is not None:
            parts = name.split(".")
            parent = ".".join(parts[:parts.index(key, 1)])
            return (f"unknown config field --{name}: {parent} has no field {key!r}; see configs/merlin.py "
                    "for the fields and their spelling")
    if isinstance(e, flags.Error) and "Traceback" not in str(e):
        text = str(e).strip()
        if text:  # "flag --config.optim.lr=abc: could not convert string to float: 'abc'"
            return text.splitlines()[0]
    # Otherwise the innermost exception's first line says what is wrong.
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """`app.run(main, flags_parser=cli.parse_flags)`: absl's parsing, but a flag given twice, a
    missing --config file, an unknown --config.* field or a bad value ends the process with one line
    saying what and which flag (exit status 2), not a traceback. `flag_values`: the registry (default
    absl's global one)."""
    args = list(argv[1:])
    try:
        _check_repeats(args)
        _check_config_file(args)
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except Exception as e:  # noqa: BLE001 - every parsing failure is a usage error here
        sys.stderr.write(f"error: {_explain(e, args)}\nPass --helpshort or --helpfull to see the flags.\n")
        sys.exit(2)


def parse_config_arg(arg: str | None, spec: dict, where: str) -> dict:
    """'phantom,seed=3' -> {'phantom': True, 'seed': 3} by `spec` ({key: type}, bool keys bare);
    raises ValueError naming `where` on unknown keys or bad values."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in spec:
            raise ValueError(f"{where}: unknown argument {key!r}; the arguments are "
                             f"{sorted(spec)} (e.g. --config={where}:phantom,seed=3)")
        kind = spec[key]
        if kind is bool:
            if sep and value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{where}: argument {key!r} takes no value or true/false, got {value!r}")
            out[key] = (not sep) or value.strip().lower() in ("true", "1")
        else:
            if not sep:
                raise ValueError(f"{where}: argument {key!r} needs a value ({key}=...)")
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"{where}: argument {key}={value!r} is not a valid {kind.__name__}") from None
    return out
