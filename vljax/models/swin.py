"""A Flax NNX Swin Transformer that loads Hugging Face Swin checkpoints (safetensors).

One of CXR-CLIP's 2D image towers (DESIGN.md §2; Swin-Tiny by default): patch embedding + LayerNorm,
stages of window attention blocks (relative position bias; every second block shifted by half a window,
with the cyclic-shift attention mask), patch merging between stages, a final LayerNorm and mean
pooling. The forward pass follows `transformers.SwinModel` step by step, so its `last_hidden_state`
and `pooler_output` are reproduced from the same weights, including HF's zero padding when a size is
not a multiple of the patch, the window, or 2 (before patch merging).

Inputs are channels-last: [B, H, W] grayscale or [B, H, W, C]. A 1-channel image through a 3-channel
checkpoint uses the patch kernel summed over its input channels, which equals feeding the gray image
repeated 3x (as the ResNet stems do). Parameters are float32; `dtype` selects the compute dtype
(attention softmax and LayerNorm statistics stay float32). Dropout and drop-path act only with
`train=True`, drawing from the `dropout` stream of the `nnx.Rngs` given at construction (or at call).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vljax.models.bert import _ACTIVATIONS

Array = jax.Array
_TORCH_LN_EPS = 1e-5  # HF builds the embedding and patch-merging LayerNorms with torch's default eps


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin Transformer, with Hugging Face's field names (defaults: Swin-Tiny)."""

    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dim(i) % heads:
                raise ValueError(f"stage {i}: width {self.stage_dim(i)} is not a multiple of {heads} heads")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; use one of {sorted(_ACTIVATIONS)}")

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def num_features(self) -> int:
        """Width of the pooled output (768 for Swin-Tiny)."""
        return self.stage_dim(len(self.depths) - 1)

    @classmethod
    def from_hf_json(cls, path: str | pathlib.Path) -> SwinConfig:
        """Reads a Hugging Face `config.json` (the file, or the folder holding it) of a Swin model."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "swin":
            raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'swin'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


# ---------------------------------------------------------------------------------------------------
# Window helpers (static shapes: NumPy at trace time)
# ---------------------------------------------------------------------------------------------------


def relative_position_index(window: int) -> np.ndarray:
    """[N, N] row into the (2w-1)^2 bias table for each pair of the N = w*w tokens of a window."""
    hh, ww = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([hh.ravel(), ww.ravel()])  # [2, N], row-major over the window
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in [0, 2w-2]
    return delta[0] * (2 * window - 1) + delta[1]


def window_partition(x: Array, window: int) -> Array:
    """[B, H, W, C] -> [B, nW, w*w, C], windows in row-major order (H, W multiples of `window`).
    Works on NumPy and JAX arrays alike."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows: Array, window: int, h: int, w: int) -> Array:
    """Inverse of `window_partition`: [B, nW, w*w, C] -> [B, H, W, C]."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """[nW, N, N] additive mask of shifted-window attention on an (h, w) map (HF/original: -100).

    After rolling the map by -shift, a window may join pieces from opposite borders; tokens attend
    only within their own piece. Pieces: 3 bands per axis, [0, L-w), [L-w, L-s), [L-s, L)."""
    band = lambda n: (np.arange(n) >= n - window).astype(int) + (np.arange(n) >= n - shift)
    region = (3 * band(h)[:, None] + band(w)[None, :]).astype(np.float32)
    ids = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # NumPy in, NumPy out
    return np.where(ids[:, :, None] != ids[:, None, :], -100.0, 0.0).astype(np.float32)


def window_and_shift(h: int, w: int, window: int, shift: int) -> tuple[int, int]:
    """HF's rule: when the map is no larger than a window, one unshifted window covers it."""
    if min(h, w) > window:
        return window, shift
    if min(h, w) < window:
        raise ValueError(f"a {h}x{w} feature map is smaller than the {window}x{window} window; the "
                         "relative position table (and HF Swin) need every stage to be at least one "
                         "window: use larger images")
    return window, 0


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def _dense(i: int, o: int, *, dtype: Any, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _norm(d: int, eps: float, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window: int, config: SwinConfig, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.window = num_heads, dim // num_heads, window
        self.query = _dense(dim, dim, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.key = _dense(dim, dim, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.value = _dense(dim, dim, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.output = _dense(dim, dim, dtype=dtype, rngs=rngs)
        table = nnx.initializers.truncated_normal(0.02)(rngs.params(), ((2 * window - 1) ** 2, num_heads))
        self.relative_position_bias_table = nnx.Param(table)
        self.attention_dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

    def position_bias(self) -> Array:
        """[heads, N, N] float32 bias from the table."""
        index = relative_position_index(self.window)
        return self.relative_position_bias_table[...][index].transpose(2, 0, 1)

    def __call__(self, x: Array, mask: np.ndarray | None, *, train: bool, rngs: nnx.Rngs | None) -> Array:
        """Windows [B, nW, N, C] (and an optional [nW, N, N] mask) -> [B, nW, N, C]."""
        b, nw, n, _ = x.shape
        split = lambda t: t.reshape(b, nw, n, self.num_heads, self.head_dim)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * self.head_dim**-0.5 + self.position_bias()
        if mask is not None:
            scores = scores + mask[:, None]
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.attention_dropout(probs, deterministic=not train, rngs=rngs).astype(v.dtype)
        return self.output(jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, -1))


class SwinBlock(nnx.Module):
    """Pre-LN block: (shifted-)window attention and a GELU MLP, each on a residual branch."""

    def __init__(self, dim: int, num_heads: int, shift: int, drop_path: float, config: SwinConfig, *,
                 dtype: Any, rngs: nnx.Rngs):
        self.window, self.shift = config.window_size, shift
        hidden = int(config.mlp_ratio * dim)
        self.layernorm_before = _norm(dim, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.attention = WindowAttention(dim, num_heads, config.window_size, config, dtype=dtype, rngs=rngs)
        self.layernorm_after = _norm(dim, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.fc1 = _dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _dense(hidden, dim, dtype=dtype, rngs=rngs)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)  # whole samples

    def __call__(self, x: Array, *, train: bool, rngs: nnx.Rngs | None) -> Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, _ = x.shape
        window, shift = window_and_shift(h, w, self.window, self.shift)
        y = self.layernorm_before(x)
        ph, pw = -h % window, -w % window  # HF pads the normalised map with zeros, bottom and right
        y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(h + ph, w + pw, window, shift) if shift else None
        y = self.attention(window_partition(y, window), mask, train=train, rngs=rngs)
        y = self.dropout(y, deterministic=not train, rngs=rngs)
        y = window_merge(y, window, h + ph, w + pw)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + self.drop_path(y[:, :h, :w], deterministic=not train, rngs=rngs)
        y = self.fc2(self.activation(self.fc1(self.layernorm_after(x))))
        # As in HF's SwinLayer, drop-path acts on the attention branch only (not on the MLP branch).
        return x + self.dropout(y, deterministic=not train, rngs=rngs)


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods concatenated (HF order: (0,0), (1,0), (0,1), (1,1)), LayerNorm, Linear 4C->2C."""

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm = _norm(4 * dim, _TORCH_LN_EPS, dtype=dtype, rngs=rngs)
        self.reduction = _dense(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = h + h % 2, w + w % 2
        # [B, H/2, row, W/2, col, C] -> [B, H/2, W/2, col, row, C]: the column offset varies slowest.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
    def __init__(self, stage: int, drop_paths: list[float], config: SwinConfig, *, dtype: Any,
                 rngs: nnx.Rngs):
        dim, heads = config.stage_dim(stage), config.num_heads[stage]
        self.blocks = nnx.List([
            SwinBlock(dim, heads, 0 if i % 2 == 0 else config.window_size // 2, drop_paths[i], config,
                      dtype=dtype, rngs=rngs) for i in range(config.depths[stage])])
        last = stage == len(config.depths) - 1
        self.downsample = None if last else PatchMerging(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, *, train: bool, rngs: nnx.Rngs | None) -> Array:
        for block in self.blocks:
            x = block(x, train=train, rngs=rngs)
        return x if self.downsample is None else self.downsample(x)


class SwinModel(nnx.Module):
    """Swin encoder: `__call__` gives HF's `pooler_output` [B, num_features] (float32),
    `forward_features` its `last_hidden_state` [B, L, num_features]."""

    def __init__(self, config: SwinConfig = SwinConfig(), *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        self.num_features = config.num_features
        p, c = config.patch_size, config.embed_dim
        self.patch_embed = nnx.Conv(config.num_channels, c, (p, p), strides=(p, p), padding="VALID",
                                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.embed_norm = _norm(c, _TORCH_LN_EPS, dtype=dtype, rngs=rngs)
        num_patches = (config.image_size // p) ** 2
        self.position_embeddings = (nnx.Param(jnp.zeros((1, num_patches, c), jnp.float32))
                                    if config.use_absolute_embeddings else None)
        self.embed_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as HF
        starts = np.cumsum((0,) + config.depths)
        self.stages = nnx.List([SwinStage(s, rates[starts[s]:starts[s + 1]], config, dtype=dtype, rngs=rngs)
                                for s in range(len(config.depths))])
        self.layernorm = _norm(config.num_features, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def _embed(self, x: Array) -> Array:
        if x.ndim == 3:
            x = x[..., None]
        channels, p = x.shape[-1], self.config.patch_size
        kernel = self.patch_embed.kernel[...]
        if channels == 1 and self.config.num_channels != 1:
            kernel = jnp.sum(kernel, axis=2, keepdims=True)  # = the gray image repeated on every channel
        elif channels != self.config.num_channels:
            raise ValueError(f"expected [B, H, W] or [B, H, W, C] with C = 1 or {self.config.num_channels}, "
                             f"got shape {x.shape}")
        h, w = x.shape[1:3]
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
        x = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (p, p), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return self.embed_norm(x + self.patch_embed.bias[...].astype(self.dtype))

    def forward_features(self, x: Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
        """Images [B, H, W] or [B, H, W, C] -> final-LayerNorm tokens [B, h*w, C], row-major (compute dtype)."""
        x = self._embed(x)
        if self.position_embeddings is not None:
            b, h, w, c = x.shape
            pos = self.position_embeddings[...]
            if pos.shape[1] != h * w:
                raise ValueError(f"absolute position embeddings cover {pos.shape[1]} patches, the image "
                                 f"gives {h}x{w} (no interpolation): use image_size {self.config.image_size}")
            x = x + pos.reshape(1, h, w, c).astype(x.dtype)
        x = self.embed_dropout(x, deterministic=not train, rngs=rngs)
        for stage in self.stages:
            x = stage(x, train=train, rngs=rngs)
        x = self.layernorm(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def __call__(self, x: Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
        """Images -> mean-pooled features [B, num_features] in float32 (HF's `pooler_output`)."""
        return jnp.mean(self.forward_features(x, train=train, rngs=rngs).astype(jnp.float32), axis=1)


# ---------------------------------------------------------------------------------------------------
# Hugging Face checkpoint loading
# ---------------------------------------------------------------------------------------------------

# transformers >= 5 renames some modules in memory (it saves the names below); read both.
_V5_NAMES = (("attention.relative_position_bias.relative_position_bias_table",
              "attention.self.relative_position_bias_table"),
             ("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
             ("attention.v_proj", "attention.self.value"), ("attention.o_proj", "attention.output.dense"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
_IGNORED_PREFIXES = ("classifier.", "pooler.", "decoder.", "embeddings.mask_token")  # heads, SimMIM
_IGNORED_SUFFIXES = ("relative_position_index",)  # a buffer, rebuilt from the window size
_ARCH_FIELDS = ("patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias",
                "hidden_act", "layer_norm_eps", "use_absolute_embeddings")

Path = tuple[str | int, ...]
_LINEAR, _CONV = (1, 0), (2, 3, 1, 0)  # HF -> ours: [out, in] -> [in, out]; [O, I, kh, kw] -> [kh, kw, I, O]


def hf_param_map(config: SwinConfig) -> dict[str, tuple[Path, tuple[int, ...] | None]]:
    """HF tensor name -> (path of the NNX variable in `SwinModel`, axis permutation or None)."""
    out: dict[str, tuple[Path, tuple[int, ...] | None]] = {
        "embeddings.patch_embeddings.projection.weight": (("patch_embed", "kernel"), _CONV),
        "embeddings.patch_embeddings.projection.bias": (("patch_embed", "bias"), None),
    }

    def linear(hf: str, path: Path, bias: bool = True) -> None:
        out[hf + ".weight"] = (path + ("kernel",), _LINEAR)
        if bias:
            out[hf + ".bias"] = (path + ("bias",), None)

    def norm(hf: str, path: Path) -> None:
        out[hf + ".weight"], out[hf + ".bias"] = (path + ("scale",), None), (path + ("bias",), None)

    norm("embeddings.norm", ("embed_norm",))
    if config.use_absolute_embeddings:
        out["embeddings.position_embeddings"] = (("position_embeddings",), None)
    for s, depth in enumerate(config.depths):
        for i in range(depth):
            hf, ours = f"encoder.layers.{s}.blocks.{i}.", ("stages", s, "blocks", i)
            for name in ("query", "key", "value"):
                linear(hf + "attention.self." + name, ours + ("attention", name), config.qkv_bias)
            linear(hf + "attention.output.dense", ours + ("attention", "output"))
            out[hf + "attention.self.relative_position_bias_table"] = (
                ours + ("attention", "relative_position_bias_table"), None)
            norm(hf + "layernorm_before", ours + ("layernorm_before",))
            norm(hf + "layernorm_after", ours + ("layernorm_after",))
            linear(hf + "intermediate.dense", ours + ("fc1",))
            linear(hf + "output.dense", ours + ("fc2",))
        if s < len(config.depths) - 1:
            norm(f"encoder.layers.{s}.downsample.norm", ("stages", s, "downsample", "norm"))
            linear(f"encoder.layers.{s}.downsample.reduction", ("stages", s, "downsample", "reduction"), False)
    norm("layernorm", ("layernorm",))
    return out


def _canonical_name(name: str) -> str:
    if name.startswith("swin."):  # SwinForImageClassification / SwinForMaskedImageModeling
        name = name[len("swin."):]
    for new, old in _V5_NAMES:
        name = name.replace(new, old)
    return name


def _read(source: str | pathlib.Path | Mapping[str, Any]) -> tuple[dict[str, Any], str, pathlib.Path | None]:
    """(tensors, description, config.json path or None) from a folder, a .safetensors file or a dict."""
    if isinstance(source, Mapping):
        return dict(source), "state dict", None
    from safetensors.numpy import load_file

    path = pathlib.Path(source).expanduser()
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (only safetensors checkpoints are loaded)")
    config_file = path / "config.json"
    return load_file(str(weights)), str(weights), config_file if config_file.is_file() else None


def load_hf_swin(model: SwinModel, source: str | pathlib.Path | Mapping[str, Any]) -> None:
    """Copies a Hugging Face Swin checkpoint into `model` in place (float32).

    `source` is a folder (`model.safetensors`, and `config.json` whose architecture is checked against
    `model.config`), a `.safetensors` file, or a state dict with HF's names (NumPy or CPU torch
    tensors). Missing, unexpected or mis-shaped tensors raise a ValueError listing them; nothing is
    copied then.
    """
    tensors, where, config_file = _read(source)
    if config_file is not None:
        theirs = SwinConfig.from_hf_json(config_file)
        diff = [f"{f}: checkpoint {getattr(theirs, f)!r}, model {getattr(model.config, f)!r}"
                for f in _ARCH_FIELDS if getattr(theirs, f) != getattr(model.config, f)]
        if diff:
            raise ValueError(f"{where}: config.json does not match the model's SwinConfig: " + "; ".join(diff))
    expected = hf_param_map(model.config)
    found, unexpected = {}, []
    for raw_name, array in tensors.items():
        name = _canonical_name(raw_name)
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in expected:
            found[name] = np.asarray(array, dtype=np.float32)
        else:
            unexpected.append(raw_name)
    missing = [n for n in expected if n not in found]
    if missing or unexpected:
        raise ValueError(f"{where}: does not match a Swin with depths {model.config.depths}: missing tensors "
                         f"{missing}; unexpected tensors {sorted(unexpected)}")
    updates, mis_shaped = [], []
    for name, (path, perm) in expected.items():
        var: Any = model
        for part in path:
            var = var[part] if isinstance(part, int) else getattr(var, part)
        want = tuple(var.shape) if perm is None else tuple(var.shape[i] for i in np.argsort(perm))
        if found[name].shape != want:
            mis_shaped.append(f"{name}: got {found[name].shape}, expected {want}")
        updates.append((var, found[name] if perm is None else found[name].transpose(perm)))
    if mis_shaped:
        raise ValueError(f"{where}: tensors with the wrong shape: " + "; ".join(mis_shaped))
    for var, array in updates:
        var.set_value(jnp.asarray(array))


def swin_from_hf(folder: str | pathlib.Path, *, dtype: Any = jnp.float32, seed: int = 0) -> SwinModel:
    """A `SwinModel` built from a Hugging Face folder (`config.json`, `model.safetensors`) without a
    random initialisation first; `seed` seeds the dropout / drop-path stream."""
    config = SwinConfig.from_hf_json(folder)
    model = nnx.eval_shape(lambda: SwinModel(config, dtype=dtype, rngs=nnx.Rngs(params=0, dropout=0)))
    load_hf_swin(model, folder)
    nnx.reseed(model, dropout=seed)
    return model
