"""ComfyUI's HTTP endpoints, one method each, over one ``requests.Session``.

``GET /system_stats``, ``GET /object_info``, ``POST /prompt``, ``GET /queue``,
``POST /queue`` (delete), ``POST /interrupt`` (targeted), ``GET /history/{prompt_id}`` and
``GET /view`` (streamed download). Transport failures become :class:`ServerUnreachable`,
401/403 :class:`AuthenticationFailed`, other unexpected statuses :class:`ServerError`.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import requests

from .errors import (
    AuthenticationFailed,
    DownloadFailed,
    OutputError,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from .protocol import OutputRef

module_logger = logging.getLogger("comfy_pipeline.http")


def short_reason(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error, e.g. ``[Errno 111] Connection refused``."""
    if isinstance(exc, requests.Timeout):
        return f"no answer in time ({type(exc).__name__})"
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
    return match.group(0).strip() if match else str(exc)


class ComfyUIHTTP:
    """HTTP client for one ComfyUI server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8188``.
        headers: sent on every request (``Authorization`` included when set); never logged.
        verify_tls: verify the certificate for https.
        connect_timeout_s: seconds for the TCP connect (and for ``/system_stats`` as a whole).
        http_timeout_s: seconds to wait for a response once connected.
        logger: where warnings (a download retried) go; the connection passes its own, the flow
            run's logger. Default: the ``comfy_pipeline.http`` logger.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        verify_tls: bool = True,
        connect_timeout_s: float = 10.0,
        http_timeout_s: float = 60.0,
        logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None,
    ):
        self.url = url.rstrip("/")
        self._log = logger or module_logger
        self.connect_timeout_s = connect_timeout_s
        self.http_timeout_s = http_timeout_s
        self._session = requests.Session()
        self._session.headers.update(dict(headers or {}))
        self._session.verify = verify_tls

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._session.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request; transport errors raise :class:`ServerUnreachable`, 401/403 :class:`AuthenticationFailed`."""
        kwargs.setdefault("timeout", (self.connect_timeout_s, self.http_timeout_s))
        try:
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        except requests.RequestException as exc:
            raise ServerUnreachable(self.url, f"{method} {path}: {short_reason(exc)}") from exc
        if response.status_code in (401, 403):
            response.close()
            raise AuthenticationFailed(self.url, response.status_code)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request whose 200 answer is JSON; anything else raises :class:`ServerError`."""
        response = self.request(method, path, **kwargs)
        if response.status_code != 200:
            raise ServerError(method, f"{self.url}{path}", response.status_code, response.text)
        try:
            return response.json()
        except ValueError as exc:
            raise ServerError(method, f"{self.url}{path}", response.status_code,
                              f"not JSON: {response.text[:200]}") from exc

    # ------------------------------------------------------------------ endpoints
    def system_stats(self) -> dict:
        """``GET /system_stats`` within ``connect_timeout_s``: version, Python, devices."""
        return self.json("GET", "/system_stats", timeout=(self.connect_timeout_s, self.connect_timeout_s))

    def object_info(self) -> dict:
        """``GET /object_info``: ``{class_type: definition}`` of every node class."""
        return self.json("GET", "/object_info")

    def queue(self) -> dict:
        """``GET /queue``: ``{"queue_running": [[number, prompt_id, ...]], "queue_pending": [...]}``."""
        return self.json("GET", "/queue")

    def queue_ids(self) -> tuple[set[str], set[str]]:
        """``(running, pending)`` prompt ids from ``GET /queue``."""
        snapshot = self.queue()

        def ids(key: str) -> set[str]:
            return {item[1] for item in snapshot.get(key, []) if isinstance(item, list) and len(item) > 1}

        return ids("queue_running"), ids("queue_pending")

    def history(self, prompt_id: str) -> dict:
        """``GET /history/{prompt_id}``: the entry, or ``{}`` when the server has none."""
        body = self.json("GET", f"/history/{prompt_id}")
        return body.get(prompt_id) or {}

    def post_prompt(self, body: Mapping[str, Any]) -> dict:
        """``POST /prompt``; returns ``{"prompt_id", "number", "node_errors"}``.

        Raises:
            PromptValidationError: HTTP 400 (every ``node_errors`` entry in the message).
            ServerError: any other non-200 status (e.g. 500).
            ServerUnreachable: the request failed in transport (it may or may not have arrived).
        """
        response = self.request("POST", "/prompt", json=dict(body))
        if response.status_code == 400:
            try:
                err = response.json()
            except ValueError:
                err = None
            if not isinstance(err, dict):
                err = {"error": {"message": response.text[:300]}}
            raise PromptValidationError(err.get("error"), err.get("node_errors"))
        if response.status_code != 200:
            raise ServerError("POST", f"{self.url}/prompt", response.status_code, response.text)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError("POST", f"{self.url}/prompt", response.status_code,
                              f"not a ComfyUI answer (a proxy page?): {response.text[:200]}")
        return answer

    def delete_pending(self, prompt_id: str) -> None:
        """``POST /queue {"delete": [prompt_id]}``: remove one pending prompt (no effect if running)."""
        self.request("POST", "/queue", json={"delete": [prompt_id]}).close()

    def interrupt(self, prompt_id: str) -> None:
        """``POST /interrupt {"prompt_id": id}``: stop that prompt only if it is the running one."""
        self.request("POST", "/interrupt", json={"prompt_id": prompt_id}).close()

    def download(self, ref: OutputRef, dest: Union[Path, Iterable[Path]], *, attempts: int = 3,
                 chunk_bytes: int = 1 << 16) -> tuple[Path, int]:
        """``GET /view`` one output file, streamed to a temporary file, then renamed into place.

        ``dest`` is the final path, or candidate paths in order of preference (all in one
        directory): the file takes the first one that does not exist at the moment it is
        complete, so nothing is ever overwritten, even by another run writing to the same
        directory. A 5xx answer, a body shorter than its ``Content-Length`` or a dropped
        transfer is retried up to ``attempts`` times; a final path only ever holds a complete file.

        Returns:
            ``(path, bytes_written)``.

        Raises:
            OutputError: HTTP 4xx (the file is not there, or its name is refused), or every
                candidate name taken.
            DownloadFailed: 5xx answers or cut transfers on every attempt (transient).
        """
        candidates: Iterator[Path] = iter([Path(dest)] if isinstance(dest, (str, Path)) else dest)
        first = next(candidates)
        first.parent.mkdir(parents=True, exist_ok=True)
        remaining = _Replayable(first, candidates)
        last_problem = ""
        for attempt in range(1, attempts + 1):
            try:
                return self._download_once(ref, first.parent, remaining, chunk_bytes)
            except (ServerUnreachable, _Truncated) as exc:
                last_problem = str(exc)
                self._log.warning("download of %s failed (attempt %d of %d): %s", ref.filename, attempt,
                               attempts, last_problem)
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
        raise DownloadFailed(
            f"GET /view of {ref.subfolder}/{ref.filename} from {self.url} failed {attempts} times: "
            f"{last_problem}. The file is still on the server; the generation is retried."
        )

    def _download_once(self, ref: OutputRef, directory: Path, candidates: "_Replayable",
                       chunk_bytes: int) -> tuple[Path, int]:
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        tmp = directory / f".{uuid.uuid4().hex}.part"
        response = self.request("GET", "/view", params=params, stream=True)
        try:
            if response.status_code >= 500:  # a proxy or a busy server: worth another try
                raise _Truncated(f"answered HTTP {response.status_code}")
            if response.status_code != 200:
                why = ("the server refused the file name" if response.status_code == 400
                       else "the file is not on the server")
                raise OutputError(
                    f"GET /view of {ref.subfolder}/{ref.filename} ({ref.type}) from {self.url} "
                    f"answered HTTP {response.status_code}: {why}."
                )
            expected = _content_length(response.headers.get("Content-Length"))
            written = 0
            try:
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_content(chunk_bytes):
                        fh.write(chunk)
                        written += len(chunk)
            except requests.RequestException as exc:
                raise _Truncated(f"transfer broke after {written} bytes: {short_reason(exc)}") from exc
            # Content-Length counts bytes on the wire (compressed, if the body was encoded).
            on_wire = response.raw.tell() if response.headers.get("Content-Encoding") else written
            if expected is not None and on_wire != expected:
                raise _Truncated(f"got {on_wire} of {expected} bytes")
            return _publish(tmp, candidates), written
        finally:
            response.close()
            tmp.unlink(missing_ok=True)


def _content_length(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:  # "abc", "10, 10": not a length we can check against
        return None


class _Replayable:
    """Candidate paths that can be walked again on a retry (already-taken ones are skipped)."""

    def __init__(self, first: Path, rest: Iterator[Path]):
        self._seen = [first]
        self._rest = rest

    def __iter__(self) -> Iterator[Path]:
        yield from self._seen
        for path in self._rest:
            self._seen.append(path)
            yield path


def _publish(tmp: Path, candidates: Iterable[Path]) -> Path:
    """Give the complete ``tmp`` the first candidate name that is free; never replace a file."""
    for dest in candidates:
        try:
            os.link(tmp, dest)  # atomic, and fails if dest exists
            return dest
        except FileExistsError:
            continue
        except OSError as exc:  # a file system without hard links: claim the name, then replace
            module_logger.debug("hard link not possible (%s); using exclusive create + replace", exc)
        try:
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os.replace(tmp, dest)
        return dest
    raise OutputError("every candidate file name is taken; not overwriting any file.")


class _Truncated(Exception):
    """A ``/view`` body that ended early (retried)."""
