"""The ``ComfyUIServer`` Prefect Block: where a ComfyUI server is and how to talk to it."""

from __future__ import annotations

from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from .catalog import DOCUMENTATION_URL, LOGO_URL
from .connection import ComfyUIConnection
from .transport import ws_url_for


class ComfyUIServer(Block):
    """Settings of one ComfyUI server; :meth:`connect` opens the live connection.

    The WebSocket URL is derived from ``url`` (http -> ws, https -> wss). An ``api_key`` is
    sent as ``Authorization: Bearer <key>`` on every HTTP request and on the WebSocket
    upgrade, and is never logged. For https with a certificate signed by a private CA, set
    ``ca_bundle`` to that CA's PEM file (used by HTTP and the WebSocket alike); a certificate that
    fails verification raises :class:`~.errors.CertificateNotTrusted` at once, never retried.

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
    _logo_url = LOGO_URL
    _description = (
        "A ComfyUI server (HTTP + WebSocket) that runs generation workflows: its URL, API key, "
        "headers and timeouts."
    )
    _documentation_url = DOCUMENTATION_URL
    # A refused value may hold a secret (a url with a password): never echo it in errors.
    model_config = ConfigDict(hide_input_in_errors=True)

    # Required (no default): a deployment's {"$ref": ...} parameter must not also validate as a
    # server of all defaults, or Prefect's API refuses the flow run as ambiguous.
    url: str = Field(
        ...,
        description="Base URL of the ComfyUI server, e.g. http://127.0.0.1:8188 (the WebSocket URL is derived).",
        examples=["http://127.0.0.1:8188"],
    )
    public_url: Optional[str] = Field(
        default=None,
        title="Public URL",
        description="Base URL of this server as the people reading the report reach it (the "
                    "report's gallery loads images from its /view), when that differs from url, "
                    "e.g. https://comfy.example.com behind a proxy. Default: url.",
        examples=["https://comfy.example.com"],
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
    ca_bundle: Optional[str] = Field(
        default=None,
        title="CA bundle",
        description="Path of a PEM file with the CA certificate(s) that signed the server's "
                    "certificate (a private CA), for https and wss alike; read on the machine that "
                    "runs the flow. Default: the usual public CAs. Ignored when verify_tls is off.",
        examples=["/etc/ssl/private-ca.pem"],
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
    share_slots: bool = Field(
        default=True,
        description="Share this server's slots with every other flow run through a Prefect global "
                    "concurrency limit named comfyui-<block name> (created with max_in_flight slots; "
                    "change it on the Concurrency page of the Prefect UI). Off: each flow run may "
                    "send max_in_flight prompts of its own.",
    )
    reconnect_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a generation waits for its server to answer again before it fails "
                    "(and is retried). The connection itself keeps reconnecting while the run lasts.",
    )
    failover_after_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a generation waits for its unreachable server before it moves to "
                    "another server of the pool that has a free slot.",
    )
    keepalive_s: float = Field(
        default=1.5,
        gt=0,
        description="Seconds of WebSocket silence before a ping; a socket that answers nothing "
                    "within as long again (or gets no queue status after our POST) is replaced.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if "@" in value:
            # Never echo the value: it holds a password. URLs end up in logs, artifacts, results.
            raise ValueError(
                "ComfyUI url must not contain a user name or password (user:pass@host): they "
                "would be shown in logs, reports and results. Put the key in api_key (sent as "
                "'Authorization: Bearer <key>') or the credentials in headers (e.g. "
                "{'Authorization': 'Basic ...'}), which are kept secret"
            )
        if parts.query or parts.fragment or value.strip().endswith(("?", "#")):
            # The endpoints are appended to the base URL; a ?token=... would also be logged.
            raise ValueError(
                "ComfyUI url must be the server's base URL, without ?query or #fragment (the "
                "endpoints are appended to it). Put a token in api_key or headers, which are kept "
                "secret"
            )
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"ComfyUI url must look like http://host:8188 or https://host, got {value!r}"
            )
        return value.strip().rstrip("/")

    @field_validator("public_url", mode="before")
    @classmethod
    def _check_public_url(cls, value: Any) -> Any:
        # The UI's form sends "" for an empty field: the default (url). Otherwise the rules of url.
        if not isinstance(value, str):
            return value  # None, or a wrong type that pydantic refuses
        return cls._check_url(value) if value.strip() else None

    @field_validator("ca_bundle", mode="before")
    @classmethod
    def _no_empty_ca_bundle(cls, value: Any) -> Any:
        # The UI's form sends "" for a cleared field. The file itself is checked where the block is
        # used (connect()): a block saved on one machine is often used on another (a worker).
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("headers", mode="before")
    @classmethod
    def _empty_headers(cls, value: Any) -> Any:
        # Prefect records an unsaved block's empty headers in a flow run's parameters as "".
        return {} if value in ("", None) else value

    @field_validator("api_key", "headers")
    @classmethod
    def _not_masked(cls, value: Any) -> Any:
        secrets = ([value.get_secret_value()] if isinstance(value, SecretStr) else
                   list((value.get_secret_value() if value is not None else {}).values()))
        if any(isinstance(v, str) and len(v) >= 8 and set(v) == {"*"} for v in secrets):
            raise ValueError(
                "a secret of this ComfyUI Server is the mask Prefect shows instead of it "
                "('********'): the server was not a saved block when this flow run started, so "
                "its secrets were not recorded. Save the server as a block and start a new run "
                "with it (deployments always use saved blocks)"
            )
        return value

    def request_headers(self) -> dict[str, str]:
        """The headers sent on HTTP and WebSocket: ``headers`` plus ``Authorization`` if set."""
        headers = {str(k): str(v) for k, v in self.headers.get_secret_value().items()}
        if self.api_key is not None and self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return headers

    def ws_url(self, client_id: str) -> str:
        """The WebSocket URL for ``client_id``: ``ws(s)://host/ws?clientId=<client_id>``."""
        return ws_url_for(self.url, client_id)

    def connect(self, *, slot_condition=None, logger=None) -> ComfyUIConnection:
        """Open one connection: ``GET /system_stats``, then ``/ws?clientId=<uuid4>``.

        ``logger``: where the connection's warnings go (default: ``comfy_pipeline.connection``).

        Returns:
            an open :class:`ComfyUIConnection`; use it as a context manager or call
            ``close()`` in a ``finally``.

        Raises:
            ServerUnreachable: within ``connect_timeout_s`` seconds, naming the URL.
            CertificateNotTrusted: the server's TLS certificate failed verification (set
                ``ca_bundle``, or ``verify_tls=False``); at once, never retried.
            CABundleUnusable: ``ca_bundle`` is not a PEM file with a certificate on this machine.
            AuthenticationFailed: the server refused the API key (401/403).
        """
        connection = ComfyUIConnection(
            self.url,
            headers=self.request_headers(),
            verify_tls=self.verify_tls,
            ca_bundle=self.ca_bundle,
            connect_timeout_s=self.connect_timeout_s,
            generation_timeout_s=self.generation_timeout_s,
            queue_timeout_s=self.queue_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            reconnect_timeout_s=self.reconnect_timeout_s,
            failover_after_s=self.failover_after_s,
            keepalive_s=self.keepalive_s,
            max_in_flight=self.max_in_flight,
            slot_condition=slot_condition,
            logger=logger,
        )
        return connection.open()


