"""The tiny model's tokenizer: byte-level BPE trained offline with ``tokenizers`` (≈0.1 s), the Ring
chat template, and the vocabulary padded to the model's ``vocab_size`` (a random model that samples
an id the tokenizer lacks would decode to nothing).

Chat format (Ling/Ring): ``<role>SYSTEM</role>…<role>HUMAN</role>…<role>ASSISTANT</role>…``; the
assistant reasons inside ``<think>…</think>`` and ends its turn with ``<|endoftext|>``. The reasoning tags are added
tokens that are not special: decoding with ``skip_special_tokens=True`` (SGLang's default) keeps them.
"""
from __future__ import annotations

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


ROLE_TAGS = {"system": "<role>SYSTEM</role>", "user": "<role>HUMAN</role>", "human": "<role>HUMAN</role>",
             "assistant": "<role>ASSISTANT</role>"}


def chat_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat template as (text, trained) pieces: assistant content and its end-of-turn token are
    trained (loss on), everything else is context. Concatenated, the pieces equal CHAT_TEMPLATE."""
    out = []
    for m in messages:
        role = m["role"].lower()
        out.append((ROLE_TAGS[role], False))
        if role == "assistant":
            out.append((m["content"] + EOS, True))
        else:
            out.append((m["content"], False))
    return out


def _corpus(n: int = 600, seed: int = 0):
    """Chat-formatted text of the embedded default domain (data_tools.synth): arithmetic with
    carries, linear equations, short Python programs, one-formula science."""
    from data_tools.synth import GENERATORS, unique_items

    for domain in GENERATORS:
        for _, item in zip(range(n), unique_items(domain, seed + 10_000)):  # a seed no data split uses
            yield "".join(t for t, _ in chat_segments([{"role": "user", "content": item["prompt"]},
                                                       {"role": "assistant", "content": item["response"]}]))


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
    import tempfile

    from .serving_check import reasoning_tags_not_special

    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as d:  # <think>, </think>: plain added tokens (what
        fast.save_pretrained(d)  # SGLang's default decoding keeps); the flag is only read back from the files
        reasoning_tags_not_special(d)
        fast = PreTrainedTokenizerFast.from_pretrained(d)
        if out_dir is not None:
            fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
