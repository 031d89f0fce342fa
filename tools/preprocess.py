r"""Preprocess every CT of a dataset once, into a volume cache that training reads instead of NIfTI.

    python tools/preprocess.py --data_dir=/data/merlin --out=/data/merlin_cache --config=configs/merlin.py \
        [--config.data.dtype=bfloat16] [--workers=8] [--shard_size=0] [--verify]
    python -m vljax.train --config=configs/merlin.py --config.data.cache=/data/merlin_cache ...

The cache holds exactly what the run's preprocessing makes (config.data.spacing, shape, hu_window and
dtype: give the run's --config and --config.data.* flags), for every study of the manifest (all
splits), in ArrayRecord shards (vljax/data/volume_cache.py). An interrupted run is resumed by running
the same command again: finished shards are kept, the others (and shards whose CT files changed)
redone; `--verify` also re-reads every kept record and redoes damaged shards. An unreadable CT stops
the build naming its study, unless --config.data.on_error=skip, which records it as unreadable (the
trainer then treats it as without a cache).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

# Only light imports at the top: the worker processes start by re-importing this file ("spawn").
from vljax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/merlin.py", "the run's config (configs/merlin.py[:args])",
                                          lock_config=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset: Merlin-layout folder or .jsonl manifest "
                                "(default: config.data.dir)")
_OUT = flags.DEFINE_string("out", None, "the cache folder (created; an unfinished one is resumed)")
_WORKERS = flags.DEFINE_integer("workers", 0, "processes (0: one per CPU core)", lower_bound=0)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 0, "studies per shard (0: about 64 shards of at most 2 GiB)",
                                   lower_bound=0)
_VERIFY = flags.DEFINE_bool("verify", False, "re-read every record of the kept shards; redo damaged ones")
_COMPRESSION = flags.DEFINE_string("compression", "zstd:1", "ArrayRecord record compression, lossless: zstd:N, "
                                   "snappy or uncompressed (faster reads, larger files; measured in "
                                   "tools/bench.py data)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    data_dir = _DATA_DIR.value or config.data.dir
    if not _OUT.value:
        raise app.UsageError("--out is required: the folder of the volume cache")
    if not data_dir:
        raise app.UsageError("--data_dir is required (config.data.dir is not set): the dataset folder or .jsonl "
                             "manifest; for the phantom, the folder the trainer generated (WORKDIR/phantom)")
    from vljax import inputs
    from vljax.data import ct, manifest, volume_cache

    try:
        records = manifest.load_manifest(data_dir).records
        summary = volume_cache.build_cache(
            records, _OUT.value, inputs.ct_config(config), workers=_WORKERS.value, shard_size=_SHARD_SIZE.value,
            on_error=config.data.get("on_error", "raise"), verify=_VERIFY.value, compression=_COMPRESSION.value,
            data_dir=str(data_dir))
    except (ValueError, FileNotFoundError, ct.CTLoadError) as e:  # manifest, CT, cache and settings errors
        raise SystemExit(f"error: {e}") from None
    skipped = (f"; {len(summary.unreadable)} unreadable, recorded as such (on_error=skip): "
               f"{', '.join(summary.unreadable[:10])}{' ...' if len(summary.unreadable) > 10 else ''}"
               if summary.unreadable else "")
    print(f"{_OUT.value}: {summary.studies} studies in {summary.shards} shards ({summary.bytes / 2**30:.2f} GiB); "
          f"{summary.kept_shards} kept from an earlier run, {summary.written_shards} written in {summary.seconds:.1f} s"
          f"{skipped}\ntrain with --config.data.cache={_OUT.value}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
