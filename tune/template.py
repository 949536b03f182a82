"""The training chat template: the GGUF's own template, with `{% generation %}` around answers.

TRL's `assistant_only_loss` learns only from the tokens inside `{% generation %}` ...
`{% endgeneration %}`; GGUF chat templates never have those tags. A training template is
only usable if it renders every conversation exactly as the GGUF's own template does
(that is what llama.cpp renders when the model is served), so each candidate is checked
on probe conversations and the first that matches is used:

1. the GGUF's template, if it already has the tags;
2. TRL's own training version of it (`trl.chat_template_utils.get_training_chat_template`,
   which knows Llama 3, Qwen, Gemma, Phi and more);
3. a ChatML template (`<|im_start|>role ... <|im_end|>`, SmolLM2's and many others'), with
   the default system prompt the GGUF's template inserts, if any.

This module imports jinja lazily through the tokenizer; it runs in the worker process.
"""

from __future__ import annotations

import re
from typing import Any

from tune.errors import BaseNotLoadable

# Conversations the candidates must render byte for byte like the original.
PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 1 2 3"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course.\nAnything else?"},
    ],
    [{"role": "user", "content": "Only a question"}],
)

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"^<\|im_start\|>system\n(?P<system>.*?)<\|im_end\|>\n<\|im_start\|>user\nHi there<\|im_end\|>\n",
    re.S,
)


def chatml_training_template(default_system: str | None) -> str:
    """A ChatML template with generation tags; `default_system` goes first when a chat has none."""
    default = ""
    if default_system is not None:
        quoted = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        default = (
            "{%- if loop.first and messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + quoted + "<|im_end|>\\n' }}"
            "{%- endif -%}"
        )
    return (
        "{%- for message in messages -%}" + default + "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
        "{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    )


def renders_like(tokenizer: Any, candidate: str, original: str) -> bool:
    """Whether `candidate` renders every probe (with and without a generation prompt) like `original`."""
    try:
        for messages in PROBES:
            for prompt in (False, True):
                if _render(tokenizer, candidate, messages, prompt) != _render(
                    tokenizer, original, messages, prompt
                ):
                    return False
    except Exception:  # a template that cannot render a probe is simply not this one
        return False
    return True


def training_template(tokenizer: Any) -> tuple[str, str]:
    """The training template for the tokenizer's (the GGUF's) template, and where it came from."""
    original = tokenizer.chat_template
    if isinstance(original, dict):
        original = original.get("default")
    if not isinstance(original, str) or not original.strip():
        raise BaseNotLoadable(
            "This GGUF has no chat template (tokenizer.chat_template), so there is no way to "
            "know how its conversations look; use an instruct (chat) model."
        )
    candidates: list[tuple[str, str]] = []
    if _GENERATION.search(original):
        candidates.append((original, "gguf"))
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tokenizer)
        if patched:
            candidates.append((patched, "trl"))
    except ValueError:
        pass  # TRL does not know this template
    if "<|im_start|>" in original:
        probe = _render(tokenizer, original, list(PROBES[0]), False)
        match = _CHATML_DEFAULT_SYSTEM.match(probe)
        default = match.group("system") if match else None
        candidates.append((chatml_training_template(default), "chatml"))
    for candidate, source in candidates:
        if renders_like(tokenizer, candidate, original):
            return candidate, source
    raise BaseNotLoadable(
        "Switchboard does not know how to mark the answers in this model's chat template for "
        "training (it is not ChatML and TRL has no training version of it); choose a base "
        "with a ChatML, Llama 3, Qwen, Gemma or Phi template."
    )
