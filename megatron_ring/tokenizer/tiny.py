"""The tiny model's tokenizer: byte-level BPE trained offline with ``tokenizers`` (≈0.1 s), the Ring
chat template, and the vocabulary padded to the model's ``vocab_size`` (a random model that samples
an id the tokenizer lacks would decode to nothing).

Chat format (Ling/Ring): ``<role>SYSTEM</role>…<role>HUMAN</role>…<role>ASSISTANT</role>…``; the
assistant reasons inside ``<think>…</think>`` and ends its turn with ``<|endoftext|>``.
"""
from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<role>", "</role>", "<think>", "</think>"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{%- if role == 'system' -%}{{ '<role>SYSTEM</role>' + message['content'] }}"
    "{%- elif role == 'user' or role == 'human' -%}{{ '<role>HUMAN</role>' + message['content'] }}"
    "{%- elif role == 'assistant' -%}{{ '<role>ASSISTANT</role>' + message['content'] + '<|endoftext|>' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<role>ASSISTANT</role>' }}{%- endif -%}"
)


def _corpus(n: int = 4000, seed: int = 0):
    """Text shaped like the embedded default domain: arithmetic with carries, linear equations,
    short Python functions and science quantities, in the chat format."""
    rng = random.Random(seed)
    words = ("Let us compute step by step. First add the ones digit, carry the one, then the tens. "
             "Solve for x: subtract from both sides and divide. The answer is \\boxed{} . Please reason "
             "step by step, and put your final answer within \\boxed{}. def solve(n): return n * 2 + 1 "
             "The velocity is distance over time; the force is mass times acceleration; energy in joules, "
             "meters per second, kilograms, newtons. Check: so the result holds. Therefore").split()
    for _ in range(n):
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
        yield (f"<role>HUMAN</role>What is {a} + {b}? {text}<role>ASSISTANT</role><think>{a} + {b}: "
               f"{a % 10} + {b % 10} = {a % 10 + b % 10}, {text}</think> \\boxed{{{a + b}}}<|endoftext|>")
        yield f"x * {rng.randint(2, 9)} + {rng.randint(0, 50)} = {rng.randint(50, 500)}; 3.14 2.5e-3 (x - 7) / 2"


def build_tiny_tokenizer(vocab_size: int = 512, out_dir: str | Path | None = None, seed: int = 0):
    """Train the tiny tokenizer and return a ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids > model vocab_size {vocab_size}")
    pad = [f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size())]
    if pad:
        tok.add_special_tokens(pad)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=SPECIAL_TOKENS[2:])
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
