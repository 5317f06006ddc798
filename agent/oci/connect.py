"""One registry client from the settings: shared by the oci:// source and destination."""

from __future__ import annotations

from ..config import Settings
from ..retry import RetryPolicy
from .auth import find_credential
from .client import RegistryClient
from .reference import Reference


def client_for(ref: Reference, settings: Settings) -> RegistryClient:
    """The registry's client with the credential the docker config search finds (anonymous otherwise),
    SSL_CERT_FILE's CA, plain HTTP only on --plain-http, and the agent's one retry policy."""
    env = dict(settings.registry_env)
    credential = find_credential(ref.registry, env, settings.registry_auth_file)
    return RegistryClient(ref.registry, credential=credential, plain_http=settings.plain_http,
                          ca_bundle=settings.registry_ca_bundle, stall_timeout=settings.stall_timeout,
                          policy=RetryPolicy(settings.retry_max_failures, settings.retry_base_delay))
