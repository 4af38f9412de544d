"""Prefect Blocks and the live connection for ComfyUI.

Register every block type with ``prefect block register -m comfy_pipeline.blocks``.

- :class:`ComfyUIServer`, :class:`ComfyUIServerPool` (``server.py``): the Blocks with settings
  and secrets.
- :class:`ComfyUIWorkflow` (``workflow.py``): the Block holding a workflow and its bindings.
- :class:`ConnectionPool` (``pool.py``): the live connections of one flow run.
- :class:`ComfyUIConnection` (``connection.py``): one server's HTTP client, WebSocket and
  in-flight slots, and the prompts waited for on them.
- ``transport.py``: the WebSocket (handshake, reader thread that routes messages, keepalive,
  reconnect); ``slots.py``: the in-flight slots; ``watcher.py``: every decision while waiting
  for one prompt (deadlines, checks with the server, failover), no I/O.
- ``http_api.py``: ComfyUI's HTTP endpoints, one method each.
- ``protocol.py``: message parsing and the per-prompt tracker, no I/O.
- ``workflow.py``: workflow templates, parameter bindings and seeds.
- ``preflight.py``: the rendered workflow checked against each server's ``/object_info`` before
  the first POST, and telling a 400 of the workflow itself from one generation's.
- ``errors.py``: one exception type per failure a user can meet.
- ``tls.py``: the TLS settings HTTP and the WebSocket share, and telling a certificate failure.
"""

from .connection import ComfyUIConnection, ConnectionStats, PromptOutcome
from .errors import (
    AuthenticationFailed,
    CABundleUnusable,
    CertificateNotTrusted,
    ComfyUIError,
    ConnectionLost,
    DownloadFailed,
    ExecutionInterrupted,
    GenerationCancelled,
    GenerationSkipped,
    GenerationTimeout,
    NodeExecutionError,
    OutputError,
    PromptLost,
    PromptMoved,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
    WorkflowError,
    WorkflowNotRunnable,
)
from .protocol import OutputRef, PromptEvent, PromptTracker, outputs_from_history
from .pool import ConnectionPool
from .server import ComfyUIServer, ComfyUIServerPool
from .workflow import ComfyUIWorkflow, SeedMode, choose_seed

__all__ = [
    "AuthenticationFailed",
    "CABundleUnusable",
    "CertificateNotTrusted",
    "ComfyUIConnection",
    "ComfyUIError",
    "ComfyUIServer",
    "ComfyUIServerPool",
    "ConnectionPool",
    "ConnectionLost",
    "ConnectionStats",
    "DownloadFailed",
    "ExecutionInterrupted",
    "GenerationCancelled",
    "GenerationSkipped",
    "GenerationTimeout",
    "NodeExecutionError",
    "OutputError",
    "OutputRef",
    "PromptEvent",
    "PromptOutcome",
    "PromptLost",
    "PromptMoved",
    "PromptTracker",
    "PromptValidationError",
    "ServerError",
    "ServerUnreachable",
    "WorkflowError",
    "WorkflowNotRunnable",
    "ComfyUIWorkflow",
    "SeedMode",
    "choose_seed",
    "outputs_from_history",
]
