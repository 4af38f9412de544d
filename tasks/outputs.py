"""Where a generation's files go on disk: names, subfolders, no overwrites, no escapes.

A file is saved as ``output_dir/<server subfolder>/{character}_d{index}_{variant}{ext}``
(plus ``_{n}`` when one generation yields several files). An existing file is never
overwritten: the next free name ``..._{variant}-2{ext}`` is used and logged.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from blocks.errors import OutputError
from blocks.protocol import OutputRef

_UNSAFE = re.compile(r"[^\w.\- ]+", re.UNICODE)


def safe_stem(text: str, *, max_len: int = 80) -> str:
    """``text`` made safe as one file-name part: no path separators or control characters."""
    cleaned = _UNSAFE.sub("-", text).strip(" .-")
    return (cleaned or "untitled")[:max_len]


def output_subdir(output_dir: Path, subfolder: str) -> Path:
    """``output_dir / subfolder``, refusing a server subfolder that would escape ``output_dir``.

    Raises:
        OutputError: ``subfolder`` is absolute or climbs out with ``..``.
    """
    sub = PurePosixPath(subfolder.replace("\\", "/")) if subfolder else PurePosixPath()
    if sub.is_absolute() or ".." in sub.parts:
        raise OutputError(
            f"refusing server subfolder {subfolder!r}: it would write outside {output_dir}"
        )
    return Path(output_dir, *sub.parts)


def planned_name(character: str, index: int, variant: int, ref: OutputRef, number: int | None) -> str:
    """``{character}_d{index}_{variant}[_{number}]{ext}``, the extension taken from the server's file.

    Raises:
        OutputError: the server's filename is a path, not a plain name.
    """
    server_name = PurePosixPath(ref.filename.replace("\\", "/"))
    if server_name.is_absolute() or len(server_name.parts) != 1 or server_name.name in ("", ".", ".."):
        raise OutputError(f"refusing server filename {ref.filename!r}: it is not a plain file name")
    ext = "".join(server_name.suffixes[-1:])
    counter = f"_{number}" if number is not None else ""
    return f"{safe_stem(character)}_d{index}_{variant}{counter}{ext}"


def free_path(directory: Path, name: str) -> Path:
    """``directory/name``, or ``stem-2.ext``, ``stem-3.ext``... if that already exists."""
    path = directory / name
    if not path.exists():
        return path
    stem, dot, ext = name.partition(".")
    n = 2
    while True:
        candidate = directory / f"{stem}-{n}{dot}{ext}"
        if not candidate.exists():
            return candidate
        n += 1
