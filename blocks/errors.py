"""Every failure a user can meet, one exception type each.

Each message names what failed and what to do about it. All inherit from
:class:`ComfyUIError`, so ``except ComfyUIError`` catches anything this package raises
about ComfyUI itself.
"""

from __future__ import annotations

from typing import Any, Mapping


class ComfyUIError(Exception):
    """Base class for every error this package raises about ComfyUI."""


class ServerUnreachable(ComfyUIError):
    """The ComfyUI server could not be reached (HTTP or WebSocket) at ``url``."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(
            f"ComfyUI server at {url} is unreachable: {reason}. "
            "Check that ComfyUI is running and that the URL (host, port, http/https) is right."
        )


class AuthenticationFailed(ComfyUIError):
    """The server answered 401 or 403: the API key or headers were refused."""

    def __init__(self, url: str, status: int):
        self.url = url
        self.status = status
        super().__init__(
            f"ComfyUI server at {url} refused the credentials (HTTP {status}). "
            "Check the api_key / headers of the ComfyUIServer block."
        )


class CertificateNotTrusted(ComfyUIError):
    """The server's TLS certificate (https/wss) failed verification: signed by a CA this machine
    does not trust (a private CA), issued for another host name, expired or not yet valid.

    Never retried: it fails the same way until the settings change. ``reason`` is OpenSSL's
    (e.g. ``unable to get local issuer certificate``); ``code`` its X509 verify code, if known.
    """

    def __init__(self, url: str, reason: str, *, ca_bundle: str | None = None, code: int | None = None):
        self.url = url
        self.reason = reason
        self.ca_bundle = ca_bundle
        self.code = code
        skip = "or pass --insecure (verify_tls=False) to skip the check"
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            hint = f"use a URL with a host name the certificate was issued for, {skip}"
        elif code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
            hint = f"renew the server's certificate (or check this machine's clock), {skip}"
        elif ca_bundle:
            hint = (f"the CA bundle {ca_bundle} (--ca-bundle / ca_bundle) does not hold the CA that "
                    f"signed it: give that CA's PEM file, {skip}")
        else:
            hint = ("pass --ca-bundle PATH (the PEM file of the CA that signed it) or set ca_bundle on "
                    f"the ComfyUI Server block, {skip}")
        super().__init__(f"the certificate of {url} is not trusted: {reason}; {hint}")


class CABundleUnusable(ComfyUIError):
    """The ``ca_bundle`` of a server (``--ca-bundle``) is missing here or holds no certificate."""

    def __init__(self, url: str, path: str, reason: str):
        self.url = url
        self.path = path
        self.reason = reason
        super().__init__(
            f"the CA bundle {path} for {url} cannot be used: {reason}; set ca_bundle (--ca-bundle) "
            "to a PEM file with the CA certificate(s) on the machine that runs the flow"
        )


class WorkflowError(ComfyUIError):
    """The workflow file or its bindings cannot be used; nothing was sent to the server."""


class InputImageError(WorkflowError):
    """An input image (``--input KEY=PATH``, the flow's ``inputs``, a descriptions file's column)
    cannot be used: missing, unreadable, or not an image. Found before anything is sent."""

    def __init__(self, name: str, path: str, reason: str, advice: str | None = None):
        self.name = name
        self.path = path
        self.reason = reason
        super().__init__(f"input image {name!r} ({path}) {reason}: " + (advice or (
            "give the path of a PNG, JPEG, WebP, GIF, BMP or TIFF file that the machine running the flow can read")))


class WorkflowNotRunnable(WorkflowError):
    """The preflight (``blocks/preflight.py``) found that no server of the run can run the
    rendered workflow, by its ``/object_info``; nothing was sent. Never retried.

    Attributes:
        problems: ``{server url: [problem, ...]}``, one sentence per problem naming the node
            id, ``class_type``, input and what the server offers.
    """

    def __init__(self, source: str | None, problems: Mapping[str, list[str]]):
        self.source = source
        self.problems = {url: list(found) for url, found in problems.items()}
        what = f"The workflow {source}" if source else "The workflow"
        if len(self.problems) == 1:
            ((url, found),) = self.problems.items()
            text = f"{what} cannot run on {url}; nothing was sent:" + "".join(f"\n  - {p}" for p in found)
        else:
            text = f"{what} cannot run on any server of the pool; nothing was sent:" + "".join(
                f"\n  - {url}:" + "".join(f"\n    - {p}" for p in found) for url, found in self.problems.items())
        super().__init__(
            text + "\nInstall what is missing on the server (custom nodes, model files) or fix the "
            "workflow or its parameters, then run again."
        )


class GenerationSkipped(ComfyUIError):
    """Not submitted: ComfyUI refused this run's workflow for another generation with an error
    that is the same for every generation (``reason`` says which), so the run sends no new prompt.
    Never retried; the report marks the generation ``not run``."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"not run: {reason}")


