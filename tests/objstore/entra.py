"""A managed-identity token endpoint on 127.0.0.1, as App Service and Azure Arc hosts run one.

azure-identity's ManagedIdentityCredential (inside DefaultAzureCredential) calls it when
IDENTITY_ENDPOINT and IDENTITY_HEADER are set: a real credential chain, a local token source. The
tokens are JWTs with the claims Azurite's OAuth mode checks (issuer, audience, lifetime); Azurite
does not check signatures, so they are unsigned.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from objstore.helpers import send_json

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def jwt(audience: str) -> str:
    now = int(time.time())
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{TENANT}/", "nbf": now - 60, "iat": now - 60,
              "exp": now + 3600, "oid": "00000000-0000-0000-0000-000000000001", "tid": TENANT}
    return f"{_b64({'typ': 'JWT', 'alg': 'RS256'})}.{_b64(claims)}.c2ln"


class TokenEndpoint:
    """Hands out tokens for `audience` to callers presenting `secret` in X-IDENTITY-HEADER."""

    def __init__(self, secret: str, audience: str = "https://storage.azure.com"):
        self.secret, self.audience, self.calls = secret, audience, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.calls.append(self.path)
                if self.headers.get("X-IDENTITY-HEADER") != outer.secret:
                    self.send_response(401)
                    self.end_headers()
                    return
                send_json(self, 200, {"access_token": jwt(outer.audience), "expires_on": str(int(time.time()) + 3600),
                                      "resource": "https://storage.azure.com", "token_type": "Bearer"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
