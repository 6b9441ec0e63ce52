"""What a tokenizer must be to serve a model: its reasoning tags survive SGLang's detokenisation, and it agrees
with the model it ships with.

SGLang decodes with ``skip_special_tokens=True`` by default (``ChatCompletionRequest``), and its ``deepseek-r1``
reasoning parser takes text without ``</think>`` as unfinished reasoning: were ``<think>`` / ``</think>`` special
tokens, the whole reply would land in ``reasoning_content`` and ``content`` would be empty. DeepSeek-R1's and Qwen3's
tokenizers mark these tags ``special: false``; ``reasoning_tags_not_special`` makes a tokenizer folder do the same
(same ids, same encoding: only the decode-time flag changes). ``check_tokenizer`` refuses a tokenizer whose vocab,
EOS or pad disagree with the model's ``config.json``, or whose chat template does not render the layout SFT trained
on (``chat_segments``), token for token."""
from __future__ import annotations

import json
from pathlib import Path

REASONING_TAGS = ("<think>", "</think>")


def reasoning_tags_not_special(folder: str | Path) -> list[str]:
    """Rewrite ``folder``'s tokenizer files so the reasoning tags are plain added tokens; returns what changed."""
    folder, changed = Path(folder), []
    tj = folder / "tokenizer.json"
    if tj.exists():
        d, before = json.loads(tj.read_text()), len(changed)
        for t in d.get("added_tokens", []):
            if t.get("content") in REASONING_TAGS and t.get("special"):
                t["special"] = False
                changed.append(f"tokenizer.json: {t['content']}")
        if len(changed) > before:  # (a tokenizer that already fits is left byte for byte as it was)
            tj.write_text(json.dumps(d, ensure_ascii=False, indent=2))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if not f.exists():
            continue
        d, before = json.loads(f.read_text()), len(changed)
        for t in (d.get("added_tokens_decoder") or {}).values():
            if t.get("content") in REASONING_TAGS and t.get("special"):
                t["special"] = False
                changed.append(f"{name}: {t['content']}")
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(d.get(key), list):
                keep = [t for t in d[key] if (t.get("content") if isinstance(t, dict) else t) not in REASONING_TAGS]
                if len(keep) != len(d[key]):
                    d[key] = keep
                    changed.append(f"{name}: {key}")
        if len(changed) > before:
            f.write_text(json.dumps(d, ensure_ascii=False, indent=2))
    return changed


def training_chat_template(folder: str | Path) -> list[str]:
    """Make ``folder``'s chat template the one SFT's layout (``chat_segments``) was rendered with; returns what
    changed (nothing when it already was)."""
    from .tiny import CHAT_TEMPLATE

    folder, changed = Path(folder), []
    jinja = folder / "chat_template.jinja"
    if not jinja.exists() or jinja.read_text() != CHAT_TEMPLATE:
        changed.append("chat_template.jinja: the training layout's template" + (" (was another)" if jinja.exists()
                                                                                 else ""))
        jinja.write_text(CHAT_TEMPLATE)
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        d = json.loads(cfg.read_text())
        if d.pop("chat_template", None) is not None:  # (it would be read instead of the file above)
            cfg.write_text(json.dumps(d, ensure_ascii=False, indent=2))
            changed.append("tokenizer_config.json: chat_template (moved to chat_template.jinja)")
    return changed


def check_tokenizer(folder: str | Path, config: dict) -> None:
    """Refuse (ValueError naming the field) a tokenizer that does not fit the model ``config``."""
    from transformers import AutoTokenizer

    from .tiny import chat_segments

    tok = AutoTokenizer.from_pretrained(str(folder))
    where = f"tokenizer {folder}"
    vocab = int(config["vocab_size"])
    if not 0.9 * vocab <= len(tok) <= vocab:  # (a model's vocab is its tokenizer's, padded to a multiple)
        raise ValueError(f"{where}: {len(tok)} tokens for a model whose vocab_size is {vocab}: a tokenizer of "
                         "another model (pass the one it was trained with: --tokenizer DIR)")
    eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    if tok.eos_token_id not in eos:
        raise ValueError(f"{where}: eos_token_id {tok.eos_token_id} ({tok.eos_token!r}) is not the model's "
                         f"eos_token_id {config.get('eos_token_id')}")
    pad = config.get("pad_token_id")
    if pad is not None and tok.pad_token_id is not None and tok.pad_token_id != pad:
        raise ValueError(f"{where}: pad_token_id {tok.pad_token_id} is not the model's pad_token_id {pad}")
    for tag in REASONING_TAGS:
        ids = tok.encode(f"{tag}x", add_special_tokens=False)
        if tag not in tok.decode(ids, skip_special_tokens=True):
            raise ValueError(f"{where}: {tag} is a special token: SGLang's default decoding drops it and its "
                             "reasoning parser then puts the whole reply in reasoning_content (run "
                             "megatron_ring.tokenizer.serving_check.reasoning_tags_not_special on the folder)")
    if tok.chat_template:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "<think>\n2 + 2 = 4\n</think>\n\\boxed{4}"},
                {"role": "user", "content": "And 3 + 3?"}]
        for msgs in (chat[1:2], chat):
            trained = [i for text, _ in chat_segments(msgs) for i in tok.encode(text, add_special_tokens=False)]
            served = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False, return_dict=False)
            if served != trained:
                raise ValueError(f"{where}: its chat template renders a {len(msgs)}-message chat as other tokens "
                                 f"than SFT trained on ({len(served)} vs {len(trained)} ids): serving prompts would "
                                 "differ from training")


def check_tokenizer_source(src: str | Path, config: dict) -> None:
    """``check_tokenizer`` on what an export will ship from ``src``: a copy with the reasoning tags made plain
    (before any weight is converted: a mismatch is refused in seconds, not after the conversion)."""
    import tempfile

    from ..convert.hf_io import ship_tokenizer

    with tempfile.TemporaryDirectory(prefix="tokenizer-check-") as d:
        ship_tokenizer(src, d)
        check_tokenizer(d, config)
