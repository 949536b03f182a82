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


# Control characters that text does not hold (tab, line and page breaks excepted), and the
# replacement character that undecodable bytes become: binary data shows up as these.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\ufffd]")
_WINDOW = 4096  # characters per stretch checked; stretches overlap by half
_MAX_CONTROL_SHARE = 0.02


def decode_text(name: str, data: bytes) -> str:
    """Decode a text file, refusing binary data anywhere in it (not only at the start)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise RefusedFile(f"{name} is not valid UTF-16 text.") from exc
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            # Legacy single-byte text still reads; binary data shows up as control characters.
            text = data.decode("cp1252", errors="replace")
    where = binary_offset(text)
    if where is not None:
        kind = f"{name} looks like binary data, not text"
        if where >= _WINDOW:
            kind = f"{name} is text up to about character {where:,}, then looks like binary data"
        raise RefusedFile(
            f"{kind}. Upload the original document ({supported_types_text()}), or remove what is not text."
        )
    return text


def binary_offset(text: str) -> int | None:
    """Where decoded text turns into binary data (the character offset), or None if it is all text.

    A NUL character anywhere is binary; otherwise every stretch of 4,096 characters (each
    overlapping the next by half, so a short run of binary data cannot fall between two)
    must be at most 2% control characters. Clean text costs one regular-expression scan
    (about 0.1 s for 20 MB); only text that holds control characters is looked at stretch
    by stretch, from the first one on.
    """
    first = _CONTROL.search(text)
    if first is None:
        return None
    nul = text.find("\x00", first.start())
    if nul >= 0:
        return nul
    half = _WINDOW // 2
    span = min(_WINDOW, len(text))
    limit = _MAX_CONTROL_SHARE * span
    last_start = len(text) - span
    for pos in range(max(0, (first.start() // half - 1) * half), len(text), half):
        start = min(pos, last_start)
        if len(_CONTROL.findall(text, start, start + span)) > limit:
            found = _CONTROL.search(text, start)
            return found.start() if found is not None else start
        if start == last_start:
            break
    return None


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
    from pypdf.errors import DependencyError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password; those still open.
            try:
                opened = reader.decrypt("")
            except DependencyError:
                raise
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
    except DependencyError as exc:
        # AES needs `cryptography` (a dependency): when the password is checked, or per page.
        raise RefusedFile(
            f"{name} is encrypted with AES, which needs the `cryptography` package; the bot's operator should install it (`pip install cryptography`)."
        ) from exc
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
