"""vljax.models.swin against Hugging Face's PyTorch SwinModel built with the same random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vljax.models.swin import SwinConfig, SwinModel, load_hf_swin, swin_from_hf, window_and_shift

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Grid 8 -> 4 with window 4: stage 0's second block is shifted by 2 (2x2 windows, each joining pieces
# from opposite borders after the roll); stage 1 is exactly one window, where HF turns the shift off.
ARCH = dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
SIZE = (32, 32)
# Patch pad (43 -> 44: grid 11x10), window pad (11x10 -> 12x12, then 6x5 -> 8x8, both stages shifted),
# odd pad before patch merging (11 -> 12).
PADDED = (43, 40)
BATCH = 2
TOL = 1e-5


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_forward(ref, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF on channels-last images [B, H, W, C] (converted to NCHW)."""
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _jitted(model: SwinModel):
    """jit of (forward_features, __call__): HF's (last_hidden_state, pooler_output)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model.forward_features(x), model(x)

    return lambda x: forward(state, jnp.asarray(x))


def _abstract(config: SwinConfig, dtype=jnp.float32) -> SwinModel:
    """A model with shapes only (no random initialisation, which costs many small compiles)."""
    return nnx.eval_shape(lambda: SwinModel(config, dtype=dtype, rngs=nnx.Rngs(params=0, dropout=0)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seeded HF SwinModel with every tensor randomised (HF zero-initialises the bias tables and sets
    LayerNorms to identity, which would hide mistakes), saved as safetensors; and its outputs."""
    torch.manual_seed(0)
    ref = transformers.SwinModel(transformers.SwinConfig(**ARCH, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("swin_hf")
    ref.save_pretrained(folder)
    rgb, gray = _images((BATCH, *SIZE, 3), 1), _images((BATCH, *SIZE), 2)
    padded = _images((BATCH, *PADDED, 3), 3)
    # The padded case first: HF's SwinLayer permanently sets its shift to 0 once it has seen a map no
    # larger than a window (here stage 1 at 32x32), which would change later calls at other sizes.
    outputs = {"padded": (padded, _torch_forward(ref, padded)), "rgb": (rgb, _torch_forward(ref, rgb)),
               "gray": (gray, _torch_forward(ref, np.repeat(gray[..., None], 3, axis=-1)))}
    return folder, outputs


@pytest.fixture(scope="module")
def loaded(checkpoint):
    folder, _ = checkpoint
    model = swin_from_hf(folder)
    assert not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))
    return model, _jitted(model)


