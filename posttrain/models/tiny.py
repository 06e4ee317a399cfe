"""A tiny Llama/Qwen2-style model and a tokenizer built offline, saved in Hugging Face format.

Tests and the demo use this instead of downloading anything. The tokenizer is a byte-level BPE
trained in milliseconds on the built-in task's text (any string still encodes, byte by byte), with a
ChatML chat template. The saved directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM``
``.from_pretrained`` like any checkpoint.
"""

from __future__ import annotations

# transformers, peft and tokenizers are imported inside the functions that use them: importing them
# costs seconds, and `posttrain <command> --help` imports this module.

import hashlib
import json
import os
from pathlib import Path

# ChatML; tools (function schemas) go in a leading block and an assistant's tool calls follow its
# text as <tool_call>{"name", "arguments"}</tool_call> (the Qwen/Hermes convention)
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# name -> (hidden, layers, heads, kv_heads, intermediate); "tiny" ≈ 1.6M params, "small" ≈ 4.4M
SIZES = {
    "tiny": (192, 4, 6, 2, 512),
    "small": (256, 6, 8, 4, 688),
}
VOCAB = 512


def build_tokenizer(vocab_size: int = VOCAB):
    """Byte-level BPE on the built-in task's corpus, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.tasks.builtin import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, arch: str = "llama", size: str = "tiny", seed: int = 0):
    """A randomly initialised causal LM whose vocabulary matches ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    hidden, layers, heads, kv, inter = SIZES[size]
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                  max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(path: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0) -> Path:
    """Build the tiny model + tokenizer and save both to ``path`` (atomic: a temp dir, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, arch, size, seed)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "posttrain_tiny.json").write_text(json.dumps({"arch": arch, "size": size, "seed": seed}))
    return _publish(tmp, path)


def complete(path: Path) -> bool:
    """A built model directory holds its config and weights (a half-written or rank-skipped one does not)."""
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _publish(tmp: Path, path: Path) -> Path:
    """Rename the built ``tmp`` into place, unless another process did first. Under an initialized
    torch.distributed group transformers writes model files on rank 0 only, so another rank's ``tmp``
    lacks them: it waits for rank 0's copy instead of publishing its own."""
    import shutil
    import time

    if not complete(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        deadline = time.monotonic() + 600
        while not complete(path):
            if time.monotonic() > deadline:
                from posttrain.errors import ModelError

                raise ModelError(f"{path} was not written by rank 0 within 10 minutes", where=str(path),
                                 fix="build it once in one process (python -c \"from posttrain.models.tiny import "
                                     "resolve; resolve('tiny')\") before launching several")
            time.sleep(0.5)
        return path
    if complete(path):  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    shutil.rmtree(path, ignore_errors=True)  # an incomplete copy left by an older build
    os.replace(tmp, path)
    return path


def tiny_path(arch: str = "llama", size: str = "tiny", seed: int = 0) -> Path:
    """Cached location of a tiny model, built on first use (``$POSTTRAIN_CACHE`` or ~/.cache)."""
    from posttrain.tasks import builtin

    root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
    # the key covers the factory code so a change to the task text or sizes rebuilds the model
    src = Path(__file__).read_bytes() + Path(builtin.__file__).read_bytes()
    key = hashlib.sha256(src + f"{arch}-{size}-{seed}".encode()).hexdigest()[:12]
    path = root / f"tiny-{arch}-{size}-{seed}-{key}"
    if not complete(path):
        root.mkdir(parents=True, exist_ok=True)
        save_tiny(path, arch, size, seed)
    return path


# real architectures and sizes, randomly initialised, with the tiny tokenizer (rows of the embedding
# beyond its 512 tokens are never input): memory and speed at real shapes, offline
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)),
}


def shape_config(name: str, tokenizer=None):
    """The transformers config of a real shape (``SHAPES``), with the tiny tokenizer's special tokens."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in SHAPES:
        from posttrain.errors import ConfigError

        raise ConfigError(f"unknown model shape '{name}'", where="model.name_or_path",
                          fix=f"use shape:<one of {', '.join(SHAPES)}>")
    arch, dims = SHAPES[name]
    tokenizer = tokenizer or build_tokenizer()
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        **dims, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def save_shape(path: Path, name: str, seed: int = 0) -> Path:
    """Build a randomly initialised model of shape ``name`` and the tiny tokenizer into ``path`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape_config(name, tokenizer), attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "posttrain_shape.json").write_text(json.dumps({"shape": name, "seed": seed}))
    return _publish(tmp, path)


def resolve(name_or_path: str) -> str:
    """'tiny', 'tiny-qwen2', 'tiny-llama-small', 'shape:qwen2.5-0.5b' -> a built local path (cached);
    anything else unchanged."""
    if name_or_path.startswith("shape:"):
        name = name_or_path.split(":", 1)[1]
        shape_config(name)  # an unknown shape is an error before anything is built
        root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
        key = hashlib.sha256(Path(__file__).read_bytes() + name.encode()).hexdigest()[:12]
        path = root / f"shape-{name}-{key}"
        if not complete(path):
            root.mkdir(parents=True, exist_ok=True)
            save_shape(path, name)
        return str(path)
    if not name_or_path.startswith("tiny") or os.path.exists(name_or_path):
        return name_or_path
    parts = name_or_path.split("-")[1:]
    arch = next((p for p in parts if p in ("llama", "qwen2")), "llama")
    size = next((p for p in parts if p in SIZES), "tiny")
    return str(tiny_path(arch, size))
