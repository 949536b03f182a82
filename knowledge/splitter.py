"""Split document sections into passages sized for the embedding model."""

from __future__ import annotations

from dataclasses import dataclass

from knowledge.loaders import Section


@dataclass(frozen=True, slots=True)
class Chunk:
    """One passage to embed, with where it came from."""

    text: str
    location: str | None


def split_sections(sections: list[Section], chunk_chars: int) -> list[Chunk]:
    """Passages of about `chunk_chars` characters, split at paragraphs, then sentences, then words."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        chunk_size=chunk_chars,
        chunk_overlap=chunk_chars // 8,
        separators=["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", ""],
        keep_separator="end",
        strip_whitespace=True,
    )
    chunks: list[Chunk] = []
    for section in sections:
        for text in splitter.split_text(section.text):
            if text.strip():
                body = f"{section.title}\n{text.strip()}" if section.title else text.strip()
                chunks.append(Chunk(body, section.location))
    return chunks
