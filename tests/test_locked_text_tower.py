"""A locked (pretrained, frozen) text tower through the trainer: never updated, its caches equal
the tower, and the sentence pooling that needs it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import merlin
from vljax import inputs, train
from tests.runs import load_state as _load_state
from tests.runs import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["map", "sentence_mean"])
def test_locked_text_tower_is_not_updated_and_its_cache_matches_the_tower(phantom_dir, small_hf_bert_dir,
                                                                          tmp_path, pooling):
    config = tiny_config(phantom_dir, total_steps=2)
    config.model.text.update(init="pretrained", path=str(small_hf_bert_dir), pooling=pooling, trainable=False)
    config.ckpt_every = 1
    train.train_and_evaluate(config, tmp_path)
    s1, s2 = _load_state(tmp_path, config, 1), _load_state(tmp_path, config, 2)
    for x, y in zip(jax.tree.leaves(s1["params"]["text_tower"]), jax.tree.leaves(s2["params"]["text_tower"])):
        np.testing.assert_array_equal(x, y)            # AdamW neither updates nor decays it
    trainable = ("text_pool", "text_proj", "image_proj") if pooling == "map" else ("text_proj", "image_proj")
    for name in trainable:  # the trainable parts do learn
        assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s1["params"][name]),
                                                            jax.tree.leaves(s2["params"][name]))), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zero_shot"]["macro_f1"] is not None
    if pooling == "sentence_mean":
        return  # its features: test_sentence_features_are_the_mean_of_each_sentence_embedded_alone_...
    # The cached token states equal the pretrained tower's output (float16 storage).
    from vljax.data.manifest import load_manifest
    from vljax.models.bert import load_hf_bert

    bert, _ = load_hf_bert(small_hf_bert_dir)
    records = load_manifest(phantom_dir).split("train")[:6]
    table = inputs.text_table(config, inputs.tokenizer_for(config), records)
    tower = jax.jit(lambda i, m: bert(i, m))
    cached = inputs.cache_text_features(table, tower).hidden(np.arange(len(table)))
    want = np.asarray(tower(table.input_ids, table.attention_mask))  # one full-length call, no buckets
    real = table.attention_mask > 0
    np.testing.assert_allclose(cached[real].astype(np.float32), want[real], rtol=2e-3, atol=2e-3)
    assert not cached[~real].any()


def test_sentence_pooling_needs_a_locked_text_tower():
    from vljax.models import two_tower

    config = merlin.get_config("phantom")
    config.model.text.update(pooling="sentence_mean", trainable=True)
    with pytest.raises(ValueError, match="locked text tower"):
        two_tower.ModelSpec.from_config(config.model)
