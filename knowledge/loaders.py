"""Turn uploaded files into text sections (with a page or heading), refusing bad input clearly.

Every refusal is a `RefusedFile` whose message names the file and says what to do; the
ingest pipeline records it for that file and carries on with the rest of the batch.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath

from core.errors import UserError

SUPPORTED_TYPES: tuple[str, ...] = (".txt", ".md", ".markdown", ".pdf", ".html", ".htm", ".docx")

# A .docx is a zip: refuse archives that expand far beyond their size (zip bombs).
_MAX_UNZIPPED_BYTES = 200 * 1024 * 1024
_MAX_ZIP_RATIO = 100
_MAX_ZIP_ENTRIES = 5000


class RefusedFile(UserError):
    """A file that cannot go into the knowledge base, and why."""


@dataclass(frozen=True, slots=True)
class Section:
    """A stretch of a document's text and where it is ("page 3", "## Install")."""

    text: str
    location: str | None = None
    title: str | None = None  # heading words repeated at the top of each passage, for context


def supported_types_text() -> str:
    """The supported extensions, for messages."""
    return ", ".join(SUPPORTED_TYPES)


def extension(name: str) -> str:
    """The lower-cased extension of a file name."""
    return PurePath(name).suffix.lower()


def is_supported(name: str) -> bool:
    """Whether the file name has an extension we can read."""
    return extension(name) in SUPPORTED_TYPES


def check_size(name: str, size: int, max_bytes: int) -> None:
    """Refuse an empty file or one over the size cap."""
    if size == 0:
        raise RefusedFile(f"{name} is empty.")
    if size > max_bytes:
        raise RefusedFile(
            f"{name} is {_mb(size)}; the limit per file is {_mb(max_bytes)}. Split it or ask the bot's operator to raise SWITCHBOARD_KNOWLEDGE_MAX_FILE_MB."
        )


