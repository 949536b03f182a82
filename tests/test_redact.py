"""The redactor on its own: secrets by value and by shape, URLs, and log records."""

from __future__ import annotations

import io
import logging
from urllib.parse import quote, quote_plus

import pytest
from pydantic import SecretStr

from core.redact import MARK, RedactingFilter, Redactor, public_url, url_secrets

# One credential of each shape providers hand out; none of them is real.
SHAPED = {
    "openai": "sk-proj-4fGh8JkLmN0pQrStUvWxYz12_aBcDeFgHiJ-kLmNoPqR",
    "openai-masked": "sk-pr****PqR1",
    "anthropic": "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt",
    "groq": "gsk_8sd7F6g5H4j3K2l1ZxCvBnMqWeRtYuIoPaSdFgHjKlZxCvBnM",
    "huggingface": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "xai": "xai-Zx9Cv8Bn7Mq6We5Rt4Yu3Io2Pa1Sd",
    "google": "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW",
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzd2l0Y2hib2FyZCJ9.Zm9vYmFyYmF6cXV4",
    "azure": "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c",
    "azure-new": "3kJ8mN2pQ5rS7tU9vW1xY4zA6bC8dE0fG2hI4jK6lM8nO0pQ2rS4tU6vW8xY0zA2bC4dE6fG8hI0jK2lM4nO6pQ",
    "base64": "dGhpcyBpcyBhIHNoYXJlZCBzZWNyZXQgZm9yIHRlc3Rpbmc+/w==",
    "github": "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
}


@pytest.mark.parametrize("kind", sorted(SHAPED))
def test_every_key_shape_goes_without_being_told(kind: str) -> None:
    key = SHAPED[kind]
    text = f"Incorrect API key provided: {key}. ({key!r}; {{'key': '{key}'}})"
    scrubbed = Redactor()(text)
    assert key not in scrubbed and MARK in scrubbed
    assert scrubbed.startswith("Incorrect API key provided: ")


def test_credentials_in_urls_headers_and_queries_go() -> None:
    redact = Redactor()
    cases = {
        "postgresql://bot:hunter22@db:5432/sb": "postgresql://bot:[redacted]@db:5432/sb",
        "https://tok3nUser@proxy.example/v1": "https://[redacted]@proxy.example/v1",
        "GET https://h.example/v1/x?api-key=abc123&api-version=2024-10-21": (
            "GET https://h.example/v1/x?api-key=[redacted]&api-version=2024-10-21"
        ),
        "see https://h.example/?key=k1k1k1&token=t2t2&sig=s3%2Fs3 now": (
            "see https://h.example/?key=[redacted]&token=[redacted]&sig=[redacted] now"
        ),
        "Authorization: Bearer abc.def-ghi.jkl": "Authorization: Bearer [redacted]",
        'headers {"api-key": "0a1b2c3d"}': 'headers {"api-key": "[redacted]"}',
        "password=letmein1 host=db": "password=[redacted] host=db",
    }
    for text, expected in cases.items():
        assert redact(text) == expected


def test_ordinary_text_is_left_alone() -> None:
    redact = Redactor()
    texts = [
        "main refused the request (HTTP 400: Invalid request.).",
        "Model 'gpt' needs an API key: set OPENAI_API_KEY.",
        "api_key_env must be the NAME of an environment variable, not the key itself",
        "main is unreachable (connection refused at http://127.0.0.1:9/v1/chat/completions).",
        "tiny-then-big's context window; gpt-4o-mini; smollm2-135m-instruct; api-version=2024-10-21",
        "/work/data/chroma/switchboard-guild-1234/collection.sqlite3 took 12 ms",
        "Discord message 1234567890123456789012345678901234567 (digits only)",
        "the bearer of bad news",
    ]
    for text in texts:
        assert redact(text) == text


def test_secrets_it_is_told_go_in_every_form_and_short_ones_are_ignored() -> None:
    odd = "Tr0ub4dor&3!correct horse"  # no known shape: only its value gives it away
    redact = Redactor([odd, SecretStr("another-Secret-42"), None, "", "abc"])
    text = f"a {odd} b {quote(odd, safe='')} c {quote_plus(odd)} d another-Secret-42 e abc"
    assert redact(text) == f"a {MARK} b {MARK} c {MARK} d {MARK} e abc"
    assert redact(redact(text)) == redact(text)  # scrubbing twice changes nothing more


def test_the_longest_secret_goes_whole() -> None:
    redact = Redactor(["secret-one", "secret-one-and-more"])
    assert redact("x secret-one-and-more y") == f"x {MARK} y"


def test_url_secrets_and_public_url() -> None:
    url = "https://bob:s3cr%40t@h.example:8443/v1?api-key=abc&api-version=2024&sig=x%2Fy"
    assert url_secrets(url) == ["s3cr@t", "abc", "x/y"]
    assert url_secrets("https://only-a-token@h.example/v1") == ["only-a-token"]
    assert url_secrets("http://localhost:11434/v1") == []
    assert public_url(url) == (
        "https://bob:[redacted]@h.example:8443/v1?api-key=[redacted]&api-version=2024&sig=[redacted]"
    )
    assert public_url("https://only-a-token@h.example/v1") == "https://[redacted]@h.example/v1"
    assert public_url("http://localhost:11434/v1") == "http://localhost:11434/v1"
    redact = Redactor()
    redact.add_url(url)
    assert redact("user s3cr@t and s3cr%40t") == f"user {MARK} and {MARK}"


def test_log_records_are_scrubbed_message_arguments_and_traceback() -> None:
    key = "custom-key-of-no-known-shape"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor([key])))
    log = logging.getLogger("tests.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("sent %s with %r", key, {"auth": f"Bearer {SHAPED['openai']}"})
        try:
            raise RuntimeError(f"provider said: {key} / {SHAPED['groq']}")
        except RuntimeError:
            log.exception("it failed for %s", key)
        log.warning("a format %s %s that does not fit", key)  # one argument short
    finally:
        log.removeHandler(handler)
        log.propagate = True
    written = stream.getvalue()
    assert key not in written and SHAPED["openai"] not in written and SHAPED["groq"] not in written
    assert "Traceback" in written and "RuntimeError: provider said: [redacted]" in written
    assert written.count(MARK) >= 5
