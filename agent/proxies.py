"""The egress settings the SDKs read from the environment, read the same way here so every byte path
agrees with its listing: which proxy a URL goes through (HTTPS_PROXY / HTTP_PROXY minus NO_PROXY, as
botocore, requests, azure-core and curl read them), and which CA bundle an SDK trusts."""

from __future__ import annotations

import base64
import os
import urllib.request
from urllib.parse import SplitResult, unquote, urlsplit

# What requests (so google-cloud-storage and azure-core) trusts instead of its default CAs, in its order.
REQUESTS_CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def proxy_for(scheme: str, host: str, port: int | None = None) -> SplitResult | None:
    """The proxy for a `scheme://host[:port]` URL, or None (no proxy set, or NO_PROXY covers it).

    NO_PROXY is matched against the URL's `host:port` as well as its host, as botocore (which hands
    urllib the URL's netloc) and requests do: `NO_PROXY=minio:9000` bypasses the proxy for that port."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    bracketed = f"[{host}]" if ":" in host else host
    netloc = f"{bracketed}:{port}" if port else host
    if not url or urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    return urlsplit(url if "://" in url else f"http://{url}")


def ca_bundle_from(variables: tuple[str, ...]) -> str | None:
    """The first of `variables` set to a non-empty value, as requests reads REQUESTS_CA_BUNDLE."""
    return next((os.environ[name] for name in variables if os.environ.get(name)), None)


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
