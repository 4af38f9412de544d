"""Shared fixtures: the stand-in ComfyUI server and Prefect's local test API."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tests.standin import StandInComfyUI

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "workflows"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """Prefect's own temporary API server for the whole session (flows, artifacts, logs),
    with task results persisted under a temporary folder."""
    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield


@pytest.fixture
def comfy():
    """A fresh stand-in ComfyUI server on 127.0.0.1 (random port)."""
    server = StandInComfyUI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def no_leaked_threads():
    """Fails the test if a WebSocket reader thread of ours is still alive at the end."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("comfyui-reader") and t.is_alive()]
    assert not leaked, f"reader threads left alive: {leaked}"
