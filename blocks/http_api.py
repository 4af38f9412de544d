"""ComfyUI's HTTP endpoints, one method each, over one ``requests.Session``.

``GET /system_stats``, ``GET /object_info``, ``POST /prompt``, ``GET /queue``,
``POST /queue`` (delete), ``POST /interrupt`` (targeted), ``GET /history/{prompt_id}`` and
``GET /view`` (streamed download). Transport failures become :class:`ServerUnreachable`
(a certificate that fails verification :class:`CertificateNotTrusted`), 401/403
:class:`AuthenticationFailed`, other unexpected statuses :class:`ServerError`.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning
from urllib3.util.retry import Retry

from .errors import (
    AuthenticationFailed,
    DownloadFailed,
    OutputError,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from .protocol import OutputRef
from .tls import not_trusted, requests_verify, usable_ca_bundle

module_logger = logging.getLogger("comfy_pipeline.http")

#: urllib3's retries for every request: a refused or failed connect (nothing was sent, so a POST
#: too), and 502/503/504 answers to a GET (a proxy or a busy server), with backoff 0.2, 0.4, 0.8 s
#: and Retry-After respected. A read timeout is not retried (the request may be running), nor a
#: POST that reached the server.
GET_RETRIES = Retry(total=3, connect=3, read=0, status=3, other=0, backoff_factor=0.2,
                    status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET"}),
                    raise_on_status=False)


#: urllib3's retries for ``POST /upload/image``: sending the same file again is harmless (ComfyUI
#: keeps one copy of identical bytes under one name), so besides a failed connect it is retried on
#: a dropped transfer (a read error) and on 500/502/503/504, with backoff 0.2, 0.4, 0.8 s.
UPLOAD_RETRIES = Retry(total=3, connect=3, read=3, status=3, other=0, backoff_factor=0.2,
                       status_forcelist=(500, 502, 503, 504), allowed_methods=frozenset({"POST"}),
                       raise_on_status=False)


class _RetriesAtDebug(logging.Filter):
    """urllib3 logs every retry of a request at WARNING ("Retrying (Retry(total=2, ...)) after
    connection broken by ..."); what matters (the request failed in the end) is reported by us in
    one line, so these are lowered to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith("Retrying"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RetriesAtDebug())


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
        verify_tls: verify the certificate for https. False (for https): one warning is logged
            here, and urllib3's own warning on every request to this host is silenced.
        ca_bundle: path of a PEM file with the CA certificate(s) to trust for https instead of
            the default ones (a private CA); ignored when ``verify_tls`` is False.
        connect_timeout_s: seconds for the TCP connect (and for ``/system_stats`` as a whole).
        http_timeout_s: seconds to wait for a response once connected.
        logger: where warnings (a download retried) go; the connection passes its own, the flow
            run's logger. Default: the ``comfy_pipeline.http`` logger.

    Raises:
        CABundleUnusable: ``ca_bundle`` is not a readable PEM file with a certificate here.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        verify_tls: bool = True,
        ca_bundle: Optional[str] = None,
        connect_timeout_s: float = 10.0,
        http_timeout_s: float = 60.0,
        logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None,
    ):
        self.url = url.rstrip("/")
        self._log = logger or module_logger
        self.connect_timeout_s = connect_timeout_s
        self.http_timeout_s = http_timeout_s
        self.ca_bundle = usable_ca_bundle(ca_bundle, self.url) if ca_bundle and verify_tls else None
        # Given with every request: a session's own verify loses to REQUESTS_CA_BUNDLE.
        self._verify = requests_verify(verify_tls, self.ca_bundle)
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=GET_RETRIES)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # the longest matching prefix wins: uploads get their own retries, same session otherwise
        self._session.mount(f"{self.url}/upload/", HTTPAdapter(max_retries=UPLOAD_RETRIES))
        self._session.headers.update(dict(headers or {}))
        self._session.verify = self._verify
        if not verify_tls and urlsplit(self.url).scheme == "https":
            # Said once here, in our words; urllib3 would warn about this host on every request.
            self._log.warning("the TLS certificate of %s is not verified (verify_tls=False / --insecure)",
                              self.url)
            warnings.filterwarnings("ignore", category=InsecureRequestWarning, message=(
                rf"Unverified HTTPS request is being made to host '{re.escape(urlsplit(self.url).hostname or '')}'"))

    def close(self) -> None:
        """Close the pooled HTTP connections (the client stays usable: new ones are opened)."""
        self._session.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request; transport errors raise :class:`ServerUnreachable` (a certificate that
        fails verification :class:`CertificateNotTrusted`), 401/403 :class:`AuthenticationFailed`."""
        kwargs.setdefault("timeout", (self.connect_timeout_s, self.http_timeout_s))
        kwargs.setdefault("verify", self._verify)
        try:
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        except requests.RequestException as exc:
            untrusted = not_trusted(self.url, exc, self.ca_bundle)
            if untrusted is not None:
                raise untrusted from exc
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
        """``GET /queue``: ``{"queue_running": [[number, prompt_id, ...]], "queue_pending": [...]}``,
        within ``connect_timeout_s`` (ComfyUI answers it at once; a silent connection must not hold
        a check for ``http_timeout_s``)."""
        return self.json("GET", "/queue", timeout=(self.connect_timeout_s, self.connect_timeout_s))

    def queue_ids(self) -> tuple[set[str], set[str]]:
        """``(running, pending)`` prompt ids from ``GET /queue``."""
        snapshot = self.queue()

        def ids(key: str) -> set[str]:
            return {item[1] for item in snapshot.get(key, []) if isinstance(item, list) and len(item) > 1}

        return ids("queue_running"), ids("queue_pending")

    def history(self, prompt_id: str) -> dict:
        """``GET /history/{prompt_id}``: the entry, or ``{}`` when the server has none."""
        body = self.json("GET", f"/history/{prompt_id}", timeout=(self.connect_timeout_s, self.connect_timeout_s))
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

    def upload_image(self, data: bytes, filename: str, *, subfolder: str = "", kind: str = "input",
                     content_type: str = "image/png", overwrite: bool = False) -> dict:
        """``POST /upload/image`` (multipart: the file in field ``image``, then ``type``,
        ``subfolder`` and, with ``overwrite``, ``overwrite=true``).

        Without ``overwrite`` ComfyUI keeps an existing file of that name: it answers the same
        name when the bytes are the same, else a new one (``name (1).png``). Retried on failed
        connects, dropped transfers and 5xx (:data:`UPLOAD_RETRIES`).

        Returns:
            the server's answer ``{"name", "subfolder", "type"}``: bind that name, not ``filename``.

        Raises:
            ServerError: any non-200 answer (413: larger than the server's max upload size;
                400: the server refused the name or subfolder) or an answer without ``name``.
            ServerUnreachable / AuthenticationFailed: as for every request.
        """
        fields = {"type": kind, "subfolder": subfolder}
        if overwrite:
            fields["overwrite"] = "true"
        answer = self.json("POST", "/upload/image", files={"image": (filename, data, content_type)}, data=fields)
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise ServerError("POST", f"{self.url}/upload/image", 200, f"not a ComfyUI answer: {str(answer)[:200]}")
        return answer

    def delete_pending(self, prompt_id: str) -> None:
        """``POST /queue {"delete": [prompt_id]}``: remove one pending prompt (no effect if running)."""
        self.request("POST", "/queue", json={"delete": [prompt_id]}).close()

    def interrupt(self, prompt_id: str) -> None:
        """``POST /interrupt {"prompt_id": id}``: stop that prompt only if it is the running one."""
        self.request("POST", "/interrupt", json={"prompt_id": prompt_id}).close()

    def download(self, ref: OutputRef, dest: Union[Path, Iterable[Path]], *, attempts: int = 3,
                 chunk_bytes: int = 1 << 16, reuse_identical: bool = False) -> tuple[Path, int]:
        """``GET /view`` one output file, streamed to a temporary file, then renamed into place.

        ``dest`` is the final path, or candidate paths in order of preference (all in one
        directory): the file takes the first one that does not exist at the moment it is
        complete, so nothing is ever overwritten, even by another run writing to the same
        directory. With ``reuse_identical`` (a retry downloading what an earlier attempt of the
        same generation may already have saved), a candidate that already holds exactly the
        downloaded bytes is the answer instead: the file is not written a second time under the
        next name. A 5xx answer, a body shorter than its ``Content-Length`` or a dropped
        transfer is retried up to ``attempts`` times; a final path only ever holds a complete file.

        Returns:
            ``(path, size in bytes)``.

        Raises:
            OutputError: HTTP 4xx (the file is not there, or its name is refused), every
                candidate name taken, or the local directory or file cannot be created or
                written (permissions, a regular file in the way, disk full): permanent.
            DownloadFailed: 5xx answers or cut transfers on every attempt (transient).
        """
        candidates: Iterator[Path] = iter([Path(dest)] if isinstance(dest, (str, Path)) else dest)
        first = next(candidates)
        try:
            first.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(exc, first.parent, ref, "create the directory") from exc
        remaining = _Replayable(first, candidates)
        last_problem = ""
        for attempt in range(1, attempts + 1):
            try:
                return self._download_once(ref, first.parent, remaining, chunk_bytes, reuse_identical)
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
                       chunk_bytes: int, reuse_identical: bool) -> tuple[Path, int]:
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        tmp = directory / f".{uuid.uuid4().hex}.part"
        response = self.request("GET", "/view", params=params, stream=True)
        try:
            if response.status_code >= 500:  # still 5xx after urllib3's own retries (GET_RETRIES)
                raise DownloadFailed(
                    f"GET /view of {ref.subfolder}/{ref.filename} from {self.url} answered HTTP "
                    f"{response.status_code} {1 + GET_RETRIES.status} times. The file is still on the "
                    "server; the generation is retried.")
            if response.status_code != 200:
                why = ("the server refused the file name" if response.status_code == 400
                       else "the file is not on the server")
                raise OutputError(
                    f"GET /view of {ref.subfolder}/{ref.filename} ({ref.type}) from {self.url} "
                    f"answered HTTP {response.status_code}: {why}."
                )
            # urllib3 (2.x) enforces Content-Length: a body cut short raises inside _save_body.
            written = _save_body(response, tmp, ref, chunk_bytes)
            path, reused = _publish(tmp, candidates, ref, reuse_identical=reuse_identical)
            if reused:
                self._log.info("%s already holds these %d bytes (saved by an earlier attempt): kept it, "
                               "not written again", path, written)
            return path, written
        finally:
            response.close()
            tmp.unlink(missing_ok=True)


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


def _save_body(response: requests.Response, tmp: Path, ref: OutputRef, chunk_bytes: int) -> int:
    """Stream the body into ``tmp``; returns the bytes written.

    Raises:
        _Truncated: the transfer broke (retried).
        OutputError: ``tmp`` cannot be created or written (permanent).
    """
    written = 0
    chunks = response.iter_content(chunk_bytes)
    try:
        with open(tmp, "wb") as fh:
            while True:
                try:
                    chunk = next(chunks, None)
                except OSError as exc:  # requests' errors are OSErrors too: all of the transfer's
                    raise _Truncated(f"transfer broke after {written} bytes: {short_reason(exc)}") from exc
                if chunk is None:
                    return written
                fh.write(chunk)
                written += len(chunk)
    except OSError as exc:  # opening, writing or closing the local file
        raise _cannot_write(exc, tmp.parent, ref, "write a file in") from exc


def _publish(tmp: Path, candidates: Iterable[Path], ref: OutputRef, *,
             reuse_identical: bool = False) -> tuple[Path, bool]:
    """Give the complete ``tmp`` the first candidate name that is free; never replace a file.

    With ``reuse_identical``, a candidate that already holds exactly ``tmp``'s bytes is taken as
    it is. Returns ``(path, reused)``.

    Raises:
        OutputError: every candidate is taken, or the name cannot be created (permanent).
    """
    for dest in candidates:
        try:
            os.link(tmp, dest)  # atomic, and fails if dest exists
            return dest, False
        except FileExistsError:
            if reuse_identical and _same_bytes(tmp, dest):
                return dest, True
            continue
        except OSError as exc:  # a file system without hard links: claim the name, then replace
            module_logger.debug("hard link not possible (%s); using exclusive create + replace", exc)
        try:
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if reuse_identical and _same_bytes(tmp, dest):
                return dest, True
            continue
        except OSError as exc:
            raise _cannot_write(exc, dest.parent, ref, "create a file in") from exc
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            dest.unlink(missing_ok=True)  # the empty file that claimed the name
            raise _cannot_write(exc, dest.parent, ref, "write a file in") from exc
        return dest, False
    raise OutputError("every candidate file name is taken; not overwriting any file.")


def _same_bytes(new: Path, existing: Path, chunk_bytes: int = 1 << 16) -> bool:
    """Whether ``existing`` is a regular file with exactly the bytes of ``new`` (sizes first)."""
    try:
        if not existing.is_file() or existing.stat().st_size != new.stat().st_size:
            return False
        with open(new, "rb") as a, open(existing, "rb") as b:
            while True:
                block = a.read(chunk_bytes)
                if block != b.read(chunk_bytes):
                    return False
                if not block:
                    return True
    except OSError as exc:  # unreadable, or gone meanwhile: not a file we may take as ours
        module_logger.debug("could not compare %s with the download: %s", existing, exc)
        return False


#: What to do about a local file-system error, by errno.
_WRITE_ADVICE = {
    errno.EACCES: "This process (user {user}) may not write there: make the directory writable for "
                  "it, or choose another output directory",
    errno.EPERM: "This process (user {user}) may not write there: make the directory writable for "
                 "it, or choose another output directory",
    errno.EROFS: "The file system is mounted read-only: choose an output directory on a writable one",
    errno.ENOTDIR: "A part of that path is a regular file, not a directory: move that file away, or "
                   "choose another output directory",
    errno.EEXIST: "A regular file has that directory's name: move it away, or choose another output "
                  "directory",
    errno.ENOSPC: "The disk is full: free some space, or choose an output directory on another disk",
    errno.EDQUOT: "The disk quota is used up: free some space, or choose another output directory",
}


def _cannot_write(exc: OSError, directory: Path, ref: OutputRef, action: str) -> OutputError:
    """An :class:`OutputError` for a local file-system failure: what failed, where, what to do."""
    advice = _WRITE_ADVICE.get(exc.errno, "Check that the output directory exists (or can be created) "
                                          "and is writable, or choose another output directory")
    where = exc.filename if exc.filename and not str(exc.filename).endswith(".part") else None
    return OutputError(
        f"cannot {action} {directory} to save {ref.subfolder}/{ref.filename}: "
        f"{exc.strerror or exc}{f' ({where})' if where and Path(where) != directory else ''}. "
        f"{advice.format(user=_user())}. "
        "The file is still on the server: run the generation again once this is fixed."
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError) as exc:  # no login name in the environment nor the user database
        module_logger.debug("no user name for this process: %s", exc)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "?"


class _Truncated(Exception):
    """A ``/view`` body that ended early (retried)."""
