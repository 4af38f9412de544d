"""The gallery a person looks at in the Prefect UI: markdown artifact ``{character}-{kind}-gallery``.

One thumbnail per generation, grouped by description (numbered from 1, as in the table and the
logs), its variants side by side, each with its seed and a link to the full file. Images are
not copied into the report: each thumbnail is ComfyUI's own ``GET /view`` URL of that output
(filename, subfolder, type), on the server's ``public_url`` (default: its ``url``), so the
reader's browser loads it from the ComfyUI server. Videos, animations and other files are
links. A server that needs an API key (``api_key`` or ``headers`` set) gets links only, since a
browser cannot send the key, and the gallery says so. Large runs show the first
:data:`MAX_THUMBNAILS` generations, then a line saying how many more are in the table (or, when
the table shows only some rows, in the CSV file of every row).

In an ``image_to_video`` run (:func:`two_stages`), a description's section pairs each image with
the videos made from it: one table per image, ``image N`` first, then its ``video 1``,
``video 2``, ... (numbered within that image); a video that never ran because its image failed
shows ``**skipped**``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote, urlencode

from .models import GenerationResult, GenerationSpec, OutputFile

#: Generations shown in the gallery; the rest are counted in one line (the table has them all).
MAX_THUMBNAILS = 200
#: Width of a thumbnail in CSS pixels (the full file is one click away).
THUMBNAIL_WIDTH_PX = 240
#: Variants side by side in one row of a description's table; more continue in another table.
COLUMNS = 4
#: Extensions a browser shows in ``<img>`` (animated files are linked, not embedded: they can be large).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"})
#: Extensions of video files (linked with a ▶).
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mov", "mkv", "avi", "m4v"})
#: Output lists of ComfyUI's history whose files are videos or animations whatever their extension.
MOVING_KEYS = frozenset({"gifs", "videos", "animated"})


@dataclass(frozen=True)
class ServerView:
    """How the readers of the report reach one ComfyUI server.

    ``base_url``: the block's ``public_url``, or its ``url`` when that is not set.
    ``needs_key``: the block sends an API key or extra headers, which a browser cannot send.
    """

    base_url: str
    needs_key: bool


def two_stages(specs: Sequence[GenerationSpec]) -> bool:
    """Whether the plan has both stages (an ``image_to_video`` run): some spec starts from
    another generation (``source``) or has another ``stage`` than the first spec."""
    return any(s.source is not None or s.stage != specs[0].stage for s in specs)


def kind_text(kind: str) -> str:
    """A flow run's kind as a person reads it: ``image_to_video`` -> ``image-to-video``."""
    return kind.replace("_", "-")


def server_views(server: Any) -> dict[str, ServerView]:
    """``{url: ServerView}`` for a ComfyUI Server block or every server of a ComfyUI Server Pool
    block (keyed by ``url``, as :attr:`GenerationResult.server` names the server).

    A pool whose blocks cannot be loaded gives ``{}``; the gallery then uses each result's own
    server URL (see :func:`gallery_markdown`).
    """
    try:
        blocks = server.load_servers() if hasattr(server, "load_servers") else [server]
        return {block.url: ServerView(base_url=block.public_url or block.url,
                                      needs_key=bool(block.request_headers()))
                for block in blocks}
    except Exception:  # ValueError: a pool names a block that is not saved; the report still goes on
        return {}


def view_url(base_url: str, file: OutputFile) -> str:
    """ComfyUI's ``GET /view`` URL of ``file`` on the server at ``base_url``."""
    query = urlencode({"filename": file.server_filename, "subfolder": file.subfolder, "type": file.type},
                      quote_via=quote)
    return f"{base_url.rstrip('/')}/view?{query}"


def is_still_image(file: OutputFile) -> bool:
    """Whether a browser shows ``file`` as a still image (not a video, an animation or audio)."""
    suffix = PurePosixPath(file.server_filename).suffix.lower()
    return suffix in IMAGE_EXTENSIONS and not file.animated and file.key not in MOVING_KEYS


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#!|~])")


