"""A private CA for the test registries, the certificates it signs, htpasswd files and signed JWTs.

The registries present a certificate signed by a CA of their own (never a system-trusted one), so
a client that trusts only the system's CAs fails and one given the CA's bundle succeeds: the case
of an in-cluster registry behind a private CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=4)))


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class PrivateCA:
    """`ca.pem` (the bundle a client must be given), and `server.pem`/`server-key.pem` for 127.0.0.1 and
    localhost (two host names for one machine: a redirect from one to the other changes host)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (_builder("model-agent test CA", "model-agent test CA", ca_key.public_key())
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca = _write_cert(ca, folder / "ca.pem")
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        server = (_builder("127.0.0.1", "model-agent test CA", key.public_key())
                  .add_extension(x509.SubjectAlternativeName(names), critical=False)
                  .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                  .sign(ca_key, hashes.SHA256()))
        self.cert = _write_cert(server, folder / "server.pem")
        self.key = _write_key(key, folder / "server-key.pem")
        # skopeo (containers/image) reads a folder of *.crt files as its CAs
        self.cert_dir = folder / "certs.d"
        self.cert_dir.mkdir(exist_ok=True)
        (self.cert_dir / "ca.crt").write_bytes(self.ca.read_bytes())


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    """A bcrypt htpasswd file (the only hash distribution's htpasswd auth accepts), by apache2-utils."""
    lines = [subprocess.run(["htpasswd", "-nbB", "-C", "4", user, password], check=True, capture_output=True,
                            text=True).stdout.strip() for user, password in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenSigner:
    """Signs registry bearer tokens (ES256, the signing certificate in `x5c`), as docker/distribution's
    token auth expects them; `bundle` is the root-certificate bundle the registry is configured with."""

    def __init__(self, folder: Path, issuer: str):
        self.issuer = issuer
        self._key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder("model-agent token signer", "model-agent token signer", self._key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        self._der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = _write_cert(cert, folder / "token-signer.pem")

    def token(self, subject: str, audience: str, access: list[dict], ttl: float) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": self.issuer, "sub": subject, "aud": audience, "exp": int(now + ttl), "nbf": now - 60,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
