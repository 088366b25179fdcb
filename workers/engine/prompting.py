"""Prompt text -> token ids, with or without the model's chat template."""

from __future__ import annotations


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return _as_ids(ids)
    return list(tokenizer.encode(text))


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _as_ids(ids) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returns a list
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    return [int(i) for i in ids]
