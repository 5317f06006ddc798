"""The EC2 instance metadata service, asked one question: is it absent, or only unwell?

botocore turns a metadata timeout or 5xx into "no credentials" and sends the request anonymous; the
refusal that follows looks like a real one (exit 3, the Job fails for good). agent/sources/s3.py asks
here, only after an anonymous request was refused, whether the service is there and names a role
(a blip: retry, the credential chain runs again) or is absent or has no role (the refusal is real).
"""

from __future__ import annotations

import http.client
import os
from urllib.parse import urlsplit


def imds_address(session) -> tuple[str, float] | None:
    """(base URL, timeout) of the instance metadata service botocore asks, or None if it is off."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true":
        return None
    ipv6 = (session.get_config_variable("ec2_metadata_service_endpoint_mode") or "").lower() == "ipv6"
    base = session.get_config_variable("ec2_metadata_service_endpoint") or \
        ("http://[fd00:ec2::254]" if ipv6 else "http://169.254.169.254")
    return base.rstrip("/"), float(session.get_config_variable("metadata_service_timeout") or 1)


def instance_role_unreachable(base: str, timeout: float) -> bool:
    """True when the metadata service names a role (its credentials failed to come), answers 5xx, or
    accepts the connection and then stays silent. False when nothing listens there (not on EC2) or
    it says no role is attached: then an anonymous request was meant to be anonymous."""
    url = urlsplit(base)
    conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection

    def ask(method: str, path: str, headers: dict) -> tuple[int, str]:
        conn = conn_class(url.hostname, url.port, timeout=timeout)
        try:
            try:
                conn.connect()
            except OSError:
                raise ConnectionRefusedError from None  # nothing there: not a blip
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    try:
        try:
            status, token = ask("PUT", "/latest/api/token", {"x-aws-ec2-metadata-token-ttl-seconds": "60"})
        except ConnectionRefusedError:
            raise
        except OSError:  # a PUT response can be dropped (hop limit) while IMDSv1 still answers
            status, token = 0, ""
        headers = {"x-aws-ec2-metadata-token": token} if status == 200 else {}
        status, _ = ask("GET", "/latest/meta-data/iam/security-credentials/", headers)
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # connected, then silent: the service is there but unwell
    return status == 200 or status >= 500