def _format_node_errors(node_errors: Mapping[str, Any]) -> list[str]:
    lines = []
    for node_id, entry in (node_errors or {}).items():
        class_type = entry.get("class_type", "?") if isinstance(entry, Mapping) else "?"
        errors = entry.get("errors", []) if isinstance(entry, Mapping) else []
        for err in (errors if isinstance(errors, list) else []) or [{}]:
            if not isinstance(err, Mapping):
                err = {"message": str(err)}
            extra = err.get("extra_info") if isinstance(err.get("extra_info"), Mapping) else {}
            input_name = extra.get("input_name")
            where = f"node {node_id} ({class_type})"
            if input_name:
                where += f" input '{input_name}'"
            message = err.get("message", "invalid")
            details = err.get("details")
            text = f"{where}: {message}"
            if details and details != input_name:
                text += f" ({details})"
            lines.append(text)
    return lines


class PromptValidationError(ComfyUIError):
    """``POST /prompt`` answered 400: the server rejected the prompt before queueing it.

    Attributes:
        error: the top-level ``error`` object (``type``, ``message``, ``details``).
        node_errors: ``{node_id: {"class_type", "errors": [...], "dependent_outputs"}}``.
    """

    def __init__(self, error: Mapping[str, Any] | str | None, node_errors: Mapping[str, Any] | None):
        # Older servers answer {"error": "no prompt", "node_errors": []}.
        self.error = dict(error) if isinstance(error, Mapping) else {"message": str(error or "")}
        self.node_errors = dict(node_errors) if isinstance(node_errors, Mapping) else {}
        head = self.error.get("message") or "prompt rejected"
        details = self.error.get("details")
        if details and not self.node_errors:
            head += f" ({details})"
        lines = _format_node_errors(self.node_errors)
        text = f"ComfyUI rejected the prompt: {head}"
        if lines:
            text += "; " + "; ".join(lines)
        text += ". Fix the workflow (or its bindings) and run again."
        super().__init__(text)


class NodeExecutionError(ComfyUIError):
    """A node raised while the prompt ran (``execution_error`` message)."""

    def __init__(
        self,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str | None,
        exception_message: str | None,
    ):
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = (exception_message or "").strip()
        super().__init__(
            f"ComfyUI node {node_id} ({node_type}) failed in prompt {prompt_id}: "
            f"{exception_type}: {self.exception_message}. "
            "Check the node's inputs and the ComfyUI server log."
        )


class ExecutionInterrupted(ComfyUIError):
    """The prompt was interrupted on the server (``execution_interrupted`` message)."""

    def __init__(self, prompt_id: str, node_id: str | None = None, node_type: str | None = None):
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        where = f" at node {node_id} ({node_type})" if node_id else ""
        super().__init__(
            f"ComfyUI prompt {prompt_id} was interrupted{where}. "
            "Someone pressed Cancel or called /interrupt; run it again if it is still wanted."
        )


