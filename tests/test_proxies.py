"""Egress proxies and private CAs on the object stores' byte path, as the SDKs honour them.

The real CLI pulls from moto's S3 server through Debian's squid (tests/objstore/squid.py), run by
the suite with squid's default rules: CONNECT only to 443 (plus a TLS store's port where a test
opens it), Basic authentication required. The listing goes through botocore, the bytes through
agent/keepalive.py: both must take the same route, trust the same CA, and fail the same way.
"""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from agent.errors import CertificateError
from agent.keepalive import KeepAlivePool
from objstore.helpers import FAST, agent, env_for, events
from objstore.servers import MotoServer
from objstore.squid import Squid, squid_bin
from objstore.tls import self_signed, serve_self_signed, tls_moto

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(squid_bin() is None, reason="squid not installed")]
MiB = 2**20
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(20 * MiB), "sub/notes.txt": b"hi"}
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
              "all_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("test-ca"))


def _with_models(srv):
    """The store with bucket `models` holding FILES under m/."""
    srv.client().create_bucket(Bucket="models")
    for rel, data in FILES.items():
        srv.client().put_object(Bucket="models", Key="m/" + rel, Body=data)
    return srv


@pytest.fixture(scope="session")
def s3_http(tmp_path_factory):
    with MotoServer(tmp_path_factory.mktemp("moto-http")) as srv:
        yield _with_models(srv)


@pytest.fixture(scope="session")
def s3_tls(tmp_path_factory, test_ca):
    with tls_moto(tmp_path_factory.mktemp("moto-tls"), *test_ca) as srv:
        yield _with_models(srv)


@pytest.fixture(scope="session")
def squid(test_ca, s3_tls):
    """The TLS store's port is opened for CONNECT, as an admin opens a private endpoint's; the plain
    http store's port stays refused, as in squid's shipped configuration."""
    with Squid(tls=test_ca, ssl_ports=(s3_tls.port,)) as srv:
        yield srv


def pull_env(server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in env_for(server.env(), **FAST).items() if k not in PROXY_VARS}
    return {**env, **extra}


def pull(tmp_path, env) -> tuple[int, str]:
    dest = tmp_path / "out"
    r = agent("pull", "s3://models/m/", "--local-dir", str(dest), "--chunk-size", "8Mi", env=env)
    if r.returncode == 0:
        assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*")
                if p.is_file() and ".model-agent" not in p.parts} == FILES
    return r.returncode, r.stderr


def errors(stderr: str) -> list[dict]:
    return [e for e in events(stderr) if e.get("level") == "error"]


def test_an_http_endpoint_is_proxied_with_a_plain_get_not_a_tunnel(tmp_path, s3_http, squid):
    """MinIO / Ceph RGW on http://host:9000: botocore sends `GET http://…` to the proxy, so must the
    byte path. A CONNECT to port 9000 is refused by squid's default rules."""
    squid.forget()
    code, stderr = pull(tmp_path, pull_env(s3_http, HTTP_PROXY=squid.url(), HTTPS_PROXY=squid.url()))
    assert code == 0, stderr[-3000:]
    seen = squid.requests()
    store = f"127.0.0.1:{s3_http.port}"
    assert not [r for r in seen if r[1] == "CONNECT"], seen
    gets = [r for r in seen if r[1] == "GET" and r[2].startswith(f"http://{store}/models/m/model.safetensors")]
    assert len(gets) >= 3 and all(r[0].endswith("/206") and r[3] == "agent" for r in gets), seen  # 3 ranges of 8 MiB


def test_an_https_proxy_gets_tls_and_the_store_a_tunnel_inside_it(tmp_path, s3_tls, squid, test_ca):
    """HTTPS_PROXY=https://user:pw@proxy: TLS to the proxy (its certificate checked against the same
    CA as the store's, as botocore does), then CONNECT with the credentials inside that TLS, then TLS
    with the store. SSL_CERT_FILE is set too, so only the proxy's TLS is under test here."""
    squid.forget()
    cert = str(test_ca[0])
    env = pull_env(s3_tls, HTTPS_PROXY=squid.url(tls=True), AWS_CA_BUNDLE=cert, SSL_CERT_FILE=cert)
    code, stderr = pull(tmp_path, env)
    assert code == 0, stderr[-3000:]
    tunnels = [r for r in squid.requests() if r[1] == "CONNECT"]
    assert tunnels and all(r[2] == f"127.0.0.1:{s3_tls.port}" and r[3] == "agent" for r in tunnels), tunnels


def test_no_proxy_host_port_is_matched_as_botocore_matches_it(tmp_path, s3_http, squid):
    squid.forget()
    env = pull_env(s3_http, HTTP_PROXY=squid.url(), HTTPS_PROXY=squid.url(), NO_PROXY=f"127.0.0.1:{s3_http.port}")
    code, stderr = pull(tmp_path, env)
    assert code == 0, stderr[-3000:]
    assert squid.requests() == []  # neither the listing nor a single byte went through the proxy


@pytest.mark.parametrize("variable", ["AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"])
def test_the_sdks_private_ca_is_trusted_by_the_byte_path(tmp_path, s3_tls, test_ca, variable):
    """botocore trusts AWS_CA_BUNDLE (or `ca_bundle` in the AWS config), else REQUESTS_CA_BUNDLE."""
    code, stderr = pull(tmp_path, pull_env(s3_tls, **{variable: str(test_ca[0])}))
    assert code == 0, stderr[-3000:]


