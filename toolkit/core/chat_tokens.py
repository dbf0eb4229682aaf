"""The one rule for a chat model's special tokens: which token ends a turn, and which one pads.

Generation stops on the EOS, training teaches the model to emit the EOS, and llama.cpp stops on
the GGUF's EOS: all three must be the token the chat template ends a turn with. Padding needs an
id of its own, because masking padding out of the loss must never mask the EOS the model has to
learn. Model loading, training and export all call these functions; none restates the rule.
"""

from __future__ import annotations

from toolkit.core.errors import UserError


def end_of_turn_token(tok) -> str:
    """The token a chat reply ends with: `<|im_end|>` for ChatML templates, else the EOS."""
    if "<|im_end|>" in (tok.chat_template or "") and "<|im_end|>" in tok.get_vocab():
        return "<|im_end|>"
    return tok.eos_token


_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>", "<|reserved_special_token_0|>")


def fix_chat_special_tokens(tok) -> None:
    """Make the end-of-turn token the EOS, so generation, training (which learns to emit EOS)
    and llama.cpp (which stops on the GGUF's EOS) agree; and give padding an id of its own,
    because masking padding must never mask the EOS the model has to learn."""
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
