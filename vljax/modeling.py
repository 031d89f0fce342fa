"""Model construction: the device mesh, the two-tower model built from `config.model`
(`two_tower.ModelSpec`), its abstract shapes, its random or pretrained initialisation, and the
locked text tower's feature function used to fill the input cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

from vljax import sharding
from vljax.data.manifest import Manifest
from vljax.models import two_tower


def make_mesh(config=None, devices=None) -> Mesh:
    """The (data, fsdp) mesh of `config.mesh` over `devices` (default: all); without a config, every
    device on `data` (data parallel, replicated parameters). `vljax/sharding.py`."""
    return sharding.make_mesh(None if config is None else config.get("mesh"), devices)


@dataclasses.dataclass
class Model:
    """The model's static structure plus what is needed to rebuild and shard its state."""

    spec: two_tower.ModelSpec
    graphdef: Any
    abstract_params: Any
    abstract_rest: Any


def model_spec(config, manifest: Manifest | None, mesh: Mesh | None = None) -> two_tower.ModelSpec:
    """The model of `config.model`; with `mesh`, per-device BatchNorm statistics (bn_stats="per_device")
    use one slice of the batch per device (evaluation does not depend on it)."""
    num_phen = 0
    if config.model.phenotype_weight > 0:
        if manifest is None or not manifest.phenotype_codes:
            raise ValueError("config.model.phenotype_weight > 0 but the dataset has no phenotype table")
        num_phen = len(manifest.phenotype_codes)
    spec = two_tower.ModelSpec.from_config(config.model, num_phenotypes=num_phen)
    if spec.image_bn_stats == "per_device" and mesh is not None:
        spec = dataclasses.replace(spec, image_bn_slices=sharding.batch_shards(mesh))
    return spec


def abstract_model(spec: two_tower.ModelSpec, seed: int) -> Model:
    abstract = nnx.eval_shape(lambda: two_tower.build_model(spec, nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return Model(spec, graphdef, params, rest)


def init_model(model: Model, seed: int, shardings) -> tuple[Any, Any]:
    """Random init compiled once, each array created where `shardings` puts it (one sharding for all,
    or (params, rest) trees: never whole on one device); weights from files (pretrained text tower,
    inflated torchvision image tower: `config.model.*.init`) loaded after and placed the same way."""

    def init():
        _, params, rest = nnx.split(two_tower.build_model(model.spec, nnx.Rngs(seed)), nnx.Param, ...)
        return params, rest

    params, rest = jax.jit(init, out_shardings=shardings)()
    if two_tower.has_pretrained(model.spec):
        m = nnx.merge(model.graphdef, params, rest, copy=True)
        two_tower.load_pretrained(m, model.spec)
        _, params, rest = nnx.split(m, nnx.Param, ...)
        params, rest = jax.device_put((params, rest), shardings)
    return params, rest


def locked_text_fn(model: Model, params, rest, mesh: Mesh) -> Callable:
    """`fn(ids, mask)` of a locked text tower in evaluation mode: its pooled features for
    "sentence_mean" pooling, else its last hidden states (which the trainable pooling reads)."""
    replicated = NamedSharding(mesh, P())
    method = "text_features" if model.spec.pooling == "sentence_mean" else "text_hidden"

    @functools.partial(jax.jit, out_shardings=replicated)
    def fn(p, r, ids, mask):
        return getattr(nnx.merge(model.graphdef, p, r, copy=True), method)(ids, mask, train=False)

    return functools.partial(fn, params, rest)
