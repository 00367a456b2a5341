"""Chat templates a config may name in ``chat_template:`` (Jinja, rendered as transformers renders a
tokenizer's template: ``trim_blocks`` and ``lstrip_blocks`` on).

Each renders a conversation the same way as the template of that name that mergekit ships.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["BUILTIN", "is_inline", "most_common"]

_ALPACA_TURN = """\
{{ text|trim -}}
{% if not loop.last %}


{% endif %}
"""

BUILTIN: dict[str, str] = {
    "alpaca": (
        "{% set system = messages|selectattr('role', 'equalto', 'system')|list %}"
        "{{ (system|last).content|trim if system else '' }}\n"
        "\n"
        "{% for message in messages %}\n"
        "{% set text = message['content'] %}\n"
        "{% if message['role'] == 'user' %}\n"
        "### Instruction:\n" + _ALPACA_TURN + "{% elif message['role'] == 'assistant' %}\n"
        "### Response:\n" + _ALPACA_TURN + "{% elif message['role'] == 'user_context' %}\n"
        "### Input:\n" + _ALPACA_TURN + "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n"
        "### Response:\n"
        "{% endif %}\n"
    ),
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    "exaone": (
        # every turn's pieces keep the indentation and line breaks between them
        "{% for m in messages %}\n"
        "{% if loop.first and m['role'] != 'system' %}\n"
        "        {{ '[|system|][|endofturn|]\\n' }}\n"
        "{% endif %}\n"
        "    {{ '[|' + m['role'] + '|]' + m['content'] }}\n"
        "{% if m['role'] == 'user' %}\n"
        "        {{ '\\n' }}\n"
        "{% else %}\n"
        "        {{ '[|endofturn|]\\n' }}\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "    {{ '[|assistant|]' }}\n"
        "{% endif %}\n"
    ),
    "llama3": (
        "{% for m in messages %}\n"
        "{% set turn = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content']|trim + '<|eot_id|>' %}\n"
        "{{ (bos_token + turn) if loop.first else turn }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "{%- set system_message = messages[0]['content'] -%}\n"
        "{%- set turns = messages[1:] -%}\n"
        "{%- else -%}\n"
        "{%- set turns = messages -%}\n"
        "{%- endif -%}\n"
        "{{- bos_token -}}\n"
        "{%- for m in turns -%}\n"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}\n"
        "{%- endif -%}\n"
        "{%- if m['role'] == 'user' and loop.first and system_message is defined -%}\n"
        "{{- ' [INST] ' + system_message + '\\n\\n' + m['content'] + ' [/INST]' -}}\n"
        "{%- elif m['role'] == 'user' -%}\n"
        "{{- ' [INST] ' + m['content'] + ' [/INST]' -}}\n"
        "{%- elif m['role'] == 'assistant' -%}\n"
        "{{- ' ' + m['content'] + eos_token -}}\n"
        "{%- else -%}\n"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    ),
}


def is_inline(text: str) -> bool:
    """Whether ``chat_template`` text is a Jinja template itself: it holds a ``{`` and is 20
    characters or more (shorter text, or text without one, must be a built-in template's name)."""
    return "{" in text and len(text) >= 20


def most_common(templates: Sequence[str]) -> str | None:
    """The template found most often among the inputs' (compared without surrounding white space);
    on a tie, the one met first. None when no input has one."""
    if not templates:
        return None
    return Counter(t.strip() for t in templates).most_common(1)[0][0]
