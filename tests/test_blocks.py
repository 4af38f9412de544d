"""The ComfyUI Server block: Prefect's standard block checks, URLs, secrets, saving and loading."""

from __future__ import annotations

import pickle

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from comfy_pipeline.blocks.server import ComfyUIServer


class TestComfyUIServerBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return ComfyUIServer


@pytest.mark.parametrize(
    "url, ws",
    [
        ("http://127.0.0.1:8188", "ws://127.0.0.1:8188/ws?clientId=abc"),
        ("https://gpu.example.com/", "wss://gpu.example.com/ws?clientId=abc"),
        ("https://proxy.example.com/comfy", "wss://proxy.example.com/comfy/ws?clientId=abc"),
    ],
)
def test_websocket_url_is_derived_from_the_http_url(url, ws):
    assert ComfyUIServer(url=url).ws_url("abc") == ws


@pytest.mark.parametrize("bad", ["127.0.0.1:8188", "ftp://host", "ws://host:8188", "http://"])
def test_urls_that_are_not_http_are_refused(bad):
    with pytest.raises(ValidationError, match="http://host:8188"):
        ComfyUIServer(url=bad)


def test_api_key_becomes_a_bearer_header_and_stays_secret():
    server = ComfyUIServer(url="http://h:1", api_key="k-123", headers={"X-Team": "art"})
    assert server.request_headers() == {"X-Team": "art", "Authorization": "Bearer k-123"}
    assert "k-123" not in repr(server) and "k-123" not in str(server.model_dump())
    assert ComfyUIServer(url="http://h:1").request_headers() == {}


def test_block_pickles_and_round_trips_through_the_prefect_api(prefect_api):
    server = ComfyUIServer(url="http://gpu-1:8188", api_key="k-456", generation_timeout_s=120)
    server.save("test-gpu-1", overwrite=True)
    loaded = ComfyUIServer.load("test-gpu-1")
    assert loaded.url == "http://gpu-1:8188" and loaded.generation_timeout_s == 120
    assert loaded.api_key.get_secret_value() == "k-456"
    assert pickle.loads(pickle.dumps(loaded)).url == loaded.url
