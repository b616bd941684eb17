"""A tiny, reproducible Llama checkpoint for tests and the demo (no model can be downloaded here).

`make_tiny_llama(path)` writes a Hugging Face model directory that vLLM serves like any other:
a byte-level BPE tokenizer trained with `tokenizers` on a fixed list of this Python's standard
library sources, and a `LlamaForCausalLM` with seeded random weights, saved in bfloat16 with
`save_pretrained`. The same Python version and package versions give the same bytes every time
(`tests/test_tiny_llama.py` checks it), so two machines can serve "the same model".

This module knows nothing of meshkv's mesh, keys or connector; it only needs `tokenizers`,
`transformers` and `torch`, imported when called.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("vllm.meshkv.models.tiny_llama")

# Stdlib modules present in every CPython >= 3.11; their text trains the tokenizer.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "email/message.py",
    "enum.py",
    "functools.py",
    "http/client.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "string.py",
    "textwrap.py",
    "typing.py",
    "unittest/case.py",
)
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<unk>")
DEFAULT_MODEL_DIR = Path(".models") / "tiny-llama"
_WEIGHTS_SEED = 1234
_COMPLETE_MARKER = "meshkv-tiny-llama.ok"


@dataclass(frozen=True, slots=True, kw_only=True)
class TinyLlamaSpec:
    """The shape of the generated model. Defaults give ~6 M parameters (12 MB in bfloat16)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    weights_seed: int = _WEIGHTS_SEED


def corpus_files() -> list[Path]:
    """The stdlib source files the tokenizer is trained on, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in CORPUS_MODULES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"stdlib sources needed for the tokenizer are missing: {missing}")
    return files


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f.read_text(encoding="utf-8") for f in corpus_files()]
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _write_model(spec: TinyLlamaSpec, out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = _train_tokenizer(spec.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.model_max_length = spec.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=raw.token_to_id("<s>"),
        eos_token_id=raw.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.weights_seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir, safe_serialization=True)


def make_tiny_llama(
    path: Path | str = DEFAULT_MODEL_DIR,
    *,
    spec: TinyLlamaSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the tiny model to `path` (if not already complete there) and return the path.

    The directory is built in a temporary sibling and renamed into place, so a crash never
    leaves a half-written model that looks complete.
    """
    target = Path(path)
    if (target / _COMPLETE_MARKER).is_file() and not overwrite:
        return target
    spec = spec or TinyLlamaSpec()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_model(spec, staging)
        (staging / _COMPLETE_MARKER).write_text(f"{spec}\n", encoding="utf-8")
        for item in staging.iterdir():
            item.chmod(0o644)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("tiny llama written to %s", target)
    return target


def directory_digest(path: Path | str) -> str:
    """SHA-256 over every file's relative name and bytes, in sorted order (reproducibility)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()
