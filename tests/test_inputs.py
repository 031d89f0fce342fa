"""The trainer's input (`vljax/inputs.py`): the bucketed text tower, the locked tower's caches
(token states, sentence features) against PyTorch `transformers`, and the declared batch spec
against what the pipeline yields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merlin
from vljax import inputs
from vljax.data import reports


def test_bucketed_text_tower_equals_full_length_padding():
    from flax import nnx

    from vljax.data.pipeline import TextTable
    from vljax.models import bert as bert_lib

    bert = bert_lib.BertModel(bert_lib.BertConfig.tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n, max_len = 37, 96
    lengths = rng.integers(3, max_len + 1, n)
    mask = (np.arange(max_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(1, 1000, (n, max_len)), 0).astype(np.int32)

    @jax.jit
    def fn(i, m):  # masked mean of the token states: depends on every real token, none of the padding
        h = bert(i, m)
        return (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)

    got = inputs.run_text_tower(TextTable(ids, mask), fn, batch=8, bucket=16)
    want = np.asarray(fn(ids, mask))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_sentence_features_are_the_mean_of_each_sentence_embedded_alone_by_transformers(monkeypatch):
    """`sentence_features` (our Flax MiniLM, mean-pooled, one tower call per distinct sentence)
    against the PyTorch `transformers` MiniLM run on every sentence by itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vljax.models.bert import default_bert_dir, load_hf_bert
    from vljax.models.resnet3d import ResNet3D
    from vljax.models.two_tower import TwoTower
    from flax import nnx

    texts = [reports.normalize_report_text(t) for t in (
        "Liver: The liver measures 17.5 cm. No steatosis.",
        "Spleen: Normal. No splenomegaly.",
        "Liver: The liver measures 17.5 cm. Hepatic steatosis.",
        "No splenomegaly.")]
    bert, _ = load_hf_bert()
    model = TwoTower(ResNet3D(10, width=4, rngs=nnx.Rngs(0)), bert, embed_dim=8, pooling="sentence_mean",
                     rngs=nnx.Rngs(0))
    pooled_fn = jax.jit(lambda i, m: model.text_features(i, m, train=False))
    tok = reports.load_tokenizer(None)
    calls = []
    real = inputs.run_text_tower
    monkeypatch.setattr(inputs, "run_text_tower", lambda t, *a, **k: (calls.append(len(t)), real(t, *a, **k))[1])
    got = inputs.sentence_features(texts, tok, pooled_fn, max_len=64)
    assert calls == [7]  # 11 sentences, 7 distinct: each through the tower once

    ref = transformers.BertModel.from_pretrained(str(default_bert_dir()), local_files_only=True,
                                                 attn_implementation="eager").eval()
    want = []
    for text in texts:
        rows = []
        for sentence in reports.split_sentences(text):
            enc = tok(sentence, return_tensors="pt")
            with torch.no_grad():
                h = ref(**enc).last_hidden_state[0].numpy()
            rows.append(h.mean(axis=0))  # every token is real: one sentence, no padding
        want.append(np.mean(rows, axis=0))
    np.testing.assert_allclose(got, np.array(want), atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(got[1][None], inputs.sentence_features(texts[1:2], tok, pooled_fn, 64))
    with pytest.raises(ValueError, match="text 1 has no sentence"):
        inputs.sentence_features(["ok .", "  "], tok, pooled_fn, 64)


def test_text_cache_runs_the_tower_once_per_distinct_text_and_matches_a_full_run(monkeypatch):
    from vljax.data import pipeline

    rng = np.random.default_rng(0)
    distinct = rng.integers(1, 50, size=(5, 12)).astype(np.int32)
    lengths = np.array([12, 3, 7, 1, 9])
    rows = np.array([2, 0, 2, 4, 1, 0, 3, 2, 4])  # copies of the same text, out of order
    mask = (np.arange(12)[None] < lengths[rows][:, None]).astype(np.int32)
    table = pipeline.TextTable(distinct[rows] * mask, mask)
    emb = rng.standard_normal((50, 6)).astype(np.float32)

    def text_fn(i, m):  # token states that depend on the whole row (a prefix sum over positions)
        return jnp.cumsum(jnp.asarray(emb)[i] * m[..., None], axis=1)

    full, offsets = inputs.run_text_tower(table, text_fn, out_dtype=np.float16, ragged=True)
    sizes = []
    real = inputs.run_text_tower
    monkeypatch.setattr(inputs, "run_text_tower", lambda t, *a, **k: (sizes.append(len(t)), real(t, *a, **k))[1])
    cached = inputs.cache_text_features(table, text_fn)
    assert sizes == [5]  # the tower ran on the 5 distinct texts only
    np.testing.assert_array_equal(cached.offsets, offsets)
    np.testing.assert_array_equal(cached.features, full)  # and every row got its own text's states
    np.testing.assert_array_equal(cached.hidden(np.array([1]))[0], cached.hidden(np.array([5]))[0])


@pytest.mark.parametrize("text", ["trainable", "cached_tokens", "sentence_mean"])
def test_the_pipeline_yields_exactly_the_declared_batch_spec(phantom_dir, text):
    from vljax.data.manifest import load_manifest
    from vljax.models import two_tower

    config = merlin.get_config("phantom")
    config.data.update(dir=str(phantom_dir), shape=(8, 8, 6), spacing=(30.0, 30.0, 40.0), max_text_len=48)
    config.batch_size = 4
    config.model.text.update(init="scratch", size="tiny", trainable=text == "trainable",
                             pooling={"trainable": "cls", "cached_tokens": "map", "sentence_mean": "sentence_mean"}[text])
    manifest = load_manifest(phantom_dir)
    spec_model = two_tower.ModelSpec.from_config(config.model, num_phenotypes=len(manifest.phenotype_codes))
    hidden = spec_model.text_config().hidden_size
    text_fn = None
    if text != "trainable":  # a stand-in for the locked tower: features of the right width
        pooled = text == "sentence_mean"
        text_fn = lambda ids, mask: (jnp.ones((ids.shape[0], hidden)) if pooled  # noqa: E731
                                     else jnp.ones((*ids.shape, hidden)))
    source = inputs.train_source(config, manifest, reports.load_tokenizer(), text_fn)
    spec = inputs.batch_spec(config, num_phenotypes=len(manifest.phenotype_codes), hidden_size=hidden)
    for step in range(3):
        item = source[step]
        assert set(item) == {"inputs", "meta"} and set(item["meta"]) == {"step", "unit", "study_index", "skipped"}
        got = {k: (v.shape, v.dtype) for k, v in item["inputs"].items()}
        assert got == spec, (got, spec)
