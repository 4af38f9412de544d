"""The block types: Prefect's standard block checks, registration, URLs, secrets, saving and loading."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import urllib.request

import pytest
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

import comfy_pipeline.blocks as blocks_module
from comfy_pipeline.blocks import ComfyUIServer, ComfyUIServerPool, ComfyUIWorkflow
from comfy_pipeline.blocks.catalog import LOGO_URL
from tests.conftest import EXAMPLES

BLOCK_TYPES = [ComfyUIServer, ComfyUIServerPool, ComfyUIWorkflow]


@pytest.fixture
def logo_served_offline():
    """This machine has no network: answer exactly our logo URL (GitHub's 256 px avatar of
    Comfy-Org) with a 256 x 256 PNG, so the standard suite's image check runs instead of
    failing on DNS. Any other URL still goes to the network."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (256, 256), (30, 30, 30, 255)).save(buffer, format="PNG")
    png = buffer.getvalue()

    class LogoHandler(urllib.request.BaseHandler):
        handler_order = 100  # before the HTTPS handler

        def https_open(self, request):
            if request.full_url != LOGO_URL:
                return None
            response = urllib.response.addinfourl(io.BytesIO(png), {"Content-Type": "image/png"},
                                                  request.full_url, 200)
            response.msg = "OK"
            return response

    urllib.request.install_opener(urllib.request.build_opener(LogoHandler()))
    try:
        yield
    finally:
        urllib.request.install_opener(None)


@pytest.mark.usefixtures("logo_served_offline")
class TestComfyUIServerBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return ComfyUIServer


@pytest.mark.usefixtures("logo_served_offline")
class TestComfyUIServerPoolBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return ComfyUIServerPool


@pytest.mark.usefixtures("logo_served_offline")
class TestComfyUIWorkflowBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return ComfyUIWorkflow


def test_every_block_type_is_exported_by_the_package():
    exported = {name: getattr(blocks_module, name) for name in blocks_module.__all__}
    found = {cls for cls in exported.values() if isinstance(cls, type) and issubclass(cls, Block)}
    assert found == set(BLOCK_TYPES)
    assert {cls.get_block_type_slug() for cls in BLOCK_TYPES} == {
        "comfyui-server", "comfyui-server-pool", "comfyui-workflow"}


@pytest.mark.usefixtures("prefect_api")
def test_prefect_block_register_registers_every_block_type(tmp_path):
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    done = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "comfy_pipeline.blocks"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        for cls in BLOCK_TYPES:
            block_type = client.read_block_type_by_slug(cls.get_block_type_slug())
            assert block_type.name == cls.get_block_type_name()
            assert block_type.logo_url and block_type.documentation_url
            assert "load(\"BLOCK_NAME\")" in block_type.code_example


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


@pytest.mark.parametrize("url", ["http://user:s3cret-pw@gpu-1:8188", "https://s3cret-pw@gpu-1",
                                 "user:s3cret-pw@gpu-1:8188", "ws://user:s3cret-pw@gpu-1"])
def test_a_url_with_credentials_is_refused_without_echoing_them(url):
    with pytest.raises(ValidationError) as caught:
        ComfyUIServer(url=url)
    message = str(caught.value)
    assert "api_key" in message and "headers" in message
    assert "s3cret-pw" not in message


@pytest.mark.parametrize("url", ["http://gpu-1:8188/?token=s3cret-pw", "http://gpu-1:8188#s3cret-pw"])
def test_a_url_with_a_query_or_fragment_is_refused_without_echoing_it(url):
    with pytest.raises(ValidationError, match="without \\?query or #fragment") as caught:
        ComfyUIServer(url=url)
    assert "s3cret-pw" not in str(caught.value)


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


def test_a_pool_refers_to_saved_servers_so_no_secret_is_copied_and_edits_reach_it(prefect_api):
    ComfyUIServer(url="http://gpu-a:8188", api_key="sk-pool-secret-a", headers={"X-Token": "hdr-secret-b"}
                  ).save("pool-gpu-a", overwrite=True)
    ComfyUIServer(url="http://gpu-b:8188").save("pool-gpu-b", overwrite=True)
    ComfyUIServerPool(servers=["pool-gpu-a", "comfyui-server/pool-gpu-b"]).save("pool-ab", overwrite=True)

    with get_client(sync_client=True) as client:
        documents = [client.read_block_document_by_name("pool-ab", "comfyui-server-pool", include_secrets=False),
                     client.read_block_document_by_name("pool-gpu-a", "comfyui-server", include_secrets=False)]
    for document in documents:
        assert "sk-pool-secret-a" not in document.model_dump_json()
        assert "hdr-secret-b" not in document.model_dump_json()
    assert documents[0].data == {"servers": ["pool-gpu-a", "pool-gpu-b"]}

    # editing a saved server changes what every pool that names it connects to
    ComfyUIServer(url="http://gpu-a2:8188", api_key="sk-pool-secret-a").save("pool-gpu-a", overwrite=True)
    servers = ComfyUIServerPool.load("pool-ab").load_servers()
    assert [s.url for s in servers] == ["http://gpu-a2:8188", "http://gpu-b:8188"]
    assert servers[0].api_key.get_secret_value() == "sk-pool-secret-a"


def test_a_pool_names_a_missing_server_block_clearly(prefect_api):
    pool = ComfyUIServerPool(servers=["no-such-gpu"])
    with pytest.raises(ValueError, match="'no-such-gpu'.*save it with ComfyUIServer"):
        pool.load_servers()


@pytest.mark.parametrize("entry", ["http://gpu-1:8188", "", "a/b", "http://admin:s3cret-pw@gpu-1:8188"])
def test_a_pool_lists_block_names_not_urls(entry):
    with pytest.raises(ValidationError, match="saved ComfyUI Server block names") as caught:
        ComfyUIServerPool(servers=[entry])
    assert "s3cret-pw" not in str(caught.value)


def test_a_recorded_in_process_pool_never_loads_saved_blocks_of_other_names(prefect_api):
    """What a flow run records of ComfyUIServerPool.of(...) names no block: loading it again (a
    retry of that run) refuses, rather than picking up whatever blocks are saved."""
    ComfyUIServer(url="http://unrelated:8188").save("server-1", overwrite=True)
    recorded = ComfyUIServerPool.of([ComfyUIServer(url="http://gpu-a:8188")]).model_dump()
    again = ComfyUIServerPool.model_validate(recorded)
    with pytest.raises(ValueError, match="not saved blocks .http://gpu-a:8188.*cannot be loaded again"):
        again.load_servers()


def test_an_in_process_pool_of_unsaved_servers_cannot_be_saved(prefect_api):
    pool = ComfyUIServerPool.of([ComfyUIServer(url="http://gpu-1:8188", api_key="sk-inline")])
    assert [s.url for s in pool.load_servers()] == ["http://gpu-1:8188"]
    with pytest.raises(ValueError, match="save each server as a ComfyUI Server block"):
        pool.save("inline-pool", overwrite=True)


def test_a_workflow_block_saves_and_loads_with_its_bindings(prefect_api):
    workflow = ComfyUIWorkflow.from_file(EXAMPLES / "smoke_image.json")
    workflow.save("test-smoke-image", overwrite=True)
    loaded = ComfyUIWorkflow.load("test-smoke-image")
    assert loaded.prompt == workflow.prompt and loaded.bindings == workflow.bindings
    params = {"prompt": "a red fox", "slug": "a-red-fox", "character_slug": "alice", "index": 0, "variant": 1}
    assert loaded.render(params) == workflow.render(params)