def test_an_untrusted_certificate_is_one_line_and_exit_3_without_retries(tmp_path, s3_tls):
    dest = tmp_path / "out"
    r = agent("pull", "s3://models/m/", "--local-dir", str(dest), env=pull_env(s3_tls))
    assert_untrusted_once(r, "AWS_CA_BUNDLE")


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("tls_to_proxy", [False, True])
def test_the_byte_path_through_squid_to_an_http_origin(monkeypatch, squid, test_ca, tls_to_proxy):
    """Below the CLI: an http:// origin through an http:// or https:// proxy is one absolute-URI GET
    (TLS to the proxy in the second case), with the proxy credentials on it."""
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", squid.url(tls=tls_to_proxy))
    squid.forget()
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca[0]))  # trusts the proxy's certificate
    pool = KeepAlivePool(5, 5)
    try:
        for _ in range(2):
            resp = pool.get(f"http://127.0.0.1:{origin.server_address[1]}/obj", {}, "obj")
            assert resp.status == 200 and b"".join(bytes(p) for p in resp.pieces("obj")) == b"hello"
    finally:
        pool.close()
        origin.shutdown()
    assert [(r[1], r[3]) for r in squid.requests()] == [("GET", "agent")] * 2


def test_a_certificate_failure_on_the_byte_path_is_not_retried(tmp_path, monkeypatch):
    """An untrusted store certificate raises CertificateError (exit 3), not a Retryable "connection"."""
    origin = serve_self_signed(tmp_path, _Ok)
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    pool = KeepAlivePool(5, 5)
    try:
        with pytest.raises(CertificateError) as err:
            pool.get(f"https://127.0.0.1:{origin.server_address[1]}/obj", {}, "s3://models/m/x")
        assert err.value.exit_code == 3 and "s3://models/m/x" in str(err.value)
    finally:
        pool.close()
        origin.shutdown()


def test_azure_byte_path_trusts_requests_ca_bundle(tmp_path, test_ca):
    """azure-core (through requests) trusts REQUESTS_CA_BUNDLE: so must the Azure byte path, with no
    SSL_CERT_FILE to lean on. Without it, the listing's certificate failure is one line, exit 3."""
    from objstore.servers import Azurite

    data = os.urandom(9 * MiB)
    with Azurite(tmp_path / "azurite-tls", tls=test_ca) as az:
        az.service().create_container("models").upload_blob("m/model.safetensors", data)
        env = {k: v for k, v in env_for(az.env(), **FAST).items() if k not in PROXY_VARS}
        env["MODEL_AGENT_ENDPOINT_URL"] = az.url
        r = agent("pull", "az://models/m/", "--local-dir", str(tmp_path / "d"), "--chunk-size", "8Mi",
                  env={**env, "REQUESTS_CA_BUNDLE": str(test_ca[0])})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "d" / "model.safetensors").read_bytes() == data
        r = agent("pull", "az://models/m/", "--local-dir", str(tmp_path / "e"), env=env)
        assert_untrusted_once(r, "REQUESTS_CA_BUNDLE")


def test_gcs_byte_path_trusts_requests_ca_bundle(tmp_path, test_ca):
    """google-cloud-storage (through requests) trusts REQUESTS_CA_BUNDLE: so must the GCS byte path."""
    from objstore.tls import tls_fake_gcs

    data = os.urandom(9 * MiB)
    (tmp_path / "gcs-tls" / "data" / "models" / "m").mkdir(parents=True)
    (tmp_path / "gcs-tls" / "data" / "models" / "m" / "model.safetensors").write_bytes(data)
    with tls_fake_gcs(tmp_path / "gcs-tls", *test_ca) as gcs:
        env = {k: v for k, v in env_for(gcs.env(), **FAST).items() if k not in PROXY_VARS}
        r = agent("pull", "gs://models/m/", "--local-dir", str(tmp_path / "d"), "--chunk-size", "8Mi",
                  env={**env, "REQUESTS_CA_BUNDLE": str(test_ca[0])})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "d" / "model.safetensors").read_bytes() == data
        r = agent("pull", "gs://models/m/", "--local-dir", str(tmp_path / "e"), env=env)
        assert_untrusted_once(r, "REQUESTS_CA_BUNDLE")


def assert_untrusted_once(r, hint: str) -> None:
    """Exit 3 with one error line naming the certificate and the variable to set, and no retry."""
    assert r.returncode == 3, r.stderr[-3000:]
    assert not [e for e in events(r.stderr) if e.get("event") == "retry"], r.stderr[-3000:]
    [err] = errors(r.stderr)
    assert "certificate" in err["msg"] and hint in err["msg"] and "\n" not in err["msg"], err


def test_wrong_proxy_credentials_are_exit_3_not_retries(monkeypatch, squid, s3_tls, test_ca):
    """A 407 to CONNECT is a refusal (exit 3), said once with the proxy's address, never its password."""
    from agent.errors import AuthError

    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", squid.url().replace("s%40cret", "wrong"))
    pool = KeepAlivePool(5, 5)
    pool.trust(str(test_ca[0]), "AWS_CA_BUNDLE")
    try:
        with pytest.raises(AuthError) as err:
            pool.get(f"{s3_tls.url}/models/m/config.json", {}, "s3://models/m/ config.json")
        assert "407" in str(err.value) and f"127.0.0.1:{squid.port}" in str(err.value)
        assert "wrong" not in str(err.value)
    finally:
        pool.close()
