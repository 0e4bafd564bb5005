"""What users' environments do to the broker calls: an HTTPS broker with a private CA, a real forward proxy
(tinyproxy: plain HTTP and CONNECT, with and without credentials), NO_PROXY, ALL_PROXY, and a proxy that
refuses. Real servers only: the broker emulator (over TLS with a CA made here) and Debian's tinyproxy."""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_sftp_uploader.broker.client import BrokerClient
from broker_sftp_uploader.errors import BrokerError
from test_resources import broker_actors as actors
from test_resources.availability import require_server
from test_resources.broker_actors import ADMIN_KEY
from test_resources.broker_emulator import BrokerEmulator
from test_resources.forward_proxy import ForwardProxy

PROXY_USER = "bsu-proxy"
ENVIRONMENT = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


# ---- a private CA, made here -----------------------------------------------------------------------------

def _certificate(subject: str, key, issuer: str, issuer_key, *, authority: bool) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=authority, path_length=0 if authority else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=authority, crl_sign=authority,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if not authority:
        builder = (builder.add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1 it signed (and its key), and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paths = SimpleNamespace(ca=folder / "ca.pem", other_ca=folder / "other-ca.pem", cert=folder / "server.pem",
                            key=folder / "server.key")
    paths.ca.write_bytes(_pem(_certificate("bsu test CA", ca_key, "bsu test CA", ca_key, authority=True)))
    paths.other_ca.write_bytes(_pem(_certificate("other CA", other_key, "other CA", other_key, authority=True)))
    paths.cert.write_bytes(_pem(_certificate("127.0.0.1", server_key, "bsu test CA", ca_key, authority=False)))
    paths.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


# ---- servers and environment --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only what a test sets: no proxy or CA bundle of the machine running the tests."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def tls_broker(tmp_path, pki):
    """The broker emulator over HTTPS, its certificate signed by the private CA."""
    with BrokerEmulator(data_dir=tmp_path / "tls-broker", tls=(pki.cert, pki.key)) as emulator:
        yield emulator


def _proxy(tmp_path: Path, credentials: tuple[str, str] | None):
    require_server(ForwardProxy)
    with ForwardProxy(tmp_path / ("auth-proxy" if credentials else "proxy"), credentials) as proxy:
        yield proxy


@pytest.fixture
def proxy(tmp_path):
    """An open forward proxy."""
    yield from _proxy(tmp_path, None)


@pytest.fixture
def auth_proxy(tmp_path):
    """A forward proxy that demands Basic credentials: ``auth_proxy.credentials``."""
    yield from _proxy(tmp_path, (PROXY_USER, "pw-" + secrets.token_hex(8)))


def published(broker, monkeypatch, ca: Path | None = None) -> str:
    """One completed request tagged rki on ``broker`` (its CA trusted for these set-up calls only)."""
    with monkeypatch.context() as context:
        if ca is not None:
            context.setenv("REQUESTS_CA_BUNDLE", str(ca))
        return actors.publish_completed(broker.url)


def client(url: str, **options) -> BrokerClient:
    options = {"call_timeout": 10.0, "export_timeout": 10.0, "retries": 3, "concurrency": 4,
               "sleep": lambda seconds: None, **options}
    return BrokerClient(url, ADMIN_KEY, **options)


def lists_the_request(url: str, request_id: str, **options) -> None:
    """Every kind of call succeeds: status, listing, completion, export and download."""
    with client(url, **options) as api:
        api.check_status()
        assert api.list_tagged_request_ids("rki") == [request_id]
        assert api.get_completion(request_id) == "1.0"
        with api.open_result(request_id) as result:
            assert result.read()[:2] == b"PK"


# ---- HTTPS with a private CA ------------------------------------------------------------------------------

def test_https_broker_with_the_private_ca_from_the_config(tls_broker, pki, monkeypatch):
    request_id = published(tls_broker, monkeypatch, pki.ca)
    lists_the_request(tls_broker.url, request_id, ca_bundle=pki.ca)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_https_broker_with_the_private_ca_from_the_environment(tls_broker, pki, monkeypatch, variable):
    request_id = published(tls_broker, monkeypatch, pki.ca)
    monkeypatch.setenv(variable, str(pki.ca))
    lists_the_request(tls_broker.url, request_id)


def test_the_config_ca_bundle_comes_before_the_environment(tls_broker, pki, monkeypatch):
    request_id = published(tls_broker, monkeypatch, pki.ca)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.other_ca))
    lists_the_request(tls_broker.url, request_id, ca_bundle=pki.ca)


