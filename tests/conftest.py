"""Shared fixtures: tiny randomly initialised models of several families and a real tokenizer.

Everything here is built offline; no test may reach a model hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from llmcompress.calib import read_text  # noqa: E402

TINY_VOCAB = 384
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "opt": lambda: OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=512, word_embed_proj_dim=64),
}


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Built in its dtype, as from_pretrained does (rotary tables stay float32), not cast after.
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=dtype)
    # Random init leaves weights tiny and near-orthogonal; a wider spread gives the quantizer
    # realistic outliers to deal with.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on bundled text: real tokenisation, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([read_text("austen:persuasion")[:200_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny Llama saved as a Hugging Face directory (safetensors + tokenizer)."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled default model's float16 directory (converted from GGUF once per cache)."""
    from llmcompress.models import default_model_dir

    return default_model_dir()


FIVE_BLOCKS = 5


@pytest.fixture
def five_block_dir(tmp_path, tokenizer):
    """A tiny Llama of five blocks saved as a Hugging Face directory, for block-by-block runs."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**_COMMON, "num_hidden_layers": FIVE_BLOCKS}), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _private_perplexity_cache(tmp_path, monkeypatch):
    """Each test starts with an empty float-perplexity cache of its own, so no test sees another's numbers."""
    monkeypatch.setattr("llmcompress.evalcache.cache_dir", lambda: tmp_path / "perplexity-cache")
