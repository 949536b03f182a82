"""Personal data out of exported text: typed placeholders, then a check that fails closed.

    scrub = PersonalData(names=["Ada Lovelace", "bob"])
    scrub("mail ada@example.com or ping <@123456789012345678>")
    # -> "mail <EMAIL> or ping <USER>"

What goes, in this order (each kind its placeholder): Discord mentions (<USER>, <ROLE>,
<CHANNEL>), invite links (<INVITE>), URLs that carry a credential (<URL>), e-mail
addresses (<EMAIL>), anything shaped like a key or token (<SECRET>, the shapes of
`core.redact`), raw Discord ids (<ID>), phone numbers (<PHONE>, found by `phonenumbers`:
US national numbers and international ones in any country's format, at its POSSIBLE
leniency, which keeps dates, versions and addresses), and the names of the server's
members that the log knows, as whole words in any case (<USER>).

`find` looks for all of it again (placeholders aside). The export runs it on every text
that changed and leaves out an example whose text still holds something, so a gap in one
pass (a pattern that a replacement made, a detector that failed) costs an example, never
a leak. Every pass is skipped when a cheap test shows it cannot match: most chat text
holds none of it, and exports are large.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import phonenumbers

from core.redact import may_hold_credential, scrub_patterns, url_secrets

PLACEHOLDER_KINDS: tuple[str, ...] = (
    "USER",
    "ROLE",
    "CHANNEL",
    "INVITE",
    "URL",
    "EMAIL",
    "SECRET",
    "ID",
    "PHONE",
)
PHONE_REGION = "US"  # how national numbers (no + prefix) are read
MIN_NAME_CHARS = 3  # shorter names would cut ordinary words out of every text

_MENTION = re.compile(r"<(@[!&]?|#)(\d+)>")
_MENTION_KIND = {"@": "USER", "@!": "USER", "@&": "ROLE", "#": "CHANNEL"}
_INVITE = re.compile(
    r"(?i)(?:https?://)?(?:www\.)?(?:discord(?:app)?\.com/invite|discord\.gg|discord\.me|"
    r"discord\.io)/[A-Za-z0-9\-]+"
)
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s<>\"'`]+")
# The token of a webhook is in its path, where url_secrets does not look.
_WEBHOOK = re.compile(r"(?i)/api(?:/v\d+)?/webhooks/\d+/")
# The WHATWG form's address, with a dot in the domain (as people write them).
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)+"
)
_RAW_ID = re.compile(r"(?<!\d)\d{17,20}(?!\d)")
# A phone number has at least 7 digits, with at most a few separators between them.
_PHONE_DIGITS = re.compile(r"\d(?:[^\d\n]{0,3}\d){6}")
_PLACEHOLDER = re.compile("<(?:" + "|".join(PLACEHOLDER_KINDS) + ")>")


class _Trie(dict[str, "_Trie"]):
    """Letters to the words that go on with them; the key "" marks a word's end."""


def _trie_pattern(words: Iterable[str]) -> str:
    """One regex alternation for many literal words, as a trie: quick however many there are."""
    trie = _Trie()
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, _Trie())
        node[""] = _Trie()

    def pattern(node: _Trie) -> str:
        ends = "" in node
        branches = [
            re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char
        ]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and not ends else "(?:" + "|".join(branches) + ")"
        return body + "?" if ends else body

    return pattern(trie)


def name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A regex for these names as whole words, in any case; None when none is long enough."""
    # As written: (?i) matches each character in any case (str.lower() would turn some
    # letters into two characters that no longer match the name as written).
    kept = sorted(
        {
            name.strip()
            for name in names
            if len(name.strip()) >= MIN_NAME_CHARS and re.search(r"\w", name)
        }
    )
    if not kept:
        return None
    return re.compile(r"(?i)(?<!\w)" + _trie_pattern(kept) + r"(?!\w)")


class PersonalData:
    """Replaces personal data in text with typed placeholders; `find` checks what is left.

    Callable: `scrub(text) -> text`; `scrub.scrub(text)` also says how many placeholders
    of each kind it wrote.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = name_pattern(names)
        self._found: dict[str, int] = {}

    def __call__(self, text: str) -> str:
        return self.scrub(text)[0]

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with its personal data replaced, and {kind: placeholders written}."""
        found: dict[str, int] = {}
        self._found = found
        if not text:
            return text, found
        if "<" in text:
            text = _MENTION.sub(self._mention, text)
        if "discord" in text.lower():
            text, n = _INVITE.subn("<INVITE>", text)
            self._add("INVITE", n)
        if "://" in text:
            text = _URL.sub(self._url, text)
        if "@" in text:
            text, n = _EMAIL.subn("<EMAIL>", text)
            self._add("EMAIL", n)
        if may_hold_credential(text):
            scrubbed = scrub_patterns(text, "<SECRET>")
            if scrubbed != text:
                self._add("SECRET", scrubbed.count("<SECRET>") - text.count("<SECRET>"))
                text = scrubbed
        if _PHONE_DIGITS.search(text):  # raw ids have 17 digits and more
            text, n = _RAW_ID.subn("<ID>", text)
            self._add("ID", n)
            phones = _phones(text)
            for start, end in reversed(phones):
                text = f"{text[:start]}<PHONE>{text[end:]}"
            self._add("PHONE", len(phones))
        if self.names is not None:
            text = self.names.sub(self._name, text)
        return text, found

    def _add(self, kind: str, n: int) -> None:
        if n:
            self._found[kind] = self._found.get(kind, 0) + n

    def _mention(self, match: re.Match[str]) -> str:
        kind = _MENTION_KIND[match[1]]
        self._add(kind, 1)
        return f"<{kind}>"

    def _url(self, match: re.Match[str]) -> str:
        if not _url_has_secret(match[0]):
            return match[0]
        self._add("URL", 1)
        return "<URL>"

    def _name(self, match: re.Match[str]) -> str:
        if _inside_placeholder(match):  # a member called "User" leaves "<USER>" alone
            return match[0]
        self._add("USER", 1)
        return "<USER>"

    def find(self, text: str) -> str | None:
        """The kind of personal data still in `text` (placeholders aside), or None."""
        if not text:
            return None
        bare = _PLACEHOLDER.sub(" ", text)
        if _MENTION.search(bare):
            return "mention"
        if _INVITE.search(bare):
            return "invite"
        if any(_url_has_secret(m[0]) for m in _URL.finditer(bare)):
            return "url"
        if _EMAIL.search(bare):
            return "email"
        if may_hold_credential(bare) and scrub_patterns(bare, " ") != bare:
            return "secret"
        if _RAW_ID.search(bare):
            return "id"
        if _PHONE_DIGITS.search(bare) and _phones(bare):
            return "phone"
        if self.names is not None and self.names.search(bare):
            return "name"
        return None


def _inside_placeholder(match: re.Match[str]) -> bool:
    text, start, end = match.string, match.start(), match.end()
    return (
        start > 0
        and text[start - 1] == "<"
        and text[end : end + 1] == ">"
        and match[0].upper() in PLACEHOLDER_KINDS
    )


def _url_has_secret(url: str) -> bool:
    return bool(url_secrets(url)) or "@" in url.split("/", 3)[2] or bool(_WEBHOOK.search(url))


def _phones(text: str) -> list[tuple[int, int]]:
    """(start, end) of each phone number in `text`."""
    return [
        (m.start, m.end)
        for m in phonenumbers.PhoneNumberMatcher(
            text, PHONE_REGION, leniency=phonenumbers.Leniency.POSSIBLE
        )
    ]