@pytest.mark.parametrize("bundle", ["default", "other"])
def test_an_untrusted_certificate_fails_naming_the_cause_without_retries(tls_broker, pki, bundle):
    waits = []
    with client(tls_broker.url, ca_bundle=pki.other_ca if bundle == "other" else None, sleep=waits.append) as api:
        with pytest.raises(BrokerError) as caught:
            api.check_status()
    assert str(caught.value) == (f"TLS error: certificate verify failed: unable to get local issuer certificate "
                                 f"talking to the broker at {tls_broker.url}; check BROKER.URL and REQUESTS_CA_BUNDLE")
    assert waits == [] and tls_broker.requests_log == []


# ---- a forward proxy ---------------------------------------------------------------------------------------

def test_http_broker_through_a_forward_proxy(broker, proxy, monkeypatch):
    request_id = published(broker, monkeypatch)
    broker.requests_log.clear()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    lists_the_request(broker.url, request_id)
    assert f"GET {broker.url}/broker/request/{request_id}/status" in proxy.requests()
    assert broker.requests_log and all("tinyproxy" in call.headers.get("Via", "") for call in broker.requests_log)


def test_https_broker_through_a_forward_proxy_tunnel(tls_broker, pki, proxy, monkeypatch):
    request_id = published(tls_broker, monkeypatch, pki.ca)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    lists_the_request(tls_broker.url, request_id, ca_bundle=pki.ca)
    tunnels = proxy.requests()
    assert tunnels and set(tunnels) == {f"CONNECT 127.0.0.1:{tls_broker.port}"}


def test_all_proxy_is_honoured(broker, proxy, monkeypatch):
    request_id = published(broker, monkeypatch)
    monkeypatch.setenv("ALL_PROXY", proxy.url)
    lists_the_request(broker.url, request_id)
    assert f"GET {broker.url}/broker/request/{request_id}/status" in proxy.requests()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_proxy_credentials_from_the_proxy_url_are_sent(broker, tls_broker, pki, auth_proxy, monkeypatch, tls):
    target = tls_broker if tls else broker
    request_id = published(target, monkeypatch, pki.ca if tls else None)
    monkeypatch.setenv("HTTPS_PROXY" if tls else "HTTP_PROXY", auth_proxy.url_with(*auth_proxy.credentials))
    lists_the_request(target.url, request_id, ca_bundle=pki.ca if tls else None)
    assert auth_proxy.requests()


@pytest.fixture
def tls_proxy(proxy, pki):
    """``proxy`` spoken to over TLS (``https://`` proxy URL): a relay that ends TLS in front of tinyproxy."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def relay() -> None:
        with contextlib.suppress(OSError):
            while True:
                client_side, _ = listener.accept()
                with contextlib.suppress(OSError):
                    client_side = context.wrap_socket(client_side, server_side=True)
                    proxy_side = socket.create_connection((proxy.host, proxy.port))
                    for ends in ((client_side, proxy_side), (proxy_side, client_side)):
                        threading.Thread(target=pump, args=ends, daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_broker_through_an_https_proxy(broker, tls_broker, pki, proxy, tls_proxy, monkeypatch, tls):
    """The proxy's own connection is TLS (verified with the same CA bundle), not plain HTTP."""
    target = tls_broker if tls else broker
    request_id = published(target, monkeypatch, pki.ca if tls else None)
    monkeypatch.setenv("HTTPS_PROXY" if tls else "HTTP_PROXY", tls_proxy)
    lists_the_request(target.url, request_id, ca_bundle=pki.ca)
    assert proxy.requests()


def test_an_https_proxy_with_an_untrusted_certificate_is_refused(broker, tls_proxy, pki, monkeypatch):
    """Also for an http:// broker, where requests itself would not check the proxy's certificate."""
    monkeypatch.setenv("HTTP_PROXY", tls_proxy)
    with client(broker.url, ca_bundle=pki.other_ca) as api, pytest.raises(BrokerError) as caught:
        api.check_status()
    assert str(caught.value) == (f"cannot reach the proxy {tls_proxy} "
                                 "(TLS error: certificate verify failed: unable to get local issuer certificate); "
                                 "check HTTP_PROXY and REQUESTS_CA_BUNDLE")
    assert broker.requests_log == []


