"""Shared fixtures: one small phantom dataset per test session (generated in ~1 s).

Tests run on CPU with 8 fake devices (set before JAX is imported) so that sharded code paths are
exercised against single-device references.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest

from vljax.data.phantom import PhantomConfig, generate_phantom

SMALL_PHANTOM = PhantomConfig(num_studies=24, seed=7, workers=1)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, SMALL_PHANTOM, log=lambda *_: None)
    return out
