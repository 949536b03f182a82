"""The five formats: how an example is built from a conversation, and the rules each keeps.

- openai-chat (OpenAI chat fine-tuning): `{"messages": [...]}`; system first if any, then
  the conversation as it was sent, ending with the answer trained on (`"weight": 1`);
  earlier assistant turns carry `"weight": 0`, so only the answer that qualified is
  trained on (each earlier answer that qualifies is an example of its own).
- openai-dpo (OpenAI preference fine-tuning): `{"input": {"messages": [...]},
  "preferred_output": [assistant], "non_preferred_output": [assistant]}`.
- sft (TRL SFTTrainer, conversational language modelling): `{"messages": [...]}`.
- dpo (TRL DPOTrainer, conversational preference): `{"prompt": [...], "chosen":
  [assistant], "rejected": [assistant]}`.
- kto (TRL KTOTrainer, conversational unpaired preference): `{"prompt": [...],
  "completion": [assistant], "label": true | false}`.

`problem(example, format)` checks one example against its format's rules (the keys, the
roles and their order, non-empty text, weights 0 or 1 on assistant turns only, at least
one assistant message); the export checks every example before it is written and every
line again once the file is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from store.export.options import Format

Messages = list[dict[str, Any]]

ROLES = frozenset({"system", "user", "assistant"})
TOP_KEYS: dict[Format, frozenset[str]] = {
    "openai-chat": frozenset({"messages"}),
    "openai-dpo": frozenset({"input", "preferred_output", "non_preferred_output"}),
    "sft": frozenset({"messages"}),
    "dpo": frozenset({"prompt", "chosen", "rejected"}),
    "kto": frozenset({"prompt", "completion", "label"}),
}
_MESSAGE_KEYS = frozenset({"role", "content"})
_WEIGHTED_KEYS = frozenset({"role", "content", "weight"})


def text_of(content: Any) -> str:
    """A message's text, whether a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            block
            if isinstance(block, str)
            else str(block.get("text", ""))
            if isinstance(block, Mapping)
            else ""
            for block in content
        )
    return "" if content is None else str(content)


def context(
    sent: Sequence[Mapping[str, Any]] | None,
    *,
    system_prompt: str | None,
    question: str | None,
    with_context: bool,
) -> Messages | None:
    """The conversation up to the answer, as `{"role", "content"}` messages; None if unknown.

    `sent` is what the model was sent (the system prompt, the history, the question).
    Without `with_context`, the retrieved passages go: the system prompt is the place's own
    (`system_prompt`: without the instructions about references) and the question is the
    person's own text (`question`), as they wrote it.
    """
    if not sent:
        return None
    messages: Messages = [
        {"role": str(m.get("role", "")), "content": text_of(m.get("content"))} for m in sent
    ]
    if not with_context:
        if messages[0]["role"] == "system":
            own = (system_prompt or "").strip()
            if own:
                messages[0] = {"role": "system", "content": own}
            else:
                messages.pop(0)
        if messages and messages[-1]["role"] == "user" and question is not None:
            messages[-1] = {"role": "user", "content": question}
    return messages


def assistant(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def chat_example(fmt: Format, prompt: Messages, target: str) -> dict[str, Any]:
    """An openai-chat or sft example: the conversation, then the answer trained on."""
    if fmt == "openai-chat":
        weighted = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
        return {"messages": [*weighted, {"role": "assistant", "content": target, "weight": 1}]}
    return {"messages": [*prompt, assistant(target)]}


def pair_example(fmt: Format, prompt: Messages, chosen: str, rejected: str) -> dict[str, Any]:
    """An openai-dpo or dpo example: the conversation, the preferred and the other answer."""
    if fmt == "openai-dpo":
        return {
            "input": {"messages": prompt},
            "preferred_output": [assistant(chosen)],
            "non_preferred_output": [assistant(rejected)],
        }
    return {"prompt": prompt, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


def kto_example(prompt: Messages, completion: str, label: bool) -> dict[str, Any]:
    return {"prompt": prompt, "completion": [assistant(completion)], "label": label}


def _messages_problem(
    messages: Any, *, ends_with: str, weights: bool = False, what: str = "messages"
) -> str | None:
    """What is wrong with a list of chat messages, or None.

    Roles are system, user and assistant; a system message comes first or not at all,
    and the first other message is the user's; every message has text; `weights`
    allows "weight" (0 or 1) on assistant messages, and then one of them must be 1.
    (Checked for every example twice, so written for speed.)
    """
    if type(messages) is not list or not messages:
        return f"{what} is not a non-empty list"
    trained = False
    for index, message in enumerate(messages):
        if type(message) is not dict:
            return f"{what}[{index}] is not an object"
        role = message.get("role")
        keys = message.keys()
        if weights and role == "assistant":
            if not keys <= _WEIGHTED_KEYS or "content" not in keys:
                return f"{what}[{index}] has keys {sorted(keys)}"
            weight = message.get("weight", 1)
            if type(weight) is not int or weight not in (0, 1):
                return f"{what}[{index}] has weight {weight!r} (only 0 or 1)"
            trained = trained or weight == 1
        elif len(keys) != 2 or "content" not in keys or role is None:
            return f"{what}[{index}] has keys {sorted(keys)}"
        if role not in ROLES:
            return f"{what}[{index}] has role {role!r}"
        if role == "system" and index:
            return f"{what}[{index}]: a system message comes first or not at all"
        content = message["content"]
        if type(content) is not str or not content or content.isspace():
            return f"{what}[{index}] has no text"
    if messages[-1]["role"] != ends_with:
        return f"{what} ends with {messages[-1]['role']}, not {ends_with}"
    if what == "messages" or what == "prompt":
        first = (
            messages[1] if messages[0]["role"] == "system" and len(messages) > 1 else messages[0]
        )
        if first["role"] != "user":
            return f"{what} starts with {first['role']}, not user"
    if weights and not trained:
        return f"{what} has no assistant message with weight 1"
    return None


def _answer_problem(messages: Any, what: str) -> str | None:
    """An output side: exactly one assistant message with text."""
    if not isinstance(messages, list) or len(messages) != 1:
        return f"{what} is not one message"
    return _messages_problem(messages, ends_with="assistant", what=what)


def problem(example: Any, fmt: Format) -> str | None:
    """What breaks the format's rules in `example`, or None when it keeps them all."""
    if not isinstance(example, dict):
        return "the line is not a JSON object"
    keys = set(example)
    if keys != TOP_KEYS[fmt]:
        return f"keys {sorted(keys)}, expected {sorted(TOP_KEYS[fmt])}"
    if fmt in ("openai-chat", "sft"):
        return _messages_problem(
            example["messages"], ends_with="assistant", weights=fmt == "openai-chat"
        )
    if fmt == "openai-dpo":
        inputs = example["input"]
        if not isinstance(inputs, dict) or set(inputs) != {"messages"}:
            return "input is not {messages}"
        sides: tuple[str, ...] = ("preferred_output", "non_preferred_output")
        prompt = inputs["messages"]
    elif fmt == "dpo":
        prompt, sides = example["prompt"], ("chosen", "rejected")
    else:
        prompt, sides = example["prompt"], ("completion",)
        if type(example["label"]) is not bool:
            return "label is not true or false"
    found = _messages_problem(prompt, ends_with="user", what="prompt")
    if found is not None:
        return found
    for side in sides:
        found = _answer_problem(example[side], side)
        if found is not None:
            return found
    if len(sides) == 2 and example[sides[0]][0]["content"] == example[sides[1]][0]["content"]:
        return f"{sides[0]} and {sides[1]} are the same answer"
    return None
