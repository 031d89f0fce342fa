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
import numpy as np
from flax import nnx

from vljax.data.manifest import Manifest
from vljax.models import two_tower


def make_mesh() -> Mesh:
    """One `data` axis over every device of every process (data parallel, replicated parameters)."""
    return Mesh(np.array(jax.devices()), ("data",))


@dataclasses.dataclass
class Model:
    """The model's static structure plus what is needed to rebuild and shard its state."""

    spec: two_tower.ModelSpec
    graphdef: Any
    abstract_params: Any
    abstract_rest: Any


def model_spec(config, manifest: Manifest | None) -> two_tower.ModelSpec:
    num_phen = 0
    if config.model.phenotype_weight > 0:
        if manifest is None or not manifest.phenotype_codes:
            raise ValueError("config.model.phenotype_weight > 0 but the dataset has no phenotype table")
        num_phen = len(manifest.phenotype_codes)
    return two_tower.ModelSpec.from_config(config.model, num_phenotypes=num_phen)


def abstract_model(spec: two_tower.ModelSpec, seed: int) -> Model:
    abstract = nnx.eval_shape(lambda: two_tower.build_model(spec, nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return Model(spec, graphdef, params, rest)


def init_model(model: Model, seed: int, replicated: NamedSharding) -> tuple[Any, Any]:
    """Random init compiled once, placed replicated on the mesh; weights from files (pretrained text
    tower, inflated torchvision image tower: `config.model.*.init`) loaded after."""

    def init():
        _, params, rest = nnx.split(two_tower.build_model(model.spec, nnx.Rngs(seed)), nnx.Param, ...)
        return params, rest

    params, rest = jax.jit(init, out_shardings=replicated)()
    if two_tower.has_pretrained(model.spec):
        m = nnx.merge(model.graphdef, params, rest, copy=True)
        two_tower.load_pretrained(m, model.spec)
        _, params, rest = nnx.split(m, nnx.Param, ...)
        params, rest = jax.device_put((params, rest), replicated)
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
