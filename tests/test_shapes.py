"""Real model shapes built offline (randomly initialised, the tiny tokenizer): the published parameter
counts, and `shape:<name>` resolving to a saved model that loads like any checkpoint."""

import pytest
import torch


@pytest.mark.parametrize("name,params", [("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)])
def test_shapes_have_the_published_parameter_counts(name, params):
    from transformers import AutoModelForCausalLM

    from posttrain.models.tiny import shape_config

    with torch.device("meta"):  # no memory: shapes only
        model = AutoModelForCausalLM.from_config(shape_config(name))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.tie_word_embeddings


def test_shape_name_resolves_to_a_saved_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.errors import ConfigError
    from posttrain.models import tiny

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    # a miniature entry, so the test builds megabytes rather than the 2 GB of the real 0.5B shape
    monkeypatch.setitem(tiny.SHAPES, "mini", ("qwen2", dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            intermediate_size=128, tie_word_embeddings=True)))
    path = tiny.resolve("shape:mini")
    assert tiny.resolve("shape:mini") == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == 4096 > len(tok) and model.config.pad_token_id == tok.pad_token_id
    with pytest.raises(ConfigError, match="unknown model shape"):
        tiny.resolve("shape:gpt-5")
