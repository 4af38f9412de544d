"""Prefect Blocks and the live connection for ComfyUI.

Register every block type with ``prefect block register -m comfy_pipeline.blocks``.

- :class:`ComfyUIServer`, :class:`ComfyUIServerPool` (``server.py``): the Blocks with settings
  and secrets.
- :class:`ComfyUIWorkflow` (``workflow.py``): the Block holding a workflow and its bindings.
- :class:`ConnectionPool` (``pool.py``): the live connections of one flow run.
- :class:`ComfyUIConnection` (``connection.py``): one WebSocket + HTTP session, the reader
  thread that routes messages by ``prompt_id``.
- ``protocol.py``: message parsing and the per-prompt tracker, no I/O.
- ``workflow.py``: workflow templates, parameter bindings and seeds.
- ``errors.py``: one exception type per failure a user can meet.
"""

from .connection import ComfyUIConnection, ConnectionStats, PromptOutcome
from .errors import (
    AuthenticationFailed,
    ComfyUIError,
    ConnectionLost,
    DownloadFailed,
    ExecutionInterrupted,
    GenerationCancelled,
    GenerationTimeout,
    NodeExecutionError,
    OutputError,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
    WorkflowError,
)
from .protocol import OutputRef, PromptEvent, PromptTracker, outputs_from_history
from .pool import ConnectionPool
from .server import ComfyUIServer, ComfyUIServerPool
from .workflow import ComfyUIWorkflow, SeedMode, choose_seed, load_workflow_file

__all__ = [
    "AuthenticationFailed",
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
    "GenerationTimeout",
    "NodeExecutionError",
    "OutputError",
    "OutputRef",
    "PromptEvent",
    "PromptOutcome",
    "PromptTracker",
    "PromptValidationError",
    "ServerError",
    "ServerUnreachable",
    "WorkflowError",
    "ComfyUIWorkflow",
    "SeedMode",
    "choose_seed",
    "load_workflow_file",
    "outputs_from_history",
]
