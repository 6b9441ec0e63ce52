from megatron_ring.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer


def test_tiny_tokenizer_chat_template_and_padding(tmp_path):
    tok = build_tiny_tokenizer(512, tmp_path)
    assert len(tok) == 512  # padded to the model's vocab
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 + 25?"},
            {"role": "assistant", "content": "<think>7 + 5 = 12, carry 1</think> \\boxed{42}"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<role>SYSTEM</role>Be brief.<role>HUMAN</role>What is 17 + 25?<role>ASSISTANT</role>"
                    "<think>7 + 5 = 12, carry 1</think> \\boxed{42}<|endoftext|>")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    for special in ("<role>", "</role>", "<think>", "</think>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(special) in ids  # one id each, never split
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<role>ASSISTANT</role>")
    again = load_tokenizer(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token_id == 1 and again.pad_token_id == 1
    assert again.decode([511]) != ""  # a padded id decodes to something
