"""The one rule for a chat model's special tokens: which token ends a turn, and which one pads.

Generation stops on the EOS, training teaches the model to emit the EOS, and llama.cpp stops on
the GGUF's EOS: all three must be the token the chat template ends a turn with. Padding needs an
id of its own, because masking padding out of the loss must never mask the EOS the model has to
learn. Model loading, training and export all call these functions; none restates the rule.
"""

from __future__ import annotations

from toolkit.core.chat_templates import ensure_chat_template
from toolkit.core.errors import UserError


_PROBE_USER, _PROBE_REPLY = "USER_5e1c", "REPLY_5e1c"


def special_tokens(tok) -> list[str]:
    """Every special token string: the named ones and the added tokens marked special (Llama-3's
    `<|eot_id|>`, Gemma's `<end_of_turn>` are the latter)."""
    specials = set(tok.all_special_tokens)
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    return [s for s in specials if s]


def end_of_turn_token(tok) -> str:
    """The token a chat reply ends with, read off the chat template: the first special token the
    template writes after an assistant turn's content (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`,
    Gemma `<end_of_turn>`). Without a template, or when the template closes the turn with plain
    text, it is the EOS."""
    if not getattr(tok, "chat_template", None):
        return tok.eos_token
    msgs = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the probe (Jinja raise_exception, ...)
        return tok.eos_token
    if not isinstance(text, str) or _PROBE_REPLY not in text:
        return tok.eos_token
    after = text[text.index(_PROBE_REPLY) + len(_PROBE_REPLY):]
    found = [(after.find(s), -len(s), s) for s in special_tokens(tok) if s in after]
    return min(found)[2] if found else tok.eos_token


_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>", "<|reserved_special_token_0|>")


def fix_chat_special_tokens(tok) -> None:
    """Make the end-of-turn token the EOS, so generation, training (which learns to emit EOS)
    and llama.cpp (which stops on the GGUF's EOS) agree; and give padding an id of its own,
    because masking padding must never mask the EOS the model has to learn. A Llama-3 tokenizer
    without a chat template gets Meta's first (`ensure_chat_template`)."""
    ensure_chat_template(tok)
    tok.eos_token = end_of_turn_token(tok)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        for cand in _PAD_CANDIDATES:
            if cand in tok.get_vocab() and tok.convert_tokens_to_ids(cand) != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            raise UserError("the tokenizer has no token usable as padding distinct from EOS")


def sync_special_ids(model, tok) -> None:
    """Copy the tokenizer's EOS / pad ids into the model's config and generation config."""
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.eos_token_id = tok.eos_token_id
        gc.pad_token_id = tok.pad_token_id
