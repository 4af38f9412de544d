"""TLS against the stand-in served over https/wss with certificates made here (a private CA).

A certificate the client does not trust fails at once with :class:`CertificateNotTrusted` (one
line naming the URL and what to do), never retried; ``ca_bundle`` (``--ca-bundle``) makes HTTP
and the WebSocket trust the private CA; ``verify_tls=False`` (``--insecure``) skips the check.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from comfy_pipeline.blocks.errors import CABundleUnusable, CertificateNotTrusted, ConnectionLost
from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.cli import app
from comfy_pipeline.tasks.generate import is_transient
from tests.conftest import EXAMPLES, ROOT
from tests.faultproxy import FaultProxy
from tests.standin import StandInComfyUI

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

PROMPT = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tls/img"}},
}


# ---------------------------------------------------------------- certificates made in the test
def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path, name: str) -> dict[str, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1 (EC P-256, valid one day).

    Returns the paths ``ca`` (the CA's certificate, PEM), ``cert`` and ``key`` (the server's)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / f"{name}-ca.pem", "cert": directory / f"{name}-server.pem",
             "key": directory / f"{name}-server.key"}
    paths["ca"].write_bytes(_pem(ca))
    paths["cert"].write_bytes(_pem(cert))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    return {"a": make_pki(directory, "a"), "b": make_pki(directory, "b")}


def server_context(paths: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths["cert"], paths["key"])
    return context


@pytest.fixture
def tls_comfy(pki):
    """The stand-in over https/wss with a certificate of the private CA ``a``."""
    with StandInComfyUI(ssl_context=server_context(pki["a"])) as server:
        yield server


def assert_one_line_certificate_error(text: str, url: str) -> None:
    assert "\n" not in text.strip(), text
    assert f"the certificate of {url} is not trusted" in text, text
    assert "--ca-bundle" in text and "ca_bundle" in text, text


# ---------------------------------------------------------------- the connection (no Prefect)
def test_untrusted_certificate_fails_at_once_with_its_own_error_in_one_attempt(tls_comfy):
    with FaultProxy(tls_comfy.port) as proxy:  # counts the TCP connections made
        url = f"https://127.0.0.1:{proxy.port}"
        began = time.monotonic()
        with pytest.raises(CertificateNotTrusted) as caught:
            ComfyUIServer(url=url, connect_timeout_s=5).connect()
        elapsed = time.monotonic() - began
        connections = proxy.connections
    assert elapsed < 2.0
    assert connections == 1  # one TLS handshake: neither urllib3 nor we tried again
    assert sum(tls_comfy.requests.values()) == 0 and tls_comfy.ws_opened == 0
    error = caught.value
    assert_one_line_certificate_error(str(error), url)
    assert "unable to get local issuer certificate" in error.reason
    assert not is_transient(error)  # the generate task never retries it
    assert not isinstance(error, ConnectionLost)


def test_ca_bundle_is_trusted_by_http_and_websocket_a_prompt_runs_and_downloads(tls_comfy, pki, tmp_path):
    assert tls_comfy.url.startswith("https://")
    server = ComfyUIServer(url=tls_comfy.url, ca_bundle=str(pki["a"]["ca"]))
    with server.connect() as conn:
        outcome, refs = conn.run_prompt(PROMPT)  # its messages come over wss
        path, size = conn.download(refs[0], tmp_path / "out.png")
    assert path.read_bytes() == tls_comfy.files[("output", "tls", refs[0].filename)] and size > 0
    assert tls_comfy.ws_opened == 1 and outcome.prompt_id in tls_comfy.executed_prompt_ids


def test_verify_tls_false_skips_the_check_with_a_warning(tls_comfy, caplog):
    caplog.set_level(logging.WARNING, logger="comfy_pipeline.connection")
    with ComfyUIServer(url=tls_comfy.url, verify_tls=False).connect() as conn:
        _, refs = conn.run_prompt(PROMPT)
    assert refs and tls_comfy.ws_opened == 1
    assert any("is not verified" in r.getMessage() for r in caplog.records)


def test_a_ca_bundle_of_another_ca_says_so(tls_comfy, pki):
    with pytest.raises(CertificateNotTrusted) as caught:
        ComfyUIServer(url=tls_comfy.url, ca_bundle=str(pki["b"]["ca"])).connect()
    text = str(caught.value)
    assert "not trusted" in text and f"the CA bundle {pki['b']['ca']}" in text and "\n" not in text


def test_a_host_name_the_certificate_does_not_name_is_told_apart(tls_comfy, pki):
    url = f"https://localhost:{tls_comfy.port}"  # the certificate names 127.0.0.1 only
    with pytest.raises(CertificateNotTrusted) as caught:
        ComfyUIServer(url=url, ca_bundle=str(pki["a"]["ca"]), connect_timeout_s=5).connect()
    assert "host name the certificate was issued for" in str(caught.value)


@pytest.mark.parametrize("problem", ["missing", "directory", "not_pem"])
def test_an_unusable_ca_bundle_is_named_when_the_block_is_used(tls_comfy, tmp_path, problem):
    path = {"missing": tmp_path / "nope.pem", "directory": tmp_path}.get(problem, tmp_path / "key.txt")
    if problem == "not_pem":
        path.write_text("not a certificate\n")
    server = ComfyUIServer(url=tls_comfy.url, ca_bundle=str(path))  # a block may be made elsewhere
    with pytest.raises(CABundleUnusable) as caught:
        server.connect()
    assert f"the CA bundle {path} for {tls_comfy.url} cannot be used" in str(caught.value)
    assert not is_transient(caught.value)
    assert ComfyUIServer(url=tls_comfy.url, ca_bundle="  ").ca_bundle is None  # a cleared form field


def test_a_certificate_that_changes_mid_run_is_logged_once_and_not_retried(pki, caplog):
    """The WebSocket drops and the server now shows a certificate of another CA: the reconnect
    loop says so once at ERROR (not a debug line per try), and HTTP fails with the error."""
    caplog.set_level(logging.DEBUG, logger="comfy_pipeline")
    with StandInComfyUI(ssl_context=server_context(pki["a"])) as first, \
            StandInComfyUI(ssl_context=server_context(pki["b"])) as second, \
            FaultProxy(first.port) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        with ComfyUIServer(url=url, ca_bundle=str(pki["a"]["ca"])).connect() as conn:
            proxy.target_port = second.port
            proxy.drop_all()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "not trusted" not in conn.transport.down_reason:
                time.sleep(0.05)
            time.sleep(1.5)  # a few more reconnect tries
            assert "the certificate of" in conn.transport.down_reason
            with pytest.raises(CertificateNotTrusted):
                conn.http.system_stats()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "cannot reconnect" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "not trusted" in errors[0].getMessage()


# ---------------------------------------------------------------- the command line
runner = CliRunner()


def test_cli_check_with_ca_bundle_or_insecure_exits_0_and_without_exits_1_in_one_line(tls_comfy, pki):
    trusted = runner.invoke(app, ["check", "--server", tls_comfy.url, "--ca-bundle", str(pki["a"]["ca"])])
    assert trusted.exit_code == 0, trusted.output
    assert f"reachable at {tls_comfy.url}" in trusted.output

    insecure = runner.invoke(app, ["check", "--server", tls_comfy.url, "--insecure"])
    assert insecure.exit_code == 0, insecure.output

    untrusted = runner.invoke(app, ["check", "--server", tls_comfy.url])
    assert untrusted.exit_code == 1
    assert_one_line_certificate_error(untrusted.output, tls_comfy.url)


def test_cli_refuses_a_missing_ca_bundle_or_both_options_with_exit_2(tls_comfy, pki, tmp_path):
    missing = runner.invoke(app, ["check", "--server", tls_comfy.url, "--ca-bundle", str(tmp_path / "no.pem")])
    assert missing.exit_code == 2
    assert "no such file" in missing.output and "\n" not in missing.output.strip()
    both = runner.invoke(app, ["check", "--server", tls_comfy.url, "--insecure", "--ca-bundle",
                               str(pki["a"]["ca"])])
    assert both.exit_code == 2 and "give one" in both.output
    assert sum(tls_comfy.requests.values()) == 0



def comfy_pipeline(*args: str) -> subprocess.CompletedProcess:
    """``comfy-pipeline ARGS`` in a new process (as a user types it) against the test Prefect API."""
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    completed = subprocess.run([sys.executable, "-m", "comfy_pipeline.flows.cli", *args], capture_output=True,
                               text=True, timeout=120, env=env, cwd=ROOT)
    completed.output = completed.stdout + completed.stderr
    return completed


@pytest.mark.usefixtures("prefect_api")
def test_cli_run_over_https_works_with_ca_bundle_and_fails_at_once_without(tls_comfy, pki, tmp_path):
    common = ["run", "--server", tls_comfy.url, "--workflow", str(EXAMPLES / "smoke_image.json"),
              "--character", "tls", "--description", "a red fox", "--output-dir", str(tmp_path / "out")]
    trusted = comfy_pipeline(*common, "--ca-bundle", str(pki["a"]["ca"]))  # the block reaches the flow
    assert trusted.returncode == 0, trusted.output
    assert [p.name for p in (tmp_path / "out").rglob("*.png")] == ["tls_d0_0.png"], trusted.output
    assert tls_comfy.ws_opened >= 1

    with FaultProxy(tls_comfy.port) as proxy:  # counts the TCP connections the run makes
        url = f"https://127.0.0.1:{proxy.port}"
        untrusted = comfy_pipeline(*common[:2], url, *common[3:], "--retries", "3", "--retry-delay", "0.1")
        connections = proxy.connections
    assert untrusted.returncode == 1, untrusted.output
    assert f"the certificate of {url} is not trusted" in untrusted.output, untrusted.output
    assert "pass --ca-bundle PATH" in untrusted.output, untrusted.output
    assert connections == 1, untrusted.output  # one TLS handshake: nothing was tried again


@pytest.mark.usefixtures("prefect_api")
def test_server_save_keeps_the_ca_bundle_for_the_worker_to_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = runner.invoke(app, ["server", "save", "tls-gpu", "--url", "https://gpu-1:8188",
                                "--ca-bundle", "private-ca.pem", "--overwrite"])
    assert saved.exit_code == 0, saved.output  # not on this machine: checked where the block is used
    assert f"CA bundle {tmp_path / 'private-ca.pem'}" in saved.output
    block = ComfyUIServer.load("tls-gpu")
    assert block.ca_bundle == str(tmp_path / "private-ca.pem") and block.verify_tls
