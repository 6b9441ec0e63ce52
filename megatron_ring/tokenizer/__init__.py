from .tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer, chat_segments, load_tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_tokenizer", "chat_segments", "load_tokenizer"]
