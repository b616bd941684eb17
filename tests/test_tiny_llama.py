"""The generated tiny Llama is bit-reproducible and loads as a normal Hugging Face model."""

from __future__ import annotations

import json

import pytest

from meshkv.models.tiny_llama import TinyLlamaSpec, directory_digest, make_tiny_llama


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "a")


def test_two_builds_are_byte_identical_and_load(first, tmp_path):
    second = make_tiny_llama(tmp_path / "b")
    assert directory_digest(first) == directory_digest(second)

    spec = TinyLlamaSpec()
    config = json.loads((first / "config.json").read_text())
    assert config["num_hidden_layers"] == spec.num_hidden_layers
    assert config["num_key_value_heads"] == spec.num_key_value_heads
    assert config["vocab_size"] == spec.vocab_size

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(first)
    text = "def hello(world):\n    return {'é': 42}"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < spec.vocab_size
    assert tokenizer.decode(ids) == text


def test_existing_complete_model_is_reused(first):
    path = first
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_llama(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