def test_config_exercises_shift_and_merging():
    config = SwinConfig(**ARCH)
    grids = [SIZE[0] // config.patch_size // 2**s for s in range(len(config.depths))]
    shifts = [window_and_shift(g, g, config.window_size, config.window_size // 2)[1] for g in grids]
    assert grids == [8, 4] and shifts == [2, 0]
    assert window_and_shift(6, 5, 4, 2) == (4, 2)  # the padded case's second stage is shifted too
    assert config.num_features == 32 and SwinConfig().num_features == 768  # Swin-Tiny default


def test_hf_config(checkpoint, loaded):
    folder, _ = checkpoint
    model, _ = loaded
    assert model.config == SwinConfig.from_hf_json(folder) == SwinConfig(**ARCH)


@pytest.mark.parametrize("case", ["rgb", "gray", "padded"])
def test_parity_with_transformers(checkpoint, loaded, case):
    _, outputs = checkpoint
    _, forward = loaded
    images, (want_tokens, want_pooled) = outputs[case]
    tokens, pooled = (np.asarray(a) for a in forward(images))
    assert tokens.shape == want_tokens.shape and pooled.shape == want_pooled.shape == (BATCH, 32)
    assert pooled.dtype == np.float32
    d_tokens, d_pooled = np.abs(tokens - want_tokens).max(), np.abs(pooled - want_pooled).max()
    print(f"\n{case} {images.shape}: last_hidden_state max |diff| {d_tokens:.2e}, pooled {d_pooled:.2e}")
    assert d_tokens <= TOL and d_pooled <= TOL


def test_jit_bf16_stays_close(checkpoint, loaded):
    folder, outputs = checkpoint
    model = _abstract(SwinConfig(**ARCH), jnp.bfloat16)
    load_hf_swin(model, folder)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    images, (_, want_pooled) = outputs["rgb"]
    tokens, pooled = _jitted(model)(images)
    assert tokens.dtype == jnp.bfloat16 and pooled.dtype == jnp.float32
    rel = np.abs(np.asarray(pooled) - want_pooled).max() / np.abs(want_pooled).max()
    print(f"\nbf16 pooled max |diff| / max |ref|: {rel:.2e}")
    assert rel <= 3e-2


def _tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(folder / "model.safetensors"))


def test_loading_refuses_mismatches(checkpoint):
    folder, _ = checkpoint
    tensors = _tensors(folder)
    model = _abstract(SwinConfig(**ARCH))

    renamed = dict(tensors)
    renamed["encoder.layers.1.blocks.0.attention.self.querry.weight"] = renamed.pop(
        "encoder.layers.1.blocks.0.attention.self.query.weight")
    with pytest.raises(ValueError, match=r"missing tensors \['encoder.layers.1.blocks.0.attention.self.query"
                                         r".weight'\]; unexpected tensors \['.*querry.weight'\]"):
        load_hf_swin(model, renamed)

    mis_shaped = dict(tensors)
    name = "encoder.layers.0.blocks.1.intermediate.dense.weight"
    mis_shaped[name] = mis_shaped[name].T
    with pytest.raises(ValueError, match=rf"wrong shape: {name}: got \(16, 64\), expected \(64, 16\)"):
        load_hf_swin(model, mis_shaped)

    other_heads = _abstract(SwinConfig(**{**ARCH, "num_heads": (2, 2)}))
    with pytest.raises(ValueError, match=r"layers.0.blocks.0.attention.self.relative_position_bias_table: "
                                         r"got \(49, 1\), expected \(49, 2\)"):
        load_hf_swin(other_heads, tensors)
    with pytest.raises(ValueError, match=r"config.json does not match.*num_heads: checkpoint \(1, 2\)"):
        load_hf_swin(other_heads, folder)
    deeper = _abstract(SwinConfig(**{**ARCH, "depths": (2, 3)}))
    with pytest.raises(ValueError, match=r"missing tensors \['encoder.layers.1.blocks.2\."):
        load_hf_swin(deeper, tensors)
    assert isinstance(model.patch_embed.kernel.get_value(), jax.ShapeDtypeStruct)  # nothing was copied

    # transformers >= 5 in-memory names and a classification checkpoint's `swin.` prefix also load.
    v5 = {("swin." + k).replace("attention.self.query", "attention.q_proj")
          .replace("intermediate.dense", "mlp.fc1"): v for k, v in tensors.items()}
    v5["classifier.weight"] = np.zeros((3, 32), np.float32)
    load_hf_swin(model, v5)
    np.testing.assert_array_equal(np.asarray(model.stages[0].blocks[1].fc1.kernel[...]),
                                  tensors["encoder.layers.0.blocks.1.intermediate.dense.weight"].T)


def test_input_checks():
    model = _abstract(SwinConfig(**ARCH))
    shape_of = lambda *shape: nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, jnp.float32))
    assert shape_of(3, 43, 40).shape == (3, 32)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        shape_of(1, 32, 32, 2)
    assert shape_of(1, 28, 28, 3).shape == (1, 32)  # grids 7 -> 4
    with pytest.raises(ValueError, match="3x3 feature map is smaller than the 4x4 window"):
        shape_of(1, 24, 24, 3)  # grids 6 -> 3


def test_dropout_and_drop_path_only_in_train_mode():
    """Drop-path rates grow linearly from 0 (first block) to 0.5 (second); no other dropout."""
    config = SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4,
                        drop_path_rate=0.5)
    model = _abstract(config)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                                   nnx.state(model, nnx.Param)))
    nnx.reseed(model, dropout=0)
    forward = nnx.jit(lambda m, x, rngs, train: m(x, train=train, rngs=rngs), static_argnames="train")
    x = jnp.broadcast_to(jnp.asarray(_images((1, 16, 16), 4)), (8, 16, 16))  # 8 identical images
    evals = [np.asarray(forward(model, x, nnx.Rngs(dropout=s), False)) for s in (1, 2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    np.testing.assert_allclose(evals[0], evals[0][:1].repeat(8, 0), atol=1e-6)
    train = np.asarray(forward(model, x, nnx.Rngs(dropout=1), True))
    np.testing.assert_array_equal(train, np.asarray(forward(model, x, nnx.Rngs(dropout=1), True)))
    assert not np.allclose(train, np.asarray(forward(model, x, nnx.Rngs(dropout=2), True)))
    # Per-sample drop-path: the identical images take exactly two paths (branch kept or dropped).
    assert len(np.unique(train.round(4), axis=0)) == 2
    assert not np.allclose(train, evals[0])
    # Without call-time rngs the streams given at construction are used, and they advance.
    first, second = (np.asarray(forward(model, x, None, True)) for _ in range(2))
    assert not np.array_equal(first, second)
