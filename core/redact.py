"""Secrets out of every text that leaves the process: shown, logged or stored.

A `Redactor` knows the secret VALUES this process holds (model keys, the embedding key,
the Discord token, passwords and secret query values inside URLs), added once at
start-up by the wiring (`bot.app.open_app`), and scrubs them, in their URL-encoded forms
too, from any text; then a pattern pass removes whatever looks like a credential it was
not told about (provider key prefixes, JWTs, Bearer tokens, long key-like strings,
`user:pass@` and `api-key=` in URLs). Provider error bodies often repeat the key they
were sent, so every failure message goes through one before anyone sees it.

    redact = Redactor(["sk-..."])
    redact.add_url("postgresql://bot:hunter22@db/switchboard")
    redact("got sk-... and hunter22")         # -> "got [redacted] and [redacted]"

`RedactingFilter` does the same for log records (message, arguments, traceback), and
`public_url` shows a URL with its credentials masked (`/model info`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit, urlunsplit

from pydantic import SecretStr

MARK = "[redacted]"
# Shorter values are not scrubbed by value: they would cut words out of every text, and
# are no secret anyway. The pattern pass still masks them inside URLs.
MIN_SECRET_CHARS = 4

# Words that make a URL query parameter (or a header-like `name: value`) a credential,
# matched against the parts of its name split at - _ . ("x-api-key", "access_token", "sig").
_SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "pass",
        "sig",
        "signature",
        "auth",
        "authorization",
        "credential",
        "credentials",
    }
)

# ...or ends in one ("sslpassword", "accesstoken", "subscriptionkey").
_SECRET_ENDINGS = ("key", "token", "secret", "password", "passwd", "signature")

# Credentials by shape. Each either replaces the whole match, or keeps the group `keep`
# (what names the secret) and replaces the rest.
_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        # OpenAI, Anthropic, DeepSeek (sk-, sk-proj-, sk-ant-), Stripe-style pk_/rk_, also
        # as providers echo them half-masked ("sk-ab****wxyz").
        r"\b(?:sk|pk|rk)[-_][A-Za-z0-9*_\-]{4,}",
        r"\bgsk_[A-Za-z0-9]{8,}",  # Groq
        r"\bhf_[A-Za-z0-9]{8,}",  # Hugging Face
        r"\bxai-[A-Za-z0-9]{8,}",  # xAI
        r"\bpplx-[A-Za-z0-9]{8,}",  # Perplexity
        r"\br8_[A-Za-z0-9]{8,}",  # Replicate
        r"\bAIza[0-9A-Za-z_\-]{20,}",  # Google
        r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",  # GitHub
        r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
        r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
        # "key-…" / "api_…" keys; the digit keeps words like api_key_env out.
        r"\b(?:key|api)[-_](?=[A-Za-z_\-]*\d)[A-Za-z0-9_\-]{8,}",
        # JWTs: base64url JSON header and payload ("eyJ" is '{"').
        r"\beyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*",
        r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9._~+/\-]{8,}=*",
        # Header-like "api-key: …", "Authorization: Basic …", "password=…".
        r"(?i)(?P<keep>\b(?:x-)?(?:api[-_]?key|authorization|access[-_]?token|client[-_]?secret|password)"
        r"[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+|token\s+)?+)[^\s\"',;&}\[\]]{4,}",
        # Padded base64 keys (Azure storage, shared secrets).
        r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{38,}={1,2}(?![A-Za-z0-9+/=])",
        # Long key-like strings with letters and digits: Azure's 32-hex keys, Mistral's, ...
        r"\b(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{32,}\b",
    )
)
# user:password@ (or a token as the user) in any URL.
_URL_USERINFO = re.compile(
    r"(?i)\b(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^\s/@:?#\[\]]*)(?P<password>:[^\s/@?#]*)?@"
)
# name=value in a URL's query (or anything shaped like one).
_QUERY_PAIR = re.compile(r"(?P<keep>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s\"'<>)]+)")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter or header of this name carries a credential."""
    parts = re.split(r"[-_.]", name.lower())
    return any(part in _SECRET_WORDS or part.endswith(_SECRET_ENDINGS) for part in parts)


