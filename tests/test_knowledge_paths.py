"""Which files a path names: folders walked without following links, each file read as listed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from knowledge.loaders import RefusedFile
from knowledge.paths import items_from_paths

MB = 1024 * 1024


def test_a_file_swapped_for_a_link_after_listing_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:SECRET")
    root = tmp_path / "docs"
    root.mkdir()
    notes = root / "notes.txt"
    notes.write_text("harmless notes")
    [item] = items_from_paths([root], MB)
    notes.unlink()
    notes.symlink_to(secret)
    with pytest.raises(RefusedFile, match="notes.txt was replaced .* it was not read"):
        item.read()


def test_a_file_replaced_by_another_after_listing_is_not_read(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("first version")
    [item] = items_from_paths([notes], MB)
    replacement = tmp_path / "new.txt"
    replacement.write_text("something else entirely")
    replacement.replace(notes)  # another inode under the same name
    with pytest.raises(RefusedFile, match="was replaced"):
        item.read()


def test_an_unchanged_file_reads_as_listed(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("as listed")
    [item] = items_from_paths([notes], MB)
    assert item.refused is None and item.size == len("as listed")
    assert item.read() == b"as listed"


def test_special_files_are_skipped_or_refused_with_what_they_are(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    os.mkfifo(root / "pipe.txt")
    os.mkfifo(tmp_path / "named-pipe.txt")
    items = items_from_paths([root, tmp_path / "named-pipe.txt"], MB)
    assert [(i.name, i.skipped, i.refused) for i in items] == [
        ("pipe.txt", "a named pipe, not a file", None),
        ("named-pipe.txt", None, f"{tmp_path / 'named-pipe.txt'} is a named pipe, not a file."),
    ]


def test_hidden_entries_are_passed_over_and_names_are_relative_in_path_order(
    tmp_path: Path,
) -> None:
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref")
    (root / ".hidden.md").write_text("hidden")
    (root / ".link.md").symlink_to("/etc/passwd")
    (root / "b" / "z.md").write_text("z")
    (root / "a.md").write_text("a")
    (root / "c.md").write_text("c")
    assert [i.name for i in items_from_paths([root], MB)] == ["a.md", "b/z.md", "c.md"]
