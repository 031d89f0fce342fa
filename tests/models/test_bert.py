"""vljax.models.bert against Hugging Face's PyTorch BertModel on the real all-MiniLM-L6-v2 checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vljax.data.reports import load_tokenizer, tokenize
from vljax.models.bert import BertConfig, BertModel, default_bert_dir, load_hf_bert, pool

SENTENCES = [
    "no pleural effusion .",
    "the liver is enlarged with diffuse hepatic steatosis and a small simple cyst in segment 4 .",
    "kidneys : normal .",
    "moderate ascites ; no free air . bowel loops are not dilated , appendix is normal .",
]
MAX_LEN = 32


def _forward_fn(graphdef):
    @jax.jit
    def forward(state, input_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, attention_mask)
    return forward


@pytest.fixture(scope="module")
def real():
    """The real checkpoint loaded once: (model dir, jitted forward, state, tokenizer, batch)."""
    model_dir = default_bert_dir()
    model, config = load_hf_bert(model_dir)
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    graphdef, state = nnx.split(model)
    tok = load_tokenizer(model_dir)
    batch = tokenize(tok, SENTENCES, MAX_LEN)
    return model_dir, _forward_fn(graphdef), state, tok, batch


@pytest.fixture(scope="module")
def torch_reference(real):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir, _, _, _, batch = real
    ref = transformers.BertModel.from_pretrained(str(model_dir), local_files_only=True,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                  attention_mask=torch.from_numpy(batch["attention_mask"]).long())
    return out.last_hidden_state.numpy()


def test_parity_with_transformers(real, torch_reference):
    _, forward, state, tok, batch = real
    ours = np.asarray(forward(state, batch["input_ids"], batch["attention_mask"]))
    mask = batch["attention_mask"].astype(bool)
    lengths = mask.sum(1)
    assert len(set(lengths)) == len(SENTENCES) and lengths.max() < MAX_LEN  # all rows padded, unequally
    diff = np.abs(ours - torch_reference)[mask].max()
    print(f"\nlast_hidden_state max |diff| over real tokens: {diff:.2e}")
    assert diff <= 1e-4

    for kind in ("cls", "eos"):
        got = np.asarray(pool(jnp.asarray(ours), batch["attention_mask"], batch["input_ids"], kind,
                              eos_token_id=tok.sep_token_id))
        pos = np.zeros(len(SENTENCES), int) if kind == "cls" else mask.sum(1) - 1
        want = torch_reference[np.arange(len(SENTENCES)), pos]
        pooled_diff = np.abs(got - want).max()
        print(f"{kind} pooled max |diff|: {pooled_diff:.2e}")
        assert pooled_diff <= 1e-4
    # EOS pooling lands on [SEP].
    eos_pos = mask.sum(1) - 1
    assert (batch["input_ids"][np.arange(len(SENTENCES)), eos_pos] == tok.sep_token_id).all()


def test_padding_invariance(real):
    _, forward, state, tok, batch = real
    full = np.asarray(forward(state, batch["input_ids"], batch["attention_mask"]))
    n = int(batch["attention_mask"][2].sum())  # the short sentence, alone and unpadded
    alone = np.asarray(forward(state, batch["input_ids"][2:3, :n], batch["attention_mask"][2:3, :n]))
    assert np.abs(alone[0] - full[2, :n]).max() <= 1e-5


def test_eos_pool_with_eos_token_id():
    hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    ids = jnp.array([[101, 7, 102, 0, 0], [101, 7, 8, 9, 102]])
    mask = (ids > 0).astype(jnp.int32)
    np.testing.assert_array_equal(pool(hidden, mask, ids, "eos", eos_token_id=102), hidden[[0, 1], [2, 4]])
    np.testing.assert_array_equal(pool(hidden, mask, kind="eos"), hidden[[0, 1], [2, 4]])
    np.testing.assert_array_equal(pool(hidden, mask), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling kind"):
        pool(hidden, mask, ids, "mean")


# ---------------------------------------------------------------------------------------------------
# From-scratch tiny model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_batch():
    ids = np.random.default_rng(0).integers(1, 1000, size=(3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def test_tiny_jit_shapes_and_bf16(tiny_batch):
    ids, mask = tiny_batch
    config = BertConfig.tiny()
    for dtype in (jnp.float32, jnp.bfloat16):
        model = BertModel(config, dtype=dtype, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state))  # params stay fp32
        out = _forward_fn(graphdef)(state, ids, mask)
        assert out.shape == (3, 16, config.hidden_size)
        assert out.dtype == dtype  # hidden states come back in the compute dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()
        if dtype == jnp.float32:
            ref = out
    # bf16 compute tracks fp32 closely (LayerNorm outputs are O(1)).
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() < 0.1


def test_dropout_only_when_not_deterministic(tiny_batch):
    ids, mask = tiny_batch
    model = BertModel(BertConfig.tiny(), rngs=nnx.Rngs(0))

    @nnx.jit(static_argnames="deterministic")
    def run(model, rngs, deterministic):
        return model(ids, mask, deterministic=deterministic, rngs=rngs)

    a = run(model, nnx.Rngs(dropout=1), True)
    b = run(model, nnx.Rngs(dropout=2), True)
    np.testing.assert_array_equal(a, b)
    c = run(model, nnx.Rngs(dropout=1), False)
    d = run(model, nnx.Rngs(dropout=2), False)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3


def test_config_presets_and_errors(tmp_path):
    cfg = BertConfig.from_hf_json(default_bert_dir())
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.vocab_size) == ("gelu", 1e-12, 30522)
    assert BertConfig.tiny(num_hidden_layers=1).num_hidden_layers == 1
    mini = BertConfig.mini()  # BERT-tiny shape on the uncased vocabulary and 512 positions
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads, mini.intermediate_size,
            mini.vocab_size, mini.max_position_embeddings) == (128, 2, 2, 512, 30522, 512)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        BertConfig.from_hf_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="missing BERT config fields.*vocab_size"):
        BertConfig.from_hf_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.tiny(hidden_act="swish2")


# ---------------------------------------------------------------------------------------------------
# Loader errors on small hand-written checkpoints
# ---------------------------------------------------------------------------------------------------


def _tiny_checkpoint(folder, config: BertConfig, *, prefix="", drop=None, reshape=None, extra=None):
    from safetensors.numpy import save_file

    h, i = config.hidden_size, config.intermediate_size
    rng = np.random.default_rng(0)
    t = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
    }
    for n in range(config.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for lin, shape in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                           "attention.self.value": (h, h), "attention.output.dense": (h, h),
                           "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            t[p + lin + ".weight"], t[p + lin + ".bias"] = shape, (shape[0],)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = (h,), (h,)
    t.update(extra or {})
    t.update(reshape or {})
    if drop:
        del t[drop]
    save_file({prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()},
              str(folder / "model.safetensors"))
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **fields}))
    return folder


def test_loader_roundtrip_and_errors(tmp_path):
    config = BertConfig.tiny(num_hidden_layers=1, vocab_size=50, max_position_embeddings=16)
    (tmp_path / "ok").mkdir()
    ok = _tiny_checkpoint(tmp_path / "ok", config, prefix="bert.")  # "bert." prefix, pooler ignored
    model, loaded_config = load_hf_bert(ok)
    assert loaded_config == config
    from safetensors.numpy import load_file
    raw = load_file(str(ok / "model.safetensors"))
    np.testing.assert_array_equal(model.layers[0].query.kernel[...],
                                  raw["bert.encoder.layer.0.attention.self.query.weight"].T)

    cases = {
        "missing": (dict(drop="encoder.layer.0.attention.self.key.bias"),
                    r"missing tensors \['encoder.layer.0.attention.self.key.bias'\]"),
        "shape": (dict(reshape={"encoder.layer.0.intermediate.dense.weight": (64, 64)}),
                  r"encoder.layer.0.intermediate.dense.weight: got \(64, 64\), expected \(128, 64\)"),
        "unexpected": (dict(extra={"encoder.layer.1.output.dense.bias": (64,)}),
                       r"unexpected tensors \['encoder.layer.1.output.dense.bias'\]"),
    }
    for name, (kwargs, pattern) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        _tiny_checkpoint(folder, config, **kwargs)
        with pytest.raises(ValueError, match=pattern):
            load_hf_bert(folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path)