def url_secrets(url: str | None) -> list[str]:
    """The secret values inside a URL: its password (or its user, when that is a token) and secret query values."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    if parts.password:
        found.append(unquote(parts.password))
    elif parts.username:
        found.append(unquote(parts.username))  # https://TOKEN@host: the user is the credential
    found.extend(
        value
        for name, value in parse_qsl(parts.query, keep_blank_values=False)
        if is_secret_name(name)
    )
    return found


def public_url(url: str) -> str:
    """`url` as it may be shown: its password (or token user) and secret query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub_patterns(url)
    netloc = parts.netloc
    userinfo, at, where = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MARK}@{where}" if colon else f"{MARK}@{where}"
    query = "&".join(
        f"{name}={MARK}" if sep and is_secret_name(unquote(name)) else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    return scrub_patterns(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def scrub_patterns(text: str, mark: str = MARK) -> str:
    """`text` without anything shaped like a credential (the pattern pass alone).

    `mark` replaces each one (the dataset export writes a typed placeholder instead).
    """
    if mark == MARK:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
        text = _QUERY_PAIR.sub(_mask_query_pair, text)
        for pattern in _PATTERNS:
            text = pattern.sub(_mask, text)
        return text
    text = _URL_USERINFO.sub(lambda m: _mask_userinfo(m, mark), text)
    text = _QUERY_PAIR.sub(lambda m: _mask_query_pair(m, mark), text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: _mask(m, mark), text)
    return text


# Something every credential shape above holds, looked for with plain substring searches
# in the lower-cased text: a text with none of them cannot match any pattern, so callers
# that scrub a lot of ordinary text (the dataset export) skip the pattern pass for it.
# Keep in step with _PATTERNS. Markers with a - or _ are only looked for when the text
# has one.
_SHAPE_MARKERS: tuple[str, ...] = (
    "://", "=",  # URLs with user:password@; name=value pairs; padded base64
    "aiza", "akia", "eyj", "bearer", "apikey", "authorization", "accesstoken",
    "clientsecret", "password",
)  # fmt: skip
_DASHED_MARKERS: tuple[str, ...] = (
    "sk-", "sk_", "pk-", "pk_", "rk-", "rk_", "hf_", "xai-", "pplx-", "r8_", "ghp_",
    "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "key-", "key_", "api-", "api_",
    "access-token", "access_token", "client-secret", "client_secret",
)  # fmt: skip
_LONG_TOKEN = re.compile(r"[A-Za-z0-9]{32}")
# The only characters that a case-insensitive pattern matches as an ASCII letter besides
# the letter itself (İ ı → i, ſ → s, K → k); str.lower() alone keeps them apart.
_ASCII_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def may_hold_credential(text: str) -> bool:
    """False only when `scrub_patterns` would surely leave `text` as it is (a cheap test)."""
    lower = (text if text.isascii() else text.translate(_ASCII_FOLD)).lower()
    for marker in _SHAPE_MARKERS:
        if marker in lower:
            return True
    if "-" in lower or "_" in lower:
        for marker in _DASHED_MARKERS:
            if marker in lower:
                return True
    return len(text) >= 32 and _LONG_TOKEN.search(text) is not None


class Redactor:
    """Scrubs the secrets it knows, then anything shaped like a credential, from text.

    Callable: `redact(text) -> text`. Values are added at start-up (`add`, `add_url`);
    adding later is safe while other threads scrub.
    """

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        self._values: set[str] = set()
        self._known: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self.add(*secrets)

    def add(self, *secrets: str | SecretStr | None) -> None:
        """Remember secret values (None, blank and very short ones are ignored)."""
        forms: set[str] = set()
        for secret in secrets:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            value = (value or "").strip()
            if len(value) < MIN_SECRET_CHARS:
                continue
            # As it is, and as it looks inside a URL or a form body.
            forms.update({value, quote(value, safe=""), quote_plus(value), unquote(value)})
        forms = {form for form in forms if len(form) >= MIN_SECRET_CHARS}
        with self._lock:
            if forms <= self._values:
                return
            self._values |= forms
            # Longest first, so that a secret containing another goes as a whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._known = re.compile("|".join(re.escape(v) for v in ordered))

    def add_url(self, *urls: str | None) -> None:
        """Remember the secrets inside URLs (see `url_secrets`)."""
        for url in urls:
            self.add(*url_secrets(url))

    def __call__(self, text: str) -> str:
        """`text` without the known secrets and without anything shaped like a credential."""
        if not text:
            return text
        known = self._known
        if known is not None:
            text = known.sub(MARK, text)
        return scrub_patterns(text)


def _mask(match: re.Match[str], mark: str = MARK) -> str:
    keep = match.groupdict().get("keep")
    return f"{keep}{mark}" if keep else mark


def _mask_userinfo(match: re.Match[str], mark: str = MARK) -> str:
    if match["password"] is None:
        return f"{match['scheme']}{mark}@"  # a lone user before @ is a token
    return f"{match['scheme']}{match['user']}:{mark}@"


def _mask_query_pair(match: re.Match[str], mark: str = MARK) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    return f"{match['keep']}{mark}"


class RedactingFilter(logging.Filter):
    """A logging filter (put it on handlers) that scrubs each record's message, arguments and traceback.

    The record is changed in place: every handler after this one sees the scrubbed text.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: keep both, scrubbed
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
