"""Tiny random-weight HF models and a byte-level tokenizer, built in memory for fast tests."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 5 special tokens + 256 bytes (vocab 261), no merges."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 5 + 256


def random_prompt(n: int, seed: int = 0) -> list[int]:
    """``n`` token ids drawn from the byte tokens (no specials), reproducible by ``seed``."""
    rng = random.Random(seed)
    return [rng.randrange(len(SPECIALS), VOCAB) for _ in range(n)]


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A 2-layer random-weight model of `family` (llama, mistral, qwen2), GQA with group 2."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=family == "llama")
    common.update(overrides)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    # random init has tiny weights that make all logits alike; widen so greedy paths differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "bias" in str(p.shape):
                p.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model.eval()
