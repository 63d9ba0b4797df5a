"""The upstream transport over real TLS (a throwaway CA and a loopback server): answers arrive,
the Host header is what the server expects, and a server that never finishes the handshake is
cut off at the connect timeout."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.handler import App
from streamgate.httpclient import Upstream
from streamgate.providers.openai import OpenAIProvider
from tests.fake_http import RawPeer, read_request
from tests.helpers import body_bytes, chat_event


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA bundle, server certificate, server key) for 127.0.0.1, made for this run."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    bundle, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    bundle.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return bundle, cert_file, key_file


@pytest.fixture
def trusting(tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the default SSL context trust the throwaway CA (as SSL_CERT_FILE does)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
def tls_upstream(tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[str, list[bytes]]]:
    """An HTTPS server on 127.0.0.1 answering every request with one completion."""
    _, cert_file, key_file = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    heads: list[bytes] = []
    doc = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "secure"}}]})

    def serve(sock: socket.socket) -> None:
        with context.wrap_socket(sock, server_side=True) as tls:
            while request := read_request(tls):
                heads.append(request.split(b"\r\n\r\n")[0])
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(doc), doc.encode()))

    with RawPeer(serve) as peer:
        yield f"https://127.0.0.1:{peer.port}/v1", heads


def _app(url: str, **settings: object) -> tuple[App, OpenAIProvider]:
    s = load_settings({}, provider="openai", upstream_base_url=url, upstream_models=("m",),
                      **settings)
    provider = OpenAIProvider(s, ApiKey(None, 60), Upstream(url, s.upstream_connect_timeout_s))
    return App(s, provider), provider


@pytest.mark.usefixtures("trusting")
def test_an_https_upstream_answers_over_one_kept_alive_connection(
    tls_upstream: tuple[str, list[bytes]],
) -> None:
    url, heads = tls_upstream
    app, provider = _app(url)
    try:
        for _ in range(2):
            response = app.handle(chat_event({"model": "m", "prompt": "hi"}))
            assert response.status == 200
            assert json.loads(body_bytes(response))["choices"][0]["message"]["content"] == (
                "secure")
    finally:
        provider.close()
    port = url.split(":")[2].split("/")[0]
    assert all(f"\r\nHost: 127.0.0.1:{port}".encode() in head for head in heads)
    assert len(heads) == 2


@pytest.mark.usefixtures("trusting")
def test_a_server_that_never_finishes_the_handshake_is_cut_off_at_the_connect_timeout() -> None:
    # GIVEN a peer that starts a 16 KB handshake record and then sends it a byte every 100 ms
    # (each byte comes well within the connect timeout; the record would take half an hour)
    stop = threading.Event()

    def stall(sock: socket.socket) -> None:
        sock.recv(4096)  # the ClientHello
        sock.sendall(b"\x16\x03\x03\x40\x00")
        while not stop.wait(0.1):
            sock.sendall(b"\x00")

    with RawPeer(stall) as peer:
        app, provider = _app(f"https://127.0.0.1:{peer.port}/v1",
                             upstream_connect_timeout_s=0.5, upstream_max_attempts=1)
        started = time.monotonic()
        response = app.handle(chat_event({"model": "m", "prompt": "hi"}))
        waited = time.monotonic() - started
        stop.set()
        provider.close()
    assert response.status == 504
    assert json.loads(body_bytes(response))["error"]["message"] == (
        f"Could not connect to the upstream at 127.0.0.1:{peer.port} in time")
    assert waited < 3


def test_an_untrusted_certificate_is_a_502_naming_tls(
    tls_upstream: tuple[str, list[bytes]],
) -> None:
    url, _ = tls_upstream
    app, provider = _app(url, upstream_max_attempts=1)
    try:
        response = app.handle(chat_event({"model": "m", "prompt": "hi"}))
        doc = json.loads(body_bytes(response))
    finally:
        provider.close()
    assert response.status == 502
    assert doc["error"]["message"].startswith("TLS with the upstream at 127.0.0.1:")