@pytest.mark.parametrize("no_proxy", ["127.0.0.0/8", "127.0.0.1", "localhost,127.0.0.1:1,127.0.0.1"])
def test_no_proxy_bypasses_the_proxy(broker, proxy, monkeypatch, no_proxy):
    request_id = published(broker, monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    lists_the_request(broker.url, request_id)
    assert proxy.requests() == []


# ---- a proxy that refuses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("credentials,answer", [("none", "407 Proxy Authentication Required"),
                                                ("wrong", "401 Unauthorized")])  # tinyproxy's answers
def test_a_proxy_refusing_the_tunnel_fails_at_once_naming_the_proxy(tls_broker, pki, auth_proxy, monkeypatch,
                                                                    credentials, answer):
    password = "wrong-" + secrets.token_hex(4)
    monkeypatch.setenv("HTTPS_PROXY", auth_proxy.url if credentials == "none"
                       else auth_proxy.url_with(PROXY_USER, password))
    waits = []
    with client(tls_broker.url, ca_bundle=pki.ca, retries=5, sleep=waits.append) as api:
        with pytest.raises(BrokerError) as caught:
            api.list_tagged_request_ids("rki")
    assert str(caught.value) == (f"proxy {auth_proxy.url} refused the connection to the broker at {tls_broker.url} "
                                 f"({answer}); check the credentials in HTTPS_PROXY")
    assert password not in str(caught.value)
    assert auth_proxy.requests() == [f"CONNECT 127.0.0.1:{tls_broker.port}"]  # no retry storm
    assert waits == []


def test_a_proxy_refusing_a_plain_http_call_fails_at_once_naming_the_proxy(broker, auth_proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", auth_proxy.url)
    with client(broker.url, retries=5) as api, pytest.raises(BrokerError) as caught:
        api.check_status()
    assert str(caught.value) == (f"proxy {auth_proxy.url} answered 407 Proxy Authentication Required to HEAD "
                                 "/broker/status; check the credentials in HTTP_PROXY")
    assert auth_proxy.requests() == [f"HEAD {broker.url}/broker/status"]
    assert broker.requests_log == []


# ---- the whole CLI, as cron runs it -------------------------------------------------------------------------

def test_sync_through_a_refusing_proxy_exits_13_with_one_line_and_no_secret(workspace, broker, auth_proxy,
                                                                              monkeypatch):
    password = "wrong-" + secrets.token_hex(6)
    result = workspace.run("sync", "--config", str(workspace.config_path), "-vv",
                           env={"HTTP_PROXY": auth_proxy.url_with(PROXY_USER, password)})
    assert result.returncode == 13, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    # tinyproxy answers wrong credentials with a 401, as if it were the broker: the message names both
    assert error_lines == ["Error: broker rejected the API key (401) for HEAD /broker/status; check that "
                           "BROKER.API_KEY is an admin key, or the credentials in HTTP_PROXY for the proxy "
                           f"{auth_proxy.url}"]
    assert password not in result.stdout + result.stderr
    assert ADMIN_KEY not in result.stdout + result.stderr
    assert len(auth_proxy.requests()) == 1
    assert not workspace.ledger.exists()


@pytest.mark.parametrize("source", ["config", "environment"])
def test_sync_uploads_from_an_https_broker_with_a_private_ca(workspace, broker, tls_broker, pki, monkeypatch, source):
    request_id = published(tls_broker, monkeypatch, pki.ca)
    workspace.rewrite_config(f'URL = "{broker.url}"', f'URL = "{tls_broker.url}"')
    if source == "config":
        workspace.rewrite_config("[BROKER]\n", f'REQUESTS_CA_BUNDLE = "{pki.ca}"\n\n[BROKER]\n')
    result = workspace.run("sync", "--config", str(workspace.config_path),
                           env={"REQUESTS_CA_BUNDLE": str(pki.ca)} if source == "environment" else None)
    assert result.returncode == 0, result.stderr
    assert workspace.remote_names() == [f"export_{request_id}.zip", "status.xml"]
