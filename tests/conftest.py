"""Shared fixtures: tiny random models of each family, saved with `save_pretrained` so the real loading path runs.

The tokenizer is a byte-level BPE trained here on a few lines of text and saved as a fast tokenizer with a chat
template, so `--chat`, stop strings and detokenisation run as they do on real models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Speculative decoding drafts tokens cheaply and verifies them in one pass.",
    "1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6.",
    "Hello world! How are you today? I am fine, thank you.",
]


def _build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.2)
    if family == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if family == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=10000.0)
    if family == "qwen3":
        return tf.Qwen3Config(**common, rope_theta=10000.0)
    if family == "gemma3":
        common.update(num_hidden_layers=3, tie_word_embeddings=True)
        return tf.Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   hidden_activation="gelu_pytorch_tanh")
    raise ValueError(family)


def make_tiny_model(out: Path, family: str = "llama", seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family)).float()
    with torch.no_grad():  # random norms so Gemma's (1 + w) and Llama's w paths are both exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if family != "gemma3" else p.uniform_(-0.5, 0.5)
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    _build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model(root / f, f) for f in ("llama", "qwen2", "qwen3", "gemma3")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory) -> Path:
    """A second, differently seeded random llama with the same tokenizer: a drafter that is often wrong."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-draft") / "llama", "llama", seed=1)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model forwards on one intra-op thread: for 64-wide layers thread hand-off costs more
    than the math (measured ~6x slower per decode step with 2 threads on a 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
