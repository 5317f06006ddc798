"""Which egress proxy a URL goes through: HTTPS_PROXY / HTTP_PROXY minus NO_PROXY, read the way the
SDKs (botocore, httpx, azure-core) and curl read them, so every byte path agrees with the listing."""

from __future__ import annotations

import base64
import urllib.request
from urllib.parse import SplitResult, unquote, urlsplit


def proxy_for(scheme: str, host: str) -> SplitResult | None:
    """The proxy for a `scheme://host` URL, or None (no proxy set, or NO_PROXY covers the host)."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return urlsplit(url if "://" in url else f"http://{url}")


def proxy_auth(proxy: SplitResult) -> dict[str, str]:
    """The Proxy-Authorization header for `http://user:password@proxy:port`, or nothing."""
    if not proxy.username:
        return {}
    pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode()}


def proxy_address(proxy: SplitResult) -> tuple[str, int]:
    """(host, port) of the proxy; without a port, the scheme's own, as Python's HTTP clients assume."""
    return proxy.hostname or "", proxy.port or (443 if proxy.scheme == "https" else 80)


def proxy_origin(proxy: SplitResult) -> str:
    """`scheme://host:port` of the proxy itself, without its credentials."""
    host, port = proxy_address(proxy)
    return f"{proxy.scheme}://{host}:{port}"
