"""Flags shared by the commands (`vljax.train`, `vljax.evaluate`, `vljax.diagnose`).

absl keeps one flag registry per process, so a flag that several commands take is defined here, once,
whichever command module is imported first; each command reads it through the holder it gets back.
"""

from __future__ import annotations

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
