"""The ``ComfyUIServer`` Prefect Block: where a ComfyUI server is and how to talk to it."""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field, SecretStr, field_validator

from .connection import ComfyUIConnection, ws_url_for


class ComfyUIServer(Block):
    """Settings of one ComfyUI server; :meth:`connect` opens the live connection.

    The WebSocket URL is derived from ``url`` (http -> ws, https -> wss). An ``api_key`` is
    sent as ``Authorization: Bearer <key>`` on every HTTP request and on the WebSocket
    upgrade, and is never logged.

    Example:
        ```python
        from comfy_pipeline.blocks import ComfyUIServer

        server = ComfyUIServer.load("BLOCK_NAME")
        with server.connect() as connection:
            print(connection.system_stats())
        ```
    """

    _block_type_name = "ComfyUI Server"
    _block_type_slug = "comfyui-server"
    _description = "A ComfyUI server (HTTP + WebSocket) that runs generation workflows."
    _documentation_url = "https://docs.comfy.org/development/comfyui-server/comms_routes"

    # Required (no default): a deployment's {"$ref": ...} parameter must not also validate as a
    # server of all defaults, or Prefect's API refuses the flow run as ambiguous.
    url: str = Field(
        ...,
        description="Base URL of the ComfyUI server, e.g. http://127.0.0.1:8188 (the WebSocket URL is derived).",
        examples=["http://127.0.0.1:8188"],
    )
    api_key: Optional[SecretStr] = Field(
        default=None,
        description="API key sent as 'Authorization: Bearer <key>' on HTTP and WebSocket.",
    )
    headers: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        description="Extra HTTP headers sent on every request and on the WebSocket upgrade (kept secret).",
    )
    verify_tls: bool = Field(
        default=True, description="Verify the server's TLS certificate for https/wss."
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds allowed to reach the server and open the WebSocket.",
    )
    generation_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds one generation may run once ComfyUI started it (queue time not counted).",
    )
    queue_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds one generation may wait in ComfyUI's queue before it starts.",
    )
    idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds without a message for a generation before asking the server about it.",
    )
    max_in_flight: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Prompts in flight on this server at once (2: one running, the next already queued).",
    )
    reconnect_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds to keep reconnecting a dropped WebSocket before giving up.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"ComfyUI url must look like http://host:8188 or https://host, got {value!r}"
            )
        return value.strip().rstrip("/")

    def request_headers(self) -> dict[str, str]:
        """The headers sent on HTTP and WebSocket: ``headers`` plus ``Authorization`` if set."""
        headers = {str(k): str(v) for k, v in self.headers.get_secret_value().items()}
        if self.api_key is not None and self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return headers

    def ws_url(self, client_id: str) -> str:
        """The WebSocket URL for ``client_id``: ``ws(s)://host/ws?clientId=<client_id>``."""
        return ws_url_for(self.url, client_id)

    def connect(self, *, slot_condition=None) -> ComfyUIConnection:
        """Open one connection: ``GET /system_stats``, then ``/ws?clientId=<uuid4>``.

        Returns:
            an open :class:`ComfyUIConnection`; use it as a context manager or call
            ``close()`` in a ``finally``.

        Raises:
            ServerUnreachable: within ``connect_timeout_s`` seconds, naming the URL.
            AuthenticationFailed: the server refused the API key (401/403).
        """
        connection = ComfyUIConnection(
            self.url,
            headers=self.request_headers(),
            verify_tls=self.verify_tls,
            connect_timeout_s=self.connect_timeout_s,
            generation_timeout_s=self.generation_timeout_s,
            queue_timeout_s=self.queue_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            reconnect_timeout_s=self.reconnect_timeout_s,
            max_in_flight=self.max_in_flight,
            slot_condition=slot_condition,
        )
        return connection.open()


class ComfyUIServerPool(Block):
    """Several ComfyUI servers used together by one flow run (one connection each).

    Each generation goes to the server with the most free capacity; a server that fails at
    connect or dies mid-run is taken out of rotation and its work goes to the others.

    Example:
        ```python
        from comfy_pipeline.blocks import ComfyUIServerPool

        pool = ComfyUIServerPool.load("BLOCK_NAME")
        print([server.url for server in pool.servers])
        ```
    """

    _block_type_name = "ComfyUI Server Pool"
    _block_type_slug = "comfyui-server-pool"
    _description = "Several ComfyUI servers (GPUs) that share the generations of a flow run."
    _documentation_url = "https://docs.comfy.org/development/comfyui-server/comms_routes"

    servers: list[ComfyUIServer] = Field(
        ..., min_length=1, description="The servers; each keeps its own settings and timeouts."
    )

    @property
    def url(self) -> str:
        """The servers' URLs, comma-separated (for logs and the report)."""
        return ", ".join(server.url for server in self.servers)
