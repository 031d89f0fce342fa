"""The CLIP dual encoder: a 3D ResNet image tower and a BERT text tower, each followed by a linear
projection (with bias) to a shared dimension and L2 normalisation, plus a learnable logit scale and
an optional phenotype head on the image features.

The wrapper owns the logit scale: `logit_scale()` returns the multiplier exp(s), with s clamped to
`logit_scale_max` when that is set (CLIP: init log(1/0.07), clamp log(100); Merlin: init 1.0, no
clamp). Towers are chosen by name from the config (`build_model`), and `load_pretrained` fills the
text tower from a Hugging Face BERT folder without random-initialising it first.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vljax.models import bert as bert_lib
from vljax.models.conv import CONV_IMPLS
from vljax.models.resnet import ResNet2D
from vljax.models.resnet3d import ResNet3D
from vljax.models.swin import SwinConfig, SwinModel

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_STATS = ("global", "per_device")
IMAGE_TOWERS = ("resnet3d", "resnet2d", "swin")   # config.model.image.name
# config.model.image.swin: Swin-Tiny (the published one) or a small one for the phantom on a CPU.
SWIN_PRESETS = {"tiny": SwinConfig(),
                "phantom": SwinConfig(image_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                      drop_path_rate=0.0)}  # config.model.image.bn_stats: statistics over the global batch, or per device


class MAPHead(nnx.Module):
    """Multi-head attention pooling (big_vision's MAP head): a learned query attends over the token
    states, followed by a residual MLP. Lets a model learn *which* tokens matter, e.g. on top of a
    locked text tower whose mean-pooled report states are dominated by normal sentences."""

    def __init__(self, width: int, num_heads: int = 8, mlp_ratio: int = 4, *, rngs: nnx.Rngs):
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (1, 1, width), jnp.float32))
        self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=width, decode=False,
                                           kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> Array:
        """Token states [B, L, W] and mask [B, L] (1 = real) → pooled [B, W] (fp32)."""
        x = x.astype(jnp.float32)
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x, x, mask=(mask > 0)[:, None, None, :])
        y = y + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm(y))))
        return y[:, 0]


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# Text pooling. "sentence_mean": every sentence of a text goes through the (locked) tower on its own
# and is mean-pooled, as sentence-transformers embeds a sentence; the text's feature is the mean of its
# sentences' features (`vljax.train.sentence_features`).
POOLINGS = ("cls", "eos", "mean", "map", "sentence_mean")


class TwoTower(nnx.Module):
    """Image tower + text tower + projections + logit scale (+ phenotype head)."""

    def __init__(self, image_tower: ResNet3D | ResNet2D | SwinModel, text_tower: bert_lib.BertModel, *, embed_dim: int = 512,
                 pooling: Literal["cls", "eos", "mean", "map", "sentence_mean"] = "cls",
                 eos_token_id: int | None = None,
                 logit_scale_init: float = 1.0, logit_scale_max: float | None = None,
                 num_phenotypes: int = 0, image_feature_norm: bool = False, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling {pooling!r}: use 'cls' (Merlin), 'eos' (CXR-CLIP), 'mean', "
                             "'map' (attention pooling) or 'sentence_mean' (a locked tower's mean-pooled "
                             "sentences, averaged)")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.pooling = pooling
        self.eos_token_id = eos_token_id
        self.logit_scale_max = logit_scale_max
        # Optional BatchNorm (no affine) of the pooled image features before the projection, as in
        # SimCLR-style heads: the post-ReLU pooled features share a large common component that
        # otherwise makes all image embeddings nearly parallel early in training (Merlin: off).
        self.image_feature_bn = (nnx.BatchNorm(image_tower.num_features, use_bias=False, use_scale=False,
                                               momentum=0.9, epsilon=1e-5, rngs=rngs)
                                 if image_feature_norm else None)
        self.image_proj = nnx.Linear(image_tower.num_features, embed_dim, rngs=rngs)
        hidden = text_tower.config.hidden_size
        self.text_pool = (MAPHead(hidden, num_heads=text_tower.config.num_attention_heads, rngs=rngs)
                          if pooling == "map" else None)
        self.text_proj = nnx.Linear(hidden, embed_dim, rngs=rngs)
        self.log_logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32))
        self.phenotype_head = (nnx.Linear(image_tower.num_features, num_phenotypes, rngs=rngs)
                               if num_phenotypes > 0 else None)

    def logit_scale(self) -> Array:
        """The multiplier exp(s) applied to cosine similarities (s clamped to `logit_scale_max`)."""
        s = self.log_logit_scale[...]
        if self.logit_scale_max is not None:
            s = jnp.minimum(s, self.logit_scale_max)
        return jnp.exp(s)

    def image_features(self, volumes: Array, *, train: bool, rngs: nnx.Rngs | None = None) -> Array:
        """[B, (D,) H, W] or [B, (D,) H, W, C] images → pooled fp32 features [B, F]; `rngs` feeds a
        Swin tower's drop-path in training (ResNets draw nothing)."""
        if isinstance(self.image_tower, SwinModel):
            return self.image_tower(volumes, train=train, rngs=rngs)
        return self.image_tower(volumes, train=train)

    def embed_image_features(self, features: Array, *, train: bool) -> Array:
        """Pooled image features [B, F] → L2-normalised embeddings [B, E] (fp32)."""
        if self.image_feature_bn is not None:
            features = self.image_feature_bn(features, use_running_average=not train)
        return _l2_normalize(self.image_proj(features))

    def encode_image(self, volumes: Array, *, train: bool) -> Array:
        """Volumes → L2-normalised embeddings [B, E] (fp32)."""
        return self.embed_image_features(self.image_features(volumes, train=train), train=train)

    def text_hidden(self, input_ids: Array, attention_mask: Array, *, train: bool,
                    rngs: nnx.Rngs | None = None) -> Array:
        """Token ids [B, L] → the text tower's last hidden states [B, L, H]. Dropout when `train`."""
        return self.text_tower(input_ids, attention_mask, deterministic=not train, rngs=rngs)

    def pool_text(self, hidden: Array, attention_mask: Array, input_ids: Array | None = None) -> Array:
        """Hidden states [B, L, H] → pooled fp32 [B, H] by the configured pooling.

        With "sentence_mean" each row is one sentence and is mean-pooled; averaging the sentences of
        a text is the caller's (`vljax.train.sentence_features`), on the host, since the sentences
        are embedded separately."""
        if self.pooling == "map":
            return self.text_pool(hidden, attention_mask)
        if self.pooling in ("mean", "sentence_mean"):  # masked mean over real tokens (sentence-transformers')
            mask = attention_mask[..., None].astype(jnp.float32)
            return jnp.sum(hidden.astype(jnp.float32) * mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
        pooled = bert_lib.pool(hidden, attention_mask, input_ids, kind=self.pooling,
                               eos_token_id=self.eos_token_id)
        return pooled.astype(jnp.float32)

    def text_features(self, input_ids: Array, attention_mask: Array, *, train: bool,
                      rngs: nnx.Rngs | None = None) -> Array:
        """Token ids [B, L] → pooled fp32 text features [B, H]."""
        hidden = self.text_hidden(input_ids, attention_mask, train=train, rngs=rngs)
        return self.pool_text(hidden, attention_mask, input_ids)

    def embed_text_features(self, features: Array) -> Array:
        """Pooled text features [B, H] → L2-normalised embeddings [B, E]."""
        return _l2_normalize(self.text_proj(features))

    def encode_text(self, input_ids: Array, attention_mask: Array, *, train: bool,
                    rngs: nnx.Rngs | None = None) -> Array:
        """Token ids [B, L] → L2-normalised embeddings [B, E] (fp32). Dropout when `train`."""
        return self.embed_text_features(self.text_features(input_ids, attention_mask, train=train, rngs=rngs))

    def phenotype_logits(self, features: Array) -> Array:
        if self.phenotype_head is None:
            raise ValueError("this model has no phenotype head (model.num_phenotypes = 0)")
        return self.phenotype_head(features)


# ---------------------------------------------------------------------------------------------------
# Construction from a config
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What `build_model` needs, read from `config.model` (see configs/merlin.py)."""

    image_name: str = "resnet3d"           # "resnet3d" | "resnet2d" | "swin"
    image_swin: str = "tiny"                # swin: a SWIN_PRESETS name
    image_drop_path: float = 0.1            # swin: stochastic depth rate
    image_depth: int = 152
    image_width: int = 64
    image_norm: str = "batch"
    image_num_groups: int = 32
    image_remat: bool = False
    image_feature_norm: bool = False
    image_conv: str = "auto"                # "auto" | "native" | "depth_taps" (vljax/models/conv.py)
    image_init: str = "scratch"             # "scratch" or "torchvision:<path>.safetensors" (I3D inflation)
    image_bn_stats: str = "global"          # training BatchNorm statistics: "global" batch or "per_device"
    image_bn_slices: int = 1                # per_device: the batch's slices (devices); set by the trainer
    text_init: str = "pretrained"          # "pretrained" (HF folder) or "scratch"
    text_path: str | None = None            # HF BERT folder; None = the MiniLM checkpoint shipped by pip
    text_size: str = "small"                # scratch preset: tiny | mini | small | base
    vocab_size: int = 30522
    pooling: str = "cls"
    text_trainable: bool = True
    embed_dim: int = 512
    logit_scale_init: float = 1.0
    logit_scale_max: float | None = None
    num_phenotypes: int = 0
    dtype: str = "float32"                  # compute dtype of both towers

    @classmethod
    def from_config(cls, model_cfg: Any, num_phenotypes: int = 0) -> ModelSpec:
        img, txt = model_cfg.image, model_cfg.text
        if img.name not in IMAGE_TOWERS:
            raise ValueError(f"config.model.image.name={img.name!r}: use one of {list(IMAGE_TOWERS)}")
        if img.name == "swin" and img.get("swin", "tiny") not in SWIN_PRESETS:
            raise ValueError(f"config.model.image.swin={img.swin!r}: use one of {sorted(SWIN_PRESETS)}")
        if txt.name != "bert":
            raise ValueError(f"config.model.text.name={txt.name!r}: the only text tower is 'bert'")
        if txt.init not in ("pretrained", "scratch"):
            raise ValueError(f"config.model.text.init={txt.init!r}: use 'pretrained' or 'scratch'")
        conv = img.get("conv", "auto")  # absent from configs saved before it existed; same parameters
        if conv not in CONV_IMPLS:
            raise ValueError(f"config.model.image.conv={conv!r}: use one of {list(CONV_IMPLS)}")
        image_init = img.get("init", "scratch")  # absent from configs saved before it existed
        prefix = "hf:" if img.name == "swin" else "torchvision:"
        if image_init != "scratch" and not (image_init.startswith(prefix) and len(image_init) > len(prefix)):
            raise ValueError(f"config.model.image.init={image_init!r}: use 'scratch' or " + (
                "'hf:/path/swin-folder' (a Hugging Face Swin folder)" if img.name == "swin" else
                "'torchvision:/path/resnet.safetensors' (a torchvision ResNet state dict)"))
        bn_stats = img.get("bn_stats", "global")  # absent from configs saved before it existed
        if bn_stats not in BN_STATS:
            raise ValueError(f"config.model.image.bn_stats={bn_stats!r}: use one of {list(BN_STATS)}")
        if model_cfg.dtype not in _DTYPES:
            raise ValueError(f"config.model.dtype={model_cfg.dtype!r}: use one of {sorted(_DTYPES)}")
        if txt.pooling == "sentence_mean" and txt.trainable:
            raise ValueError("config.model.text.pooling='sentence_mean' embeds every sentence once, with a "
                             "locked text tower: set config.model.text.trainable=False, or use 'mean'")
        scale_max = model_cfg.logit_scale_max
        return cls(image_name=img.name, image_swin=img.get("swin", "tiny"),
                   image_drop_path=float(img.get("drop_path", 0.1)), image_depth=img.depth, image_width=img.width, image_norm=img.norm,
                   image_num_groups=img.num_groups, image_remat=img.remat,
                   image_feature_norm=bool(img.feature_norm), image_conv=conv, image_init=image_init,
                   image_bn_stats=bn_stats,
                   text_init=txt.init,
                   text_path=txt.path or None, text_size=txt.size, vocab_size=txt.vocab_size,
                   pooling=txt.pooling, text_trainable=bool(txt.trainable), embed_dim=model_cfg.embed_dim,
                   logit_scale_init=float(model_cfg.logit_scale_init),
                   logit_scale_max=None if scale_max is None else float(scale_max),
                   num_phenotypes=num_phenotypes, dtype=model_cfg.dtype)

    def text_config(self) -> bert_lib.BertConfig:
        if self.text_init == "pretrained":
            folder = pathlib.Path(self.text_path) if self.text_path else bert_lib.default_bert_dir()
            return bert_lib.BertConfig.from_hf_json(folder / "config.json")
        presets = {"tiny": bert_lib.BertConfig.tiny, "mini": bert_lib.BertConfig.mini, "small": bert_lib.BertConfig.small,
                   "base": bert_lib.BertConfig.base}
        if self.text_size not in presets:
            raise ValueError(f"config.model.text.size={self.text_size!r}: use one of {sorted(presets)}")
        return presets[self.text_size](vocab_size=self.vocab_size)


def build_model(spec: ModelSpec, rngs: nnx.Rngs) -> TwoTower:
    """Randomly initialised two-tower model (the pretrained text weights come in `load_pretrained`)."""
    dtype = _DTYPES[spec.dtype]
    image = build_image_tower(spec, rngs)
    text_cfg = spec.text_config()
    text = bert_lib.BertModel(text_cfg, dtype=dtype, rngs=rngs)
    # EOS pooling takes the last real token, which is [SEP] in BERT tokenisation.
    return TwoTower(image, text, embed_dim=spec.embed_dim, pooling=spec.pooling, eos_token_id=None,
                    logit_scale_init=spec.logit_scale_init, logit_scale_max=spec.logit_scale_max,
                    num_phenotypes=spec.num_phenotypes, image_feature_norm=spec.image_feature_norm,
                    rngs=rngs)


def build_image_tower(spec: ModelSpec, rngs: nnx.Rngs) -> ResNet3D | ResNet2D | SwinModel:
    """The image tower `spec.image_name` names, randomly initialised."""
    dtype = _DTYPES[spec.dtype]
    if spec.image_name == "swin":
        if spec.image_init.startswith("hf:"):
            cfg = SwinConfig.from_hf_json(spec.image_init.removeprefix("hf:"))
        else:
            cfg = SWIN_PRESETS[spec.image_swin]
        cfg = dataclasses.replace(cfg, drop_path_rate=spec.image_drop_path)
        return SwinModel(cfg, dtype=dtype, rngs=rngs)
    common = dict(width=spec.image_width, norm=spec.image_norm, num_groups=spec.image_num_groups,
                  remat=spec.image_remat, dtype=dtype, bn_slices=spec.image_bn_slices, rngs=rngs)
    if spec.image_name == "resnet2d":
        return ResNet2D(spec.image_depth, **common)
    return ResNet3D(spec.image_depth, conv=spec.image_conv, **common)


def has_pretrained(spec: ModelSpec) -> bool:
    """Whether `load_pretrained` has weights to load for `spec`."""
    return spec.text_init == "pretrained" or spec.image_init != "scratch"


def load_pretrained(model: TwoTower, spec: ModelSpec) -> None:
    """Fills the towers that `spec` initialises from files: the text tower from its Hugging Face folder
    (`text_init == "pretrained"`), the image tower from a torchvision ResNet state dict inflated to 3D
    (`image_init == "torchvision:<path>"`)."""
    from safetensors.numpy import load_file

    if spec.image_init.startswith("hf:"):
        from vljax.models.swin import load_hf_swin

        load_hf_swin(model.image_tower, spec.image_init.removeprefix("hf:"))
    elif spec.image_init.startswith("torchvision:"):
        from vljax.models.resnet import load_torchvision_2d
        from vljax.models.resnet3d import inflate_from_torch_2d, load_torchvision_safetensors

        path = pathlib.Path(spec.image_init.removeprefix("torchvision:"))
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: config.model.image.init='torchvision:<path>' must "
                                    "name a torchvision ResNet state dict saved as .safetensors")
        state = load_torchvision_safetensors(str(path))
        if spec.image_name == "resnet2d":
            load_torchvision_2d(model.image_tower, state)
        else:
            inflate_from_torch_2d(model.image_tower, state)
    if spec.text_init != "pretrained":
        return
    folder = pathlib.Path(spec.text_path) if spec.text_path else bert_lib.default_bert_dir()
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: config.model.text.path must name a Hugging "
                                "Face BERT folder with config.json and model.safetensors")
    bert_lib.load_hf_state(model.text_tower, load_file(str(weights)), source=str(weights))