def md_text(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters with ``…``, shown literally in markdown
    (no emphasis, link, HTML or table cell break)."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _file_label(file: OutputFile) -> str:
    suffix = PurePosixPath(file.server_filename).suffix.lower().lstrip(".") or "file"
    if file.key == "audio":
        return f"audio ({suffix})"
    if suffix in VIDEO_EXTENSIONS or file.key == "videos":
        return f"▶ video ({suffix})"
    if file.animated or file.key in MOVING_KEYS:
        return f"▶ animation ({suffix})"
    return f"full file ({suffix})"


def _cell(spec: GenerationSpec, row: Mapping[str, Any], outcome: Any,
          views: Mapping[str, ServerView], label: str) -> str:
    seed = f"seed {spec.seed}" if spec.seed is not None else "no seed bound"
    if not isinstance(outcome, GenerationResult):
        # short, so that the cell stays as narrow as a thumbnail: the error is in the table and summary
        kind = row["error"].split(":", 1)[0] if row["status"] == "failed" and row.get("error") else ""
        return f"{seed}<br>**{row['status']}**" + (f" ({md_text(kind)})" if kind else "")
    view = views.get(outcome.server) or ServerView(base_url=outcome.server, needs_key=False)
    links = [(view_url(view.base_url, f), f) for f in outcome.files]
    shown = next((url for url, f in links if is_still_image(f)), None) if not view.needs_key else None
    parts = []
    if shown is not None:
        alt = html.escape(f"description {spec.index + 1}, {label}", quote=True)
        parts.append(f'<img src="{html.escape(shown, quote=True)}" width="{THUMBNAIL_WIDTH_PX}" alt="{alt}"><br>')
    numbered = len(links) > 1
    link_text = " · ".join(
        f"[{_file_label(f)}{f' {n}' if numbered else ''}]({url})" for n, (url, f) in enumerate(links, start=1))
    if view.needs_key:
        link_text += " (needs the API key)"
    parts.append(f"{seed} · {link_text}")
    return "".join(parts)


_Entry = tuple[str, str, GenerationSpec, Mapping[str, Any]]


def _image_tables(group: Sequence[tuple[GenerationSpec, Mapping[str, Any]]]) -> list[list[_Entry]]:
    """One description's generations of an ``image_to_video`` run as ``(header, alt, spec, row)``
    lists, one per image: the image (``image N``), then the videos made from it (``video 1``,
    ``video 2``, ... within that image, in plan order). Videos whose image is not in ``group``
    come last, in one list of their own, named by their ``variant`` (``video N``)."""
    tables: dict[int, list[_Entry]] = {}
    for spec, row in group:
        if spec.stage == "image":
            label = f"image {spec.variant + 1}"
            tables[spec.position] = [(label, label, spec, row)]
    others: list[_Entry] = []
    for spec, row in group:
        if spec.stage == "image":
            continue
        table = tables.get(spec.source)
        if table is None:
            label = f"{spec.stage} {spec.variant + 1}"
            others.append((label, label, spec, row))
        else:
            label = f"video {spec.variant + 1}"  # numbered within the description, as in the table and files
            table.append((label, f"{table[0][0]}, {label}", spec, row))
    return list(tables.values()) + ([others] if others else [])


def gallery_markdown(specs: Sequence[GenerationSpec], rows: Sequence[Mapping[str, Any]],
                     outcomes: Mapping[int, Any], views: Mapping[str, ServerView], *,
                     character: str, kind: str, output_dir: str, table_key: str,
                     limit: int = MAX_THUMBNAILS, full_table: Optional[str] = None) -> str:
    """The gallery's markdown: per description (``### N. text``), tables of at most
    :data:`COLUMNS` cells whose header names each cell (``variant N``; in an ``image_to_video``
    run one table per image: ``image N``, then ``video 1``, ``video 2``, ... made from it).

    Args:
        specs: the plan, in order (description-major); ``rows`` are the table's rows for them
            (:func:`tasks.report.table_rows`), in the same order.
        outcomes: what became of each generation, keyed by ``spec.position``.
        views: how readers reach each server (:func:`server_views`); a server missing from it
            is reached at the URL the result names, without a key.
        output_dir: where the run saved its copies (named, since the gallery shows the server's).
        table_key: the table artifact's key, named when the gallery stops at ``limit``.
        limit: generations shown at most.
        full_table: the CSV file of every row, when the table artifact shows only some
            (:func:`tasks.report.table_shown`): named with the table, and where the generations
            past ``limit`` are.
    """
    results = [o for o in outcomes.values() if isinstance(o, GenerationResult)]
    lines = [f"# {md_text(character)}: {kind_text(kind)} gallery", ""]
    used = {r.server for r in results}
    reached = {url: views.get(url) or ServerView(url, False) for url in sorted(used)}
    open_servers = [v.base_url for v in reached.values() if not v.needs_key]
    keyed = [v.base_url for v in reached.values() if v.needs_key]
    lines.append(
        f"{len(results)} of {len(specs)} generations have files. Thumbnails and links are ComfyUI's own "
        f"`/view` URLs: your browser loads them from the ComfyUI server while it is reachable from "
        f"here and still has the files. The run's copies are under `{output_dir}` on the machine "
        f"that ran the flow (paths in the table `{table_key}`"
        + (f"; every row in `{full_table}`" if full_table else "") + ").")
    if open_servers:
        lines += ["", "Images not showing? Then your browser cannot reach " + ", ".join(f"`{u}`" for u in open_servers)
                  + ": set `public_url` on the ComfyUI Server block to an address it can reach."]
    if keyed:
        lines += ["", "**" + ", ".join(f"`{u}`" for u in keyed) + (" needs" if len(keyed) == 1 else " need")
                  + " an API key**, which a browser "
                  "cannot send: its files are linked, not shown; open them with the key (e.g. "
                  "`curl -H \"Authorization: Bearer $KEY\" URL`)."]
    shown = list(islice(zip(specs, rows), max(0, limit)))
    paired = two_stages(specs)
    groups: list[list[tuple[GenerationSpec, Mapping[str, Any]]]] = []
    for spec, row in shown:
        if not groups or groups[-1][0][0].index != spec.index:
            groups.append([])
        groups[-1].append((spec, row))
    for group in groups:
        lines += ["", f"### {group[0][0].index + 1}. {md_text(group[0][0].description)}"]
        tables = _image_tables(group) if paired else [
            [(f"variant {spec.variant + 1}", f"variant {spec.variant + 1}", spec, row) for spec, row in group]]
        for table in tables:
            for start in range(0, len(table), COLUMNS):
                chunk = table[start:start + COLUMNS]
                lines += ["", "| " + " | ".join(header for header, _, _, _ in chunk) + " |",
                          "|" + "---|" * len(chunk),
                          "| " + " | ".join(_cell(spec, row, outcomes.get(spec.position), views, alt)
                                            for _, alt, spec, row in chunk) + " |"]
    if len(specs) > len(shown):
        where = f"the CSV file `{full_table}`" if full_table else f"the table `{table_key}`"
        lines += ["", f"The first {len(shown)} of {len(specs)} generations are shown; "
                  f"{len(specs) - len(shown)} more are in {where}."]
    return "\n".join(lines) + "\n"