class GenerationTimeout(ComfyUIError):
    """The prompt ran longer than ``generation_timeout_s`` seconds (or, with ``in_queue``,
    waited longer than ``queue_timeout_s`` seconds in the server's queue without starting).

    The prompt has been removed from the server (deleted if pending, interrupted if running).
    """

    def __init__(self, prompt_id: str, timeout_s: float, last_event: str | None = None,
                 *, in_queue: bool = False):
        self.prompt_id = prompt_id
        self.timeout_s = timeout_s
        self.in_queue = in_queue
        seen = f" (last seen: {last_event})" if last_event else ""
        if in_queue:
            text = (
                f"ComfyUI prompt {prompt_id} waited {timeout_s:g} s in the server's queue without "
                f"starting{seen}; it was removed. The server is busy or stuck: look at its queue, "
                "or raise queue_timeout_s on the ComfyUIServer block."
            )
        else:
            text = (
                f"ComfyUI prompt {prompt_id} did not finish within {timeout_s:g} s of starting{seen}; "
                "it was interrupted. If the workflow is that slow, raise generation_timeout_s on the "
                "ComfyUIServer block (--timeout on the command line)."
            )
        super().__init__(text)


class ConnectionLost(ComfyUIError):
    """The WebSocket to the server closed while prompts were in flight."""

    def __init__(self, url: str, reason: str, prompt_id: str | None = None, *, closed_by_us: bool = False):
        self.url = url
        self.reason = reason
        self.prompt_id = prompt_id
        #: True when our own side closed the connection (the run ended or was cancelled):
        #: nothing to retry then.
        self.closed_by_us = closed_by_us
        which = f" while waiting for prompt {prompt_id}" if prompt_id else ""
        hint = ("" if closed_by_us else
                " The server may have restarted or a proxy dropped the socket; run again.")
        super().__init__(f"WebSocket to ComfyUI at {url} was lost{which}: {reason}.{hint}")


class GenerationCancelled(ConnectionLost):
    """The flow run was cancelled, interrupted or ended while this generation was in flight.

    We closed the connection ourselves, first removing the prompt from the server:
    ``interrupted`` is True when ComfyUI was running it (``POST /interrupt`` by
    ``prompt_id``), False when it was still queued (deleted) or not yet submitted. Never retried.
    """

    def __init__(self, url: str, prompt_id: str | None = None, *, interrupted: bool = False):
        self.interrupted = interrupted
        if interrupted:
            reason = "the run was cancelled; ComfyUI was running this prompt and it was interrupted"
        elif prompt_id:
            reason = "the run was cancelled; the prompt was removed from ComfyUI's queue before it ran"
        else:
            reason = "the run was cancelled before this generation was submitted"
        super().__init__(url, reason, prompt_id, closed_by_us=True)
        which = f" (prompt {prompt_id})" if prompt_id else ""
        ComfyUIError.__init__(self, f"Generation on ComfyUI at {url}{which} stopped: {reason}.")


class PromptMoved(ConnectionLost):
    """The prompt's server has been unreachable for ``failover_after_s`` seconds while another
    server of the pool was free: the prompt is given up there (removed when that server answers
    again) and the pool runs it on another server. Raised by a connection, handled by the pool."""

    def __init__(self, url: str, prompt_id: str, down_for_s: float, reason: str):
        self.down_for_s = down_for_s
        super().__init__(url, f"unreachable for {down_for_s:.0f} s ({reason}); the prompt moves to "
                         "another server of the pool", prompt_id)


class ServerError(ComfyUIError):
    """The server answered with an unexpected HTTP status (5xx or other)."""

    def __init__(self, method: str, url: str, status: int, body: str):
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        said = f": {body.strip()[:300]}" if body and body.strip() else " with an empty body"
        super().__init__(
            f"ComfyUI {method} {url} answered HTTP {status}{said}. Look at the ComfyUI server log."
        )


class OutputError(ComfyUIError):
    """An output file could not be downloaded or written."""


class DownloadFailed(OutputError):
    """``GET /view`` kept failing (5xx answers, transfers cut short) although the file is on the
    server: transient, the generation is retried (following its finished prompt, not re-running it)."""


class PromptLost(ComfyUIError):
    """The prompt is neither in the server's queue nor in its history any more.

    ComfyUI keeps both in memory only, so this means the server restarted (or someone cleared
    them) while the prompt was in flight. Nothing of it can be recovered; it is safe to submit
    it again.
    """

    def __init__(self, prompt_id: str, url: str, polls: int):
        self.prompt_id = prompt_id
        self.url = url
        super().__init__(
            f"ComfyUI prompt {prompt_id} is gone from {url}: neither queued, running nor in history "
            f"after {polls} checks. The server probably restarted; the generation can be run again."
        )
