"""The files that paths on this machine name (`switchboard knowledge add PATH...`), read safely.

A folder is walked without ever following a symbolic link: a link inside it, to a file
or a folder, inside the folder or out of it (`notes.txt -> /etc/shadow`), is skipped and
reported with where it points, so nothing outside the folder the operator named can end
up in the knowledge base (and be searchable by every member). Links that stay inside the
folder are skipped too: what they point to is read in its own place, and not following
them means no loops and no file counted twice. Hidden files and folders (`.git`,
`.DS_Store`) are passed over silently, and other kinds of entries (sockets, FIFOs,
devices) are skipped with the reason.

A path named on its own that is a link is refused unless `follow_symlinks` is set (the
CLI's `--follow-symlinks`); then the file or folder it points to is read, under the
link's name, and links inside that folder are still not followed.

Every file is opened with O_NOFOLLOW and checked to be the very file that was listed
(same device and inode), so a file swapped for a link between the walk and the read is
refused instead of read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from knowledge.ingest import Item, checked_item
from knowledge.loaders import RefusedFile, is_supported, supported_types_text

_NOT_FOLLOWED = "links are not followed inside a folder"


def items_from_paths(
    paths: Sequence[Path], max_file_bytes: int, *, follow_symlinks: bool = False
) -> list[Item]:
    """The files to ingest from files and folders (recursively), in the order given."""
    items: list[Item] = []
    for path in paths:
        path = Path(path)
        name = path.name or str(path)
        try:
            info = path.lstat()
        except FileNotFoundError:
            items.append(Item(name, 0, bytes, refused=f"{path} does not exist."))
            continue
        except OSError as exc:
            items.append(_unreadable(name, exc))
            continue
        if stat.S_ISLNK(info.st_mode):
            target = os.path.realpath(path)
            if not follow_symlinks:
                items.append(
                    Item(
                        name,
                        0,
                        bytes,
                        refused=f"{path} is a symbolic link (to {target}); it was not read. Pass --follow-symlinks to read what it points to.",
                    )
                )
                continue
            try:
                info = os.stat(target)
            except OSError:
                items.append(
                    Item(
                        name,
                        0,
                        bytes,
                        refused=f"{path} is a symbolic link to {os.readlink(path)}, which does not exist.",
                    )
                )
                continue
            path = Path(target)
        if stat.S_ISDIR(info.st_mode):
            items.extend(_folder_items(path, max_file_bytes))
        elif stat.S_ISREG(info.st_mode):
            items.append(_file_item(path, name, info, max_file_bytes))
        else:
            items.append(
                Item(name, 0, bytes, refused=f"{path} is {_kind(info.st_mode)}, not a file.")
            )
    return items


def _folder_items(root: Path, max_file_bytes: int) -> list[Item]:
    """Every file under `root`, by path; links and special files are skipped with the reason."""
    real_root = os.path.realpath(root)
    found: list[tuple[tuple[str, ...], Item]] = []

    def visit(folder: Path, relative: PurePosixPath) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            name = relative.as_posix() if relative.parts else root.name or str(root)
            found.append((relative.parts, _unreadable(name, exc)))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .git, .DS_Store and friends
            where = relative / entry.name
            name = where.as_posix()
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                found.append((where.parts, _unreadable(name, exc)))
                continue
            if stat.S_ISLNK(info.st_mode):
                found.append((where.parts, _skipped(name, _link_reason(entry.path, real_root))))
            elif stat.S_ISDIR(info.st_mode):
                visit(Path(entry.path), where)
            elif not stat.S_ISREG(info.st_mode):
                found.append((where.parts, _skipped(name, f"{_kind(info.st_mode)}, not a file")))
            elif not is_supported(entry.name):
                # A folder may hold other files: pass over them instead of refusing them.
                found.append(
                    (
                        where.parts,
                        _skipped(name, f"not a supported type ({supported_types_text()})"),
                    )
                )
            else:
                found.append(
                    (where.parts, _file_item(Path(entry.path), name, info, max_file_bytes))
                )

    visit(root, PurePosixPath())
    return [item for _, item in sorted(found, key=lambda pair: pair[0])]


def _link_reason(link: str, real_root: str) -> str:
    """Why a link inside a folder was skipped, saying where it points."""
    target = os.path.realpath(link)
    if not os.path.exists(target):
        return f"a symbolic link to {os.readlink(link)}, which does not exist"
    if target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep):
        inside = os.path.relpath(target, real_root)
        return f"a symbolic link to {inside} in the same folder; {_NOT_FOLLOWED} (what it points to is read in its own place)"
    return f"a symbolic link to {target}, outside the folder; {_NOT_FOLLOWED}"


def _file_item(path: Path, name: str, info: os.stat_result, max_file_bytes: int) -> Item:
    return checked_item(name, info.st_size, _reader(path, name, info), max_file_bytes)


def _reader(path: Path, name: str, listed: os.stat_result) -> Callable[[], bytes]:
    """Read the file that was listed, and only that one (not a link or file put in its place)."""

    def read() -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if os.path.islink(path):
                raise _changed(name) from exc
            raise
        with os.fdopen(fd, "rb") as file:
            now = os.fstat(file.fileno())
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
                listed.st_dev,
                listed.st_ino,
            ):
                raise _changed(name)
            return file.read()

    return read


def _changed(name: str) -> RefusedFile:
    return RefusedFile(
        f"{name} was replaced (by a link or another file) between listing and reading; it was not read. Add it again."
    )


def _skipped(name: str, reason: str) -> Item:
    return Item(name, 0, bytes, skipped=reason)


def _unreadable(name: str, exc: OSError) -> Item:
    return Item(name, 0, bytes, refused=f"{name} could not be read ({exc.strerror or exc}).")


def _kind(mode: int) -> str:
    """What a file system entry is that is neither a file, a folder nor a link."""
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"
