"""Redaction for exports, property-based: what looks personal never survives; prose is untouched.

The checks here are independent of the exporter's own: the WHATWG form's e-mail pattern,
`phonenumbers` at its loosest useful leniency, and `core.redact`'s credential shapes.
"""

from __future__ import annotations

import re
import string

import phonenumbers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.redact import may_hold_credential, scrub_patterns
from store.export.redact import PersonalData

EMAIL = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
)
PLACEHOLDER = re.compile(r"<(?:USER|ROLE|CHANNEL|INVITE|URL|EMAIL|SECRET|ID|PHONE)>")

# Words that announce a credential ("Bearer", "password") are not ordinary prose: what
# follows them is taken for the secret.
ANNOUNCING = {"bearer", "password", "authorization", "apikey", "accesstoken", "clientsecret"}
words = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12).filter(
    lambda word: word.lower() not in ANNOUNCING
)
prose = st.lists(
    st.tuples(words, st.sampled_from(["", ",", ".", "!", "?"])), min_size=1, max_size=30
).map(lambda pieces: " ".join(word + mark for word, mark in pieces))
emails = st.emails()
phones = st.builds(
    lambda area, exchange, line, style: style.format(a=area, e=exchange, n=line),
    st.integers(201, 989),
    st.integers(200, 999),
    st.integers(0, 9999),
    st.sampled_from(
        ["({a}) {e}-{n:04d}", "{a}-{e}-{n:04d}", "+1 {a} {e} {n:04d}", "{a}.{e}.{n:04d}"]
    ),
) | st.sampled_from(["+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00", "+81 3-1234-5678"])
keys = st.sampled_from(
    [
        "sk-proj-{x}",
        "sk-ant-api03-{x}",
        "gsk_{x}",
        "hf_{x}",
        "ghp_{x}{x}",
        "xoxb-{x}",
        "AKIAABCDEFGHIJKLMNOP",
        "Bearer {x}",
        "api_key={x}",
        "password: {x}",
        "https://user:{x}@example.com/",
        "https://example.com/hook?token={x}",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.{x}",
        "{x}{x}{x}",
    ]
).flatmap(
    lambda shape: (
        st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=20)
        .filter(lambda x: any(c.isdigit() for c in x) and any(c.isalpha() for c in x))
        .map(lambda x: shape.format(x=x))
    )
)
mentions = st.integers(10**16, 10**19).flatmap(
    lambda n: st.sampled_from([f"<@{n}>", f"<@!{n}>", f"<@&{n}>", f"<#{n}>", f"id {n}"])
)
personal = st.one_of(emails, phones, keys, mentions)
mixed = st.lists(st.one_of(prose, personal), min_size=1, max_size=8).map(" ".join)


def survivors(text: str) -> list[str]:
    """What in `text` still looks personal to the independent checks (placeholders aside)."""
    bare = PLACEHOLDER.sub(" ", text)
    found = [m[0] for m in EMAIL.finditer(bare)]
    found += [
        m.raw_string
        for m in phonenumbers.PhoneNumberMatcher(
            bare, "US", leniency=phonenumbers.Leniency.POSSIBLE
        )
    ]
    if scrub_patterns(bare, " ") != bare:
        found.append(f"a credential in {bare!r}")
    found += re.findall(r"<[@#][!&]?\d+>|(?<!\d)\d{17,20}(?!\d)", bare)
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed)
def test_nothing_that_looks_personal_survives(text: str) -> None:
    scrub = PersonalData()
    cleaned = scrub(text)
    # Either nothing is left, or the exporter's own check finds it and leaves it out.
    assert not survivors(cleaned) or scrub.find(cleaned) is not None


@settings(max_examples=300, deadline=None)
@given(personal)
def test_each_kind_is_replaced_by_a_placeholder(text: str) -> None:
    assert survivors(text), "the independent checks see it before redaction"
    cleaned = PersonalData()(text)
    assert cleaned != text and PLACEHOLDER.search(cleaned)
    assert not survivors(cleaned)


@settings(max_examples=500, deadline=None)
@given(prose)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert PersonalData()(text) == text


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), mixed, keys))
def test_the_cheap_test_never_misses_a_credential(text: str) -> None:
    # The export skips the pattern pass when may_hold_credential says no: it must never
    # say no to a text the patterns would change.
    if scrub_patterns(text) != text:
        assert may_hold_credential(text)


def test_names_the_log_knows_go_as_whole_words_in_any_case() -> None:
    scrub = PersonalData(["Ada Lovelace", "bob", "User", "al"])
    assert scrub("ADA LOVELACE met Bob, bobby and al; <USER> stays") == (
        "<USER> met <USER>, bobby and al; <USER> stays"
    )  # "al" is too short to be told from a word
    assert scrub.find("bobby said hi") is None
    assert scrub.find("bob said hi") == "name"
