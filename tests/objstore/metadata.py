"""A cloud instance-metadata server on 127.0.0.1 that blips: GCE's (google-auth follows
GCE_METADATA_HOST / GCE_METADATA_IP) and EC2's IMDS (botocore follows AWS_EC2_METADATA_SERVICE_ENDPOINT).

`blips` requests for credentials are answered 503 (or, `hang=True`, not answered before the
client's timeout); after that it hands out credentials like the real thing. `no_role=True`: an
instance with no service account or role attached, which is a real "no".
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from objstore.helpers import send_json


class MetadataServer:
    def __init__(self, *, blips: int, hang: bool = False, no_role: bool = False, aws_key: str = "", aws_secret: str = ""):
        self.blips, self.hang, self.no_role, self.calls = blips, hang, no_role, []
        # Token "": botocore then signs without X-Amz-Security-Token, which SeaweedFS would read as its
        # own STS's JWT; a real IMDS hands out a session token with the keys.
        self.aws = {"AccessKeyId": aws_key, "SecretAccessKey": aws_secret, "Token": "",
                    "Expiration": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "Code": "Success"}
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):
                outer.calls.append(("PUT", self.path))
                if self.path == "/latest/api/token":
                    return self._text(200, "imds-token")
                self._text(404, "")

            def do_GET(self):
                outer.calls.append(("GET", self.path))
                path = self.path.split("?", 1)[0]
                if path in ("/", ""):  # google-auth's "am I on GCE?" ping
                    return self._text(200, "", {"Metadata-Flavor": "Google"})
                if outer.no_role and path.startswith(("/computeMetadata/v1/instance/service-accounts/",
                                                       "/latest/meta-data/iam/")):
                    return self._text(404, "no service account or role attached to this instance")
                if (path.startswith(("/computeMetadata/v1/instance/service-accounts/",
                                     "/latest/meta-data/iam/security-credentials/")) and outer.take_blip()):
                    if outer.hang:
                        time.sleep(5)
                        return
                    return self._text(503, "unavailable")
                if path == "/computeMetadata/v1/instance/service-accounts/default/":
                    return send_json(self, 200, {"email": "agent@test.iam.gserviceaccount.com", "aliases": ["default"],
                                                 "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]})
                if path == "/computeMetadata/v1/instance/service-accounts/default/token":
                    return send_json(self, 200, {"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"})
                if path == "/latest/meta-data/iam/security-credentials/":
                    return self._text(200, "agent-role")
                if path == "/latest/meta-data/iam/security-credentials/agent-role":
                    return send_json(self, 200, outer.aws)
                self._text(404, "not found")

            def _text(self, status: int, text: str, headers: dict | None = None) -> None:
                body = text.encode()
                self.send_response(status)
                for k, v in {"Content-Type": "text/plain", "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def take_blip(self) -> bool:
        with self._lock:
            if self.blips > 0:
                self.blips -= 1
                return True
            return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
