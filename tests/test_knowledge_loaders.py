"""Loaders and splitting: every supported format, and every kind of bad input refused clearly."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knowledge.loaders import SUPPORTED_TYPES, RefusedFile, binary_offset, parse, split_markdown
from knowledge.splitter import split_sections
from tests.fixtures.knowledge import PDF_CIPHERS, encrypt_pdf, make_docx, make_pdf, make_zip_bomb

MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def test_markdown_is_split_along_headings() -> None:
    text = "Intro line.\n\n# Install\n\nRun the installer.\n\n## Linux\n\nUse apt.\n\n```\n# not a heading\n```\n"
    sections = parse("guide.md", text.encode(), max_bytes=MB)
    assert [s.location for s in sections] == [None, "# Install", "## Linux"]
    assert "# not a heading" in sections[2].text
    chunks = split_sections(sections, 400)
    assert chunks[2].text.startswith("Linux\n")  # the heading travels with its passage


def test_pdf_keeps_page_numbers() -> None:
    sections = parse(
        "manual.pdf", make_pdf(["First page text", "Second page (with parens)"]), max_bytes=MB
    )
    assert [(s.location, s.text) for s in sections] == [
        ("page 1", "First page text"),
        ("page 2", "Second page (with parens)"),
    ]


def test_pdf_pages_without_text_are_left_out() -> None:
    sections = parse("manual.pdf", make_pdf(["", "Only the second page has text"]), max_bytes=MB)
    assert [s.location for s in sections] == ["page 2"]


def test_html_keeps_only_visible_text() -> None:
    html = b"<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Heading</h1><p>Hello <b>world</b> &amp; more</p><script>alert(1)</script></body></html>"
    sections = parse("page.html", html, max_bytes=MB)
    assert [(s.location, s.text) for s in sections] == [("Heading", "Hello world & more")]


def test_docx_is_split_along_headings() -> None:
    data = make_docx(
        [
            ("para", "Preamble."),
            ("heading", "Refunds"),
            ("para", "Within 30 days."),
            ("heading", "Shipping"),
            ("para", "Three days."),
        ]
    )
    sections = parse("policy.docx", data, max_bytes=MB)
    assert [(s.location, s.text) for s in sections] == [
        (None, "Preamble."),
        ("Refunds", "Within 30 days."),
        ("Shipping", "Three days."),
    ]


def test_text_in_utf8_utf16_and_latin1() -> None:
    assert parse("a.txt", "café ünïcode".encode(), max_bytes=MB)[0].text == "café ünïcode"
    assert parse("b.txt", "café".encode("utf-16"), max_bytes=MB)[0].text == "café"
    assert parse("c.txt", "café crème".encode("cp1252"), max_bytes=MB)[0].text == "café crème"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.md", b"  \n\n \t\n", "no readable text"),
        ("binary.txt", bytes(range(256)) * 4, "binary data"),
        ("image.png", b"\x89PNG\r\n", "not supported"),
        ("noext", b"hello", "not supported"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "not a readable PDF"),
        ("fake.docx", b"PK\x03\x04 not a zip at all", "not a valid .docx"),
        ("bomb.docx", make_zip_bomb(), "zip bomb"),
    ],
)
def test_bad_input_is_refused_with_a_reason(name: str, data: bytes, message: str) -> None:
    with pytest.raises(RefusedFile, match=message) as caught:
        parse(name, data, max_bytes=MB)
    assert name in caught.value.message


PROSE = ("The quick brown fox jumps over the lazy dog. " * 2400).encode()  # ~108 KB of text


def _noise(size: int, *, nul: bool) -> bytes:
    """Random bytes, as compressed or encrypted data looks; without NUL bytes if `nul` is false."""
    data = random.Random(size).randbytes(size)
    return data if nul else data.replace(b"\x00", b"\x01")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("tail.txt", PROSE + _noise(4096, nul=True)),
        ("nul-free tail.txt", PROSE + _noise(2048, nul=False)),
        ("middle.md", PROSE + _noise(1024, nul=False) + PROSE),
        ("one nul at the end.txt", PROSE + b"\x00"),
        ("utf16 tail.txt", PROSE.decode().encode("utf-16") + b"\x00\x00" * 8),
        ("latin1 tail.html", "café ".encode("cp1252") * 30000 + _noise(2048, nul=False)),
    ],
)
def test_binary_data_after_the_start_of_a_text_file_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(RefusedFile, match="then looks like binary data") as caught:
        parse(name, data, max_bytes=MB)
    assert caught.value.message.startswith(f"{name} is text up to about character ")


def test_binary_offset_points_at_where_the_binary_data_starts() -> None:
    text = "plain words " * 10_000
    assert binary_offset(text) is None
    assert binary_offset(text + "\x00rest") == len(text)
    offset = binary_offset(text + _noise(2048, nul=False).decode("cp1252", errors="replace"))
    assert offset is not None and len(text) <= offset < len(text) + 200


def test_text_with_a_few_control_characters_still_reads() -> None:
    # A log with colour codes now and then, form feeds between pages, a stray bell.
    lines = [
        f"\x1b[32mok\x1b[0m step {n} finished without trouble" if n % 20 == 0 else f"step {n} ran"
        for n in range(5000)
    ]
    text = "\n".join(lines) + "\f\nPage two\a\n"
    assert parse("build.log.txt", text.encode(), max_bytes=MB)[0].text.startswith("\x1b[32mok")


def test_unsupported_type_lists_supported_ones() -> None:
    with pytest.raises(RefusedFile) as caught:
        parse("slides.pptx", b"data", max_bytes=MB)
    for ext in SUPPORTED_TYPES:
        assert ext in caught.value.message


@pytest.mark.parametrize("cipher", PDF_CIPHERS)
def test_password_protected_pdf_is_refused_with_the_reason(cipher: str) -> None:
    data = encrypt_pdf(make_pdf(["classified"]), "hunter2", cipher)
    with pytest.raises(RefusedFile, match="secret.pdf is password-protected. Save a copy without"):
        parse("secret.pdf", data, max_bytes=MB)


@pytest.mark.parametrize("cipher", PDF_CIPHERS)
def test_pdf_encrypted_with_an_empty_password_still_reads(cipher: str) -> None:
    data = encrypt_pdf(make_pdf(["readable anyway", "page two"]), "", cipher)
    sections = parse("open.pdf", data, max_bytes=MB)
    assert [(s.location, s.text) for s in sections] == [
        ("page 1", "readable anyway"),
        ("page 2", "page two"),
    ]


def test_aes_pdf_without_cryptography_names_the_missing_package(tmp_path: Path) -> None:
    # An install without `cryptography` (nor pycryptodome), in a fresh interpreter that cannot import them.
    pdf = tmp_path / "open.pdf"
    pdf.write_bytes(encrypt_pdf(make_pdf(["needs AES"]), "", "AES-128"))
    script = (
        "import sys\n"
        "sys.modules['cryptography'] = sys.modules['Crypto'] = None\n"
        "from pathlib import Path\n"
        "from knowledge.loaders import RefusedFile, parse\n"
        "try:\n"
        f"    parse('open.pdf', Path({str(pdf)!r}).read_bytes(), max_bytes=1 << 20)\n"
        "except RefusedFile as exc:\n"
        "    print(exc.message)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.startswith(
        "open.pdf is encrypted with AES, which needs the `cryptography` package"
    )


def test_file_over_the_size_cap_is_refused() -> None:
    with pytest.raises(RefusedFile, match="limit per file"):
        parse("big.txt", b"a" * 2048, max_bytes=1024)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["x.txt", "x.md", "x.html", "x.pdf", "x.docx"]),
    data=st.binary(max_size=3000),
)
def test_arbitrary_bytes_never_crash_a_loader(name: str, data: bytes) -> None:
    try:
        sections = parse(name, data, max_bytes=MB)
    except RefusedFile as exc:
        assert exc.message
    else:
        assert sections and all(s.text for s in sections)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.text(
                alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=40
            ).filter(lambda t: t.strip()),
        ),
        max_size=20,
    )
)
def test_markdown_split_keeps_every_body_line(blocks: list[tuple[bool, str]]) -> None:
    lines = [
        f"## {t.strip()}" if heading else t.replace("#", "").replace("`", "").replace("~", "")
        for heading, t in blocks
    ]
    sections = split_markdown("\n".join(lines))
    text = "\n".join(s.text for s in sections)
    for (heading, _), line in zip(blocks, lines, strict=True):
        if not heading and line.strip():
            assert line in text


def test_long_sections_are_split_with_overlap() -> None:
    words = " ".join(f"word{i}" for i in range(600))
    chunks = split_sections(parse("long.txt", words.encode(), max_bytes=MB), 500)
    assert len(chunks) > 5
    assert all(len(c.text) <= 500 for c in chunks)
    covered = set(" ".join(c.text for c in chunks).split())
    assert covered == set(words.split())
