"""Where a generation's files go on disk: names, subfolders, no overwrites, no escapes.

A file is saved as ``output_dir/<server subfolder>/{character}_d{index}_{variant}{ext}``
(plus ``_{n}`` when one generation yields several files, and ``_video`` for the videos of an
image-to-video run; ``{character}`` as :func:`safe_stem`
makes it: ``Ålice Smith`` -> ``alice-smith``). An existing file is never
overwritten: the next free name ``..._{variant}-2{ext}`` is used and logged. A later attempt of
the same generation keeps a file with exactly the downloaded bytes where it is (tasks/generate.py).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from slugify import slugify

from ..blocks.errors import OutputError
from ..blocks.protocol import OutputRef


def safe_stem(text: str, *, max_len: int = 80) -> str:
    """``text`` as one file-name part: a python-slugify slug (``Ålice Smith`` -> ``alice-smith``).

    Lowercase ASCII letters, digits and single dashes only (other scripts are transliterated:
    no path separator, control character, space or dot can remain), at most ``max_len``
    characters, never starting or ending with a dash; ``untitled`` when nothing is left.
    """
    return slugify(text, max_length=max_len) or "untitled"


def _refuse_odd(value: str, what: str) -> None:
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise OutputError(f"refusing server {what} {value!r}: it contains control characters")


def output_subdir(output_dir: Path, subfolder: str) -> Path:
    """``output_dir / subfolder``, refusing a server subfolder that would escape ``output_dir``.

    Raises:
        OutputError: ``subfolder`` is absolute, climbs out with ``..``, or holds control characters.
    """
    _refuse_odd(subfolder, "subfolder")
    sub = PurePosixPath(subfolder.replace("\\", "/")) if subfolder else PurePosixPath()
    if sub.is_absolute() or ".." in sub.parts or (sub.parts and ":" in sub.parts[0]):
        raise OutputError(
            f"refusing server subfolder {subfolder!r}: it would write outside {output_dir}"
        )
    return Path(output_dir, *sub.parts)


_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


def planned_name(character: str, index: int, variant: int, ref: OutputRef, number: int | None,
                 suffix: str = "") -> str:
    """``{character}_d{index}_{variant}[_{number}]{suffix}{ext}``, the extension taken from the server's
    file (``suffix``: ``_video`` for the videos of an image-to-video run).

    An extension that is not short and alphanumeric (``.png``, ``.webm``, ``.flac``) is dropped.

    Raises:
        OutputError: the server's filename is a path, not a plain name.
    """
    _refuse_odd(ref.filename, "filename")
    server_name = PurePosixPath(ref.filename.replace("\\", "/"))
    if server_name.is_absolute() or len(server_name.parts) != 1 or server_name.name in ("", ".", ".."):
        raise OutputError(f"refusing server filename {ref.filename!r}: it is not a plain file name")
    ext = server_name.suffix if _EXTENSION.match(server_name.suffix) else ""
    counter = f"_{number}" if number is not None else ""
    return f"{safe_stem(character)}_d{index}_{variant}{counter}{suffix}{ext.lower()}"


def candidate_paths(directory: Path, name: str) -> Iterator[Path]:
    """``directory/name``, then ``stem-2.ext``, ``stem-3.ext``, ... (the first free one is used)."""
    first = Path(name)
    yield directory / name
    for n in itertools.count(2):
        yield directory / f"{first.stem}-{n}{first.suffix}"