def parse(name: str, data: bytes, *, max_bytes: int) -> list[Section]:
    """The non-empty text sections of a file, or RefusedFile saying why not."""
    ext = extension(name)
    if ext not in SUPPORTED_TYPES:
        raise RefusedFile(
            f"{name}: {ext or 'files without an extension'} is not supported. Supported types: {supported_types_text()}."
        )
    check_size(name, len(data), max_bytes)
    reader = _READERS[ext]
    sections = [Section(_tidy(s.text), s.location, s.title) for s in reader(name, data)]
    sections = [s for s in sections if s.text]
    if not sections:
        hint = " (is it a scan? only PDFs with a text layer can be read)" if ext == ".pdf" else ""
        raise RefusedFile(f"{name} has no readable text{hint}.")
    return sections


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _tidy(text: str) -> str:
    """Normalise line ends and runs of blank lines; strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def decode_text(name: str, data: bytes) -> str:
    """Decode a text file, refusing binary data."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise RefusedFile(f"{name} is not valid UTF-16 text.") from exc
    head = data[:8192]
    if b"\x00" in head:
        raise RefusedFile(
            f"{name} looks like binary data, not text. Upload the original document ({supported_types_text()})."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Legacy single-byte text still reads; binary data shows up as control characters.
        text = data.decode("cp1252", errors="replace")
    sample = text[:8192]
    controls = sum(1 for c in sample if (ord(c) < 32 and c not in "\t\n\r\f\v") or c == "\ufffd")
    if sample and controls / len(sample) > 0.02:
        raise RefusedFile(
            f"{name} looks like binary data, not text. Upload the original document ({supported_types_text()})."
        )
    return text


def _read_text(name: str, data: bytes) -> list[Section]:
    return [Section(decode_text(name, data))]


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^(```|~~~)")


def split_markdown(text: str) -> list[Section]:
    """Split Markdown along its headings; each section is located by its heading line."""
    sections: list[Section] = []
    location: str | None = None
    title: str | None = None
    lines: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match:
            sections.append(Section("\n".join(lines), location, title))
            title = match.group(2).strip()
            location = f"{match.group(1)} {title}"
            lines = []
        else:
            lines.append(line)
    sections.append(Section("\n".join(lines), location, title))
    return [s for s in sections if s.text.strip()]


def _read_markdown(name: str, data: bytes) -> list[Section]:
    return split_markdown(decode_text(name, data))


def _read_pdf(name: str, data: bytes) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password; those still open.
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # pypdf raises several types for unsupported ciphers
                raise RefusedFile(
                    f"{name} is encrypted with a method that cannot be read. Save an unprotected copy and upload that."
                ) from exc
            if not opened:
                raise RefusedFile(
                    f"{name} is password-protected. Save a copy without the password and upload that."
                )
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            sections.append(Section(page.extract_text() or "", f"page {number}"))
        return sections
    except RefusedFile:
        raise
    except (
        PyPdfError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
        RecursionError,
    ) as exc:
        raise RefusedFile(
            f"{name} is not a readable PDF (it may be damaged). Re-export it and try again."
        ) from exc


class _HTMLText(HTMLParser):
    """Collect the visible text of an HTML page, split at its headings."""

    _SKIP = {"script", "style", "noscript", "template", "head", "svg"}
    _BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "section",
        "article",
        "blockquote",
        "pre",
        "table",
        "ul",
        "ol",
        "dd",
        "dt",
    }
    _HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self._parts: list[str] = []
        self._location: str | None = None
        self._skip_depth = 0
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._HEADINGS:
            self._flush()
            self._heading = []
        elif tag in self._BLOCK:
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._HEADINGS and self._heading is not None:
            title = " ".join("".join(self._heading).split())
            self._heading = None
            self._location = title or self._location
        elif tag in self._BLOCK:
            self._parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._heading is not None:
            self._heading.append(data)
        else:
            self._parts.append(data)

    def _flush(self) -> None:
        text = "".join(self._parts)
        text = "\n".join(" ".join(line.split()) for line in text.splitlines())
        self.sections.append(Section(text, self._location, self._location))
        self._parts = []

    def close(self) -> None:
        super().close()
        self._flush()


def _read_html(name: str, data: bytes) -> list[Section]:
    parser = _HTMLText()
    parser.feed(decode_text(name, data))
    parser.close()
    return parser.sections


def check_zip(name: str, data: bytes) -> None:
    """Refuse a zip container that is damaged or expands suspiciously (a zip bomb)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise RefusedFile(
            f"{name} is not a valid .docx file (it is not a readable zip archive)."
        ) from exc
    unzipped = sum(i.file_size for i in infos)
    if (
        len(infos) > _MAX_ZIP_ENTRIES
        or unzipped > _MAX_UNZIPPED_BYTES
        or unzipped > _MAX_ZIP_RATIO * max(len(data), 1)
    ):
        raise RefusedFile(
            f"{name} expands to {_mb(unzipped)} when unpacked, far more than a document should; it was refused as a possible zip bomb."
        )


def _read_docx(name: str, data: bytes) -> list[Section]:
    check_zip(name, data)
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise RefusedFile(
            f"{name} is not a valid .docx file. Save it again from your word processor (as .docx, not .doc)."
        ) from exc
    except Exception as exc:  # lxml raises its own errors for damaged XML
        raise RefusedFile(f"{name} could not be read as a .docx file (it may be damaged).") from exc
    sections: list[Section] = []
    location: str | None = None
    lines: list[str] = []
    for paragraph in document.paragraphs:
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        text = paragraph.text.strip()
        if style.lower().startswith(("heading", "title")) and text:
            sections.append(Section("\n".join(lines), location, location))
            location, lines = text, []
        elif text:
            lines.append(text)
    sections.append(Section("\n".join(lines), location, location))
    for table in document.tables:
        rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
        sections.append(Section("\n".join(rows), "table"))
    return sections


_READERS: dict[str, Callable[[str, bytes], list[Section]]] = {
    ".txt": _read_text,
    ".md": _read_markdown,
    ".markdown": _read_markdown,
    ".pdf": _read_pdf,
    ".html": _read_html,
    ".htm": _read_html,
    ".docx": _read_docx,
}
