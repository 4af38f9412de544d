"""Descriptions with their own inputs: the rows of a CSV or JSON Lines file, or of the flow's parameter.

A run's ``descriptions`` are plain texts, or rows that carry a description and named input
images, so that each description can have its own start image or reference::

    description,image
    alice waving,refs/alice_wave.png
    alice running,refs/alice_run.png

Every column besides ``description`` names a workflow parameter bound to an image (see
``blocks/inputs.py``); an empty cell leaves that parameter to the run's ``inputs`` (or the
workflow's own value). In a file, a relative path is taken from the file's directory.

Descriptions can also travel by reference: instead of the list, the flow takes the path or fsspec
URL of such a file (``/data/shots.csv``, ``file:///data/shots.jsonl``, ``s3://bucket/shots.csv``),
which the machine running the flow reads (:func:`read_descriptions`). A flow run's parameters then
stay small whatever the number of descriptions (Prefect refuses parameters over 512 KB).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A description (a CSV cell) may be long: the default limit is 128 KB.
csv.field_size_limit(16 * 1024 * 1024)

__all__ = ["DescriptionRow", "Description", "read_descriptions_file", "read_descriptions", "parse_descriptions",
           "texts_and_inputs", "is_reference", "as_one_kind"]


class DescriptionRow(BaseModel):
    """One description and its input images: ``{"description": "...", "image": "/path/a.png"}``.

    Every field besides ``description`` is an input image path (str), bound to the workflow
    parameter of that name for this description's generations.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)

    description: str = Field(min_length=1, description="The text description.")

    @field_validator("description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the description is empty")
        return value

    @property
    def inputs(self) -> dict[str, str]:
        """``{parameter: path}`` of this row's input images (empty values left out)."""
        return {name: path for name, path in (self.__pydantic_extra__ or {}).items() if path.strip()}


#: A description as the flow takes it: a text, or a row with input images.
Description = Union[str, DescriptionRow]


def as_one_kind(descriptions: list[Description]) -> Union[list[str], list[DescriptionRow]]:
    """``descriptions`` as the flow's parameter takes them: all texts, or (when any is a row)
    all rows, a text becoming a row without input images."""
    if all(isinstance(d, str) for d in descriptions):
        return list(descriptions)
    return [d if isinstance(d, DescriptionRow) else DescriptionRow(description=d) for d in descriptions]


def texts_and_inputs(descriptions: list[Description]) -> tuple[list[str], list[dict[str, str]]]:
    """``(texts, inputs)``: each description's text, and its own input image paths (``{}`` for a text)."""
    texts, inputs = [], []
    for item in descriptions:
        if isinstance(item, DescriptionRow):
            texts.append(item.description)
            inputs.append(item.inputs)
        else:
            texts.append(item)
            inputs.append({})
    return texts, inputs


def _row(data: object, where: str, base: Optional[Path]) -> DescriptionRow:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object with a 'description', got {type(data).__name__}")
    if "description" not in data:
        raise ValueError(f"{where}: no 'description' (its fields: {', '.join(map(str, data)) or 'none'})")
    fields = {}
    for key, value in data.items():
        if key != "description" and value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be an image path (a string), got {value!r}")
        if (base is not None and key != "description" and value and value.strip()
                and not Path(value.strip()).expanduser().is_absolute()):
            value = str(base / value.strip())  # relative to the file, not to where the command runs
        fields[key] = value if key == "description" else (value or "").strip()
    try:
        return DescriptionRow(**fields)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}: {reasons}") from None


def read_descriptions_file(path: Path) -> list[Description]:
    """The descriptions of a local file, by its extension (see :func:`parse_descriptions`); relative
    image paths are taken from the file's directory.

    Raises:
        ValueError: the file cannot be read as UTF-8, or a row is not valid (the message names
            the file and line).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as UTF-8 text: {exc}") from None
    return parse_descriptions(text, str(path), base=path.expanduser().absolute().parent)


def is_reference(value: object) -> bool:
    """Whether the flow's ``descriptions`` is a reference (a path or URL string), not a list."""
    return isinstance(value, str)


def read_descriptions(reference: str) -> list[Description]:
    """The descriptions of a file named by a path or an fsspec URL (``file://``, ``s3://``, ...),
    read with fsspec on the machine that runs the flow (by its extension: see
    :func:`parse_descriptions`). Relative image paths are taken from the file's directory when
    the file is local, else left as they are.

    Raises:
        ValueError: the reference cannot be opened or read (what fsspec said, and the reference),
            or a row is not valid.
    """
    import fsspec  # Prefect's own dependency; imported here: only a run by reference needs it

    try:
        opened = fsspec.open(reference, "r", encoding="utf-8-sig")
        with opened as handle:
            text = handle.read()
    except (OSError, ValueError, ImportError, UnicodeDecodeError) as exc:
        raise ValueError(f"the descriptions {reference!r} cannot be read: {type(exc).__name__}: {exc}. Give a path "
                         "or URL (file://, s3://, ...) that the machine running the flow can read") from None
    protocols = opened.fs.protocol if isinstance(opened.fs.protocol, tuple) else (opened.fs.protocol,)
    base = Path(opened.path).parent if "file" in protocols else None
    return parse_descriptions(text, reference, base=base)


def parse_descriptions(text: str, name: str, *, base: Optional[Path] = None) -> list[Description]:
    """The descriptions in ``text``, read as ``name``'s extension says.

    * ``.csv``: a header row with a ``description`` column, then one row per description (other
      columns: input images);
    * ``.jsonl`` / ``.ndjson``: one JSON object per line, ``{"description": ..., "image": ...}``, or
      a JSON string;
    * anything else: one description per line.

    Blank lines and lines starting with ``#`` are skipped (in a text or JSON Lines file). Relative
    image paths are taken from ``base`` (when given).

    Raises:
        ValueError: a row is not valid (the message names ``name`` and the line).
    """
    path = name  # named in the messages
    suffix = PurePosixPath(name.split("?", 1)[0]).suffix.lower()
    if suffix == ".csv":
        # a quoted cell may hold line breaks; strict: an unclosed quote is an error, not a merged row
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        if not reader.fieldnames or "description" not in [f.strip() for f in reader.fieldnames]:
            raise ValueError(f"{path}: the first row must name the comma-separated columns, one of them "
                             f"'description' (found: {', '.join(reader.fieldnames or []) or 'nothing'})")
        rows: list[Description] = []
        records = iter(reader)
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except csv.Error as exc:
                raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
            number = reader.line_num
            if None in record:
                raise ValueError(f"{path}, line {number}: more cells than columns")
            record = {k.strip(): v for k, v in record.items()}
            if not any((v or "").strip() for v in record.values()):
                continue
            rows.append(_row(record, f"{path}, line {number}", base))
        return rows
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(_lines(text), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                data = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
            if isinstance(data, str):
                if not data.strip():
                    raise ValueError(f"{path}, line {number}: the description is empty")
                rows.append(data)
            else:
                rows.append(_row(data, f"{path}, line {number}", base))
        return rows
    return [line.strip() for line in _lines(text) if line.strip() and not line.lstrip().startswith("#")]


def _lines(text: str) -> list[str]:
    """The lines of a text or JSON Lines file: split at ``\\n`` (and ``\\r\\n``) only, so that a
    description may hold any other character (``str.splitlines`` would also split at U+2028, NEL,
    form feed, ...)."""
    return [line.removesuffix("\r") for line in text.split("\n")]