_UNSAVED = "unsaved:"  # marks ComfyUIServerPool.of()'s entries: servers that are not saved blocks


class ComfyUIServerPool(Block):
    """Several ComfyUI servers (GPUs) shared by one flow run, one connection each.

    The pool refers to saved **ComfyUI Server** blocks by name, it does not copy them: their
    API keys and headers stay in those blocks (never stored or shown by the pool), and editing
    a server block changes every pool that names it. Each generation goes to the server with
    the most free capacity; a server that fails at connect or dies mid-run is taken out of
    rotation and its work goes to the others.

    For servers that are not saved (a script, the CLI's repeated ``--server``), build an
    in-process pool with :meth:`of`; such a pool cannot be saved.

    Example:
        ```python
        from comfy_pipeline.blocks import ComfyUIServerPool

        pool = ComfyUIServerPool.load("BLOCK_NAME")
        print([server.url for server in pool.load_servers()])
        ```
    """

    _block_type_name = "ComfyUI Server Pool"
    _block_type_slug = "comfyui-server-pool"
    _logo_url = LOGO_URL
    _description = (
        "Several saved ComfyUI Server blocks (GPUs) that share the generations of a flow run."
    )
    _documentation_url = DOCUMENTATION_URL
    model_config = ConfigDict(hide_input_in_errors=True)  # a mistaken entry may be a URL with a password

    servers: list[str] = Field(
        ...,
        min_length=1,
        title="Server blocks",
        description=(
            "Names of saved ComfyUI Server blocks, e.g. gpu-1 (or comfyui-server/gpu-1); each "
            "keeps its own URL, secrets and timeouts."
        ),
        examples=[["gpu-1", "gpu-2"]],
    )
    _inline: Optional[list[ComfyUIServer]] = PrivateAttr(default=None)

    @field_validator("servers")
    @classmethod
    def _check_names(cls, names: list[str]) -> list[str]:
        cleaned = []
        for name in names:
            name = str(name).strip()
            if name.startswith(f"{ComfyUIServer._block_type_slug}/"):
                name = name.split("/", 1)[1]
            if name.startswith(_UNSAVED):
                cleaned.append(name)  # recorded by of(); load_servers() explains
                continue
            if not name or "/" in name or ":" in name or "@" in name:
                shown = "a URL" if "@" in name else repr(name)  # never echo credentials
                raise ValueError(
                    f"a pool lists saved ComfyUI Server block names such as 'gpu-1', got {shown}; "
                    "save each server first: ComfyUIServer(url=...).save('gpu-1')"
                )
            cleaned.append(name)
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"a server is listed twice in {cleaned}")
        return cleaned

    @classmethod
    def of(cls, servers: Sequence[ComfyUIServer]) -> "ComfyUIServerPool":
        """An in-process pool of server blocks that need not be saved (not savable itself).

        Raises:
            ValueError: ``servers`` is empty.
        """
        if not servers:
            raise ValueError("a pool needs at least one server")
        # What a flow run records of this pool: no block name, so that a later load (a retry of
        # the run) can never pick up an unrelated saved block.
        pool = cls(servers=[f"{_UNSAVED}{server.url}" for server in servers])
        pool._inline = list(servers)
        return pool

    def load_servers(self) -> list[ComfyUIServer]:
        """The pool's ComfyUI Server blocks, loaded by name from the Prefect API.

        Raises:
            ValueError: a named block does not exist (the message names it and says how to save it).
        """
        if self._inline is not None:
            return list(self._inline)
        unsaved = [name[len(_UNSAVED):] for name in self.servers if name.startswith(_UNSAVED)]
        if unsaved:
            raise ValueError(
                f"this pool was built in another process from servers that are not saved blocks "
                f"({', '.join(unsaved)}), so it cannot be loaded again (e.g. to retry its flow run). "
                "Save each server as a ComfyUI Server block and a ComfyUIServerPool of their names, "
                "or start a new run"
            )
        loaded = []
        for name in self.servers:
            try:
                loaded.append(ComfyUIServer.load(name))
            except ValueError as exc:
                raise ValueError(
                    f"ComfyUI Server Pool lists {name!r}, but no ComfyUI Server block of that name "
                    f"is saved ({exc}); save it with ComfyUIServer(url=...).save({name!r}) or "
                    "fix the pool's list"
                ) from None
        return loaded

    def _to_block_document(self, *args: Any, **kwargs: Any) -> Any:
        # Every save goes through here (sync or async).
        if self._inline is not None:
            raise ValueError(
                "this pool holds unsaved servers (ComfyUIServerPool.of); save each server as a "
                "ComfyUI Server block and save ComfyUIServerPool(servers=[their names]) instead"
            )
        return super()._to_block_document(*args, **kwargs)

    @property
    def url(self) -> str:
        """The servers' URLs (in-process pools) or block names, comma-separated, for logs."""
        if self._inline is not None:
            return ", ".join(server.url for server in self._inline)
        return ", ".join(self.servers)
