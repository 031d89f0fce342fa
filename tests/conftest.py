"""Shared fixtures: one small phantom dataset per test session (generated in ~1 s).

Tests run on CPU with 8 fake devices (set before JAX is imported) so that sharded code paths are
exercised against single-device references.
"""

from __future__ import annotations

import os

# 8 fake CPU devices; XLA:CPU code generation without LLVM optimisation: the tests' programs are tiny
# and compiled once each, so compiling them takes most of the suite's time (about a third less at O0,
# BUILD_NOTES "Test suite and CI"); the computations and their results are XLA's either way.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import atexit
import shutil
import tempfile

# One persistent compilation cache for the whole test session, set in the environment before JAX is
# imported: the end-to-end tests build the same train step, evaluator and initialiser in several runs
# (new jitted closures each time), in both pytest-xdist workers (which inherit the environment of the
# process that loads this file first) and in the trainer processes that tests start, and XLA compiles
# each distinct program once for all of them. A size limit turns on the cache's file lock, so that
# processes never read an entry another one is writing; it also makes every write list the whole
# cache (jax's LRU eviction), so only programs that take 0.2 s or more to compile are cached: the
# train steps, evaluators and initialisers, not the many one-op eager programs (BUILD_NOTES "CI time
# after issues 12 and 13"). Results are the same executable's either way.
if "VLJAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["VLJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="vljax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["VLJAX_TEST_XLA_CACHE"], ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ["VLJAX_TEST_XLA_CACHE"],
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                  JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

from vljax.data.phantom import PhantomConfig, generate_phantom  # noqa: E402

assert jax.config.jax_compilation_cache_dir == os.environ["VLJAX_TEST_XLA_CACHE"]
assert jax.config.jax_compilation_cache_max_size == 8 << 30

SMALL_PHANTOM = PhantomConfig(num_studies=24, seed=7, workers=1)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, SMALL_PHANTOM, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def small_hf_bert_dir(tmp_path_factory):
    """A Hugging Face BERT folder like the shipped MiniLM's (its tokenizer files, config.json,
    model.safetensors written by `transformers`), with a 2-layer, 32-wide random encoder: the
    "pretrained" code paths (loading, a locked tower, its caches) at a fraction of MiniLM's cost."""
    import transformers

    from vljax.assets import minilm_dir

    out = tmp_path_factory.mktemp("small_hf_bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, out / name)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=512)
    transformers.set_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    return out


# The modules that take longest, longest first (measured with `--durations=0`, BUILD_NOTES "CI time").
# pytest-xdist's `--dist loadfile` hands out whole modules in collection order, two to each worker at
# the start and one more whenever a worker finishes one. In alphabetical order test_train.py (about a
# third of the suite) came last and ran alone for minutes after the other worker had finished;
# longest first, the two workers end within one small module of each other. Tests within a module keep
# their order, so module-scoped fixtures are still built once.
LONGEST_MODULES_FIRST = ("tests/test_train.py", "tests/test_distributed.py", "tests/test_cxr_train.py",
                         "tests/test_sharding.py",
                         "tests/test_locked_text_tower.py",
                         "tests/models/test_resnet3d.py", "tests/sweep/test_runner.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_MODULES_FIRST.index(path) if path in LONGEST_MODULES_FIRST else len(LONGEST_MODULES_FIRST)

    items.sort(key=rank)  # stable: the other modules, and every module's tests, keep their order
