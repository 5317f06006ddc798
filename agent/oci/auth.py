"""Registry credentials, found where docker, podman, skopeo and Kubernetes put them.

Files, first one with an entry for the registry wins:
  1. `--registry-auth-file PATH` (alone when given: a mounted `kubernetes.io/dockerconfigjson` Secret
     is the whole truth; a missing file is exit 2);
  2. `REGISTRY_AUTH_FILE` (podman, skopeo, buildah);
  3. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` (docker).
In a file: `credHelpers[registry]`, then `credsStore`, each only when its `docker-credential-<name>`
binary is on PATH (docker errors instead; a node image rarely carries every helper a laptop's config
names), then `auths[registry]` (`auth` = base64 user:password, or `username`/`password`, or
`identitytoken`, docker's OAuth2 refresh token, or `registrytoken`, a bearer token used as is). An
`auths` key may be written `host`, `https://host` or `https://host/v1/`, as docker accepts it.
Nothing found is anonymous. The environment comes in as a mapping (settings are read once).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import AuthError, InvalidInput

HELPER_TIMEOUT = 60.0  # a cloud helper (ecr-login, gcloud) may fetch a token over the network
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_DOCKER_HUB_KEY = "https://index.docker.io/v1/"  # how docker names the Hub in config files and to helpers


@dataclass(frozen=True)
class Credential:
    """What a registry may be given. The secrets never show in repr or str."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token (`docker login` to some registries)
    registry_token: str = field(default="", repr=False)  # a bearer token to send as is
    origin: str = ""  # where it came from, for messages: a file path or a helper's name

    def __str__(self) -> str:
        kind = "identity token" if self.identity_token else "registry token" if self.registry_token else "password"
        return f"credential ({kind}) from {self.origin or 'the caller'}"


def find_credential(registry: str, env: Mapping[str, str], auth_file: str | None = None) -> Credential | None:
    """The credential for `registry` (host[:port]), or None: anonymous."""
    for path in _config_files(env, auth_file):
        config = _load(path, explicit=auth_file is not None)
        if config is None:
            continue
        found = _from_config(config, registry, str(path), env)
        if found is not None:
            return found
    return None


def _config_files(env: Mapping[str, str], auth_file: str | None) -> list[Path]:
    if auth_file:
        return [Path(auth_file)]
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    elif env.get("HOME"):
        files.append(Path(env["HOME"]) / ".docker" / "config.json")
    return files


def _load(path: Path, explicit: bool) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if explicit:
            raise InvalidInput(f"registry auth file {path}: no such file") from None
        return None
    except OSError as exc:
        raise InvalidInput(f"registry auth file {path}: cannot read it ({exc.strerror})") from None
    try:
        config = json.loads(text) if text.strip() else {}
    except ValueError as exc:  # the message names the position, never the content
        raise InvalidInput(f"registry auth file {path}: not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"registry auth file {path}: expected a JSON object with `auths`")
    return config


def _from_config(config: dict, registry: str, origin: str, env: Mapping[str, str]) -> Credential | None:
    key = "index.docker.io" if registry in _DOCKER_HUB else registry
    helpers = config.get("credHelpers") or {}
    for name in (helpers.get(key) if isinstance(helpers, dict) else None, config.get("credsStore")):
        if isinstance(name, str) and name:
            binary = shutil.which(f"docker-credential-{name}", path=env.get("PATH", os.defpath))
            if binary is not None:
                return _from_helper(binary, name, key, env)
    auths = config.get("auths")
    if auths is None and not {"credHelpers", "credsStore"} & set(config):
        auths = config  # the legacy ~/.dockercfg form: hosts at the top level
    if not isinstance(auths, dict):
        return None
    for entry_key, entry in auths.items():
        if _hostname(entry_key) == key and isinstance(entry, dict):
            return _from_entry(entry, origin)
    return None


def _hostname(key: str) -> str:
    """docker's ConvertToHostname: `https://host/v1/` -> `host`."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0]


def _from_entry(entry: dict, origin: str) -> Credential | None:
    username, password = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidInput(f"registry auth file {origin}: an `auth` value is not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidInput(f"registry auth file {origin}: an `auth` value is not base64 of user:password")
    credential = Credential(username=username, password=password, origin=origin,
                            identity_token=str(entry.get("identitytoken") or ""),
                            registry_token=str(entry.get("registrytoken") or ""))
    if not (credential.password or credential.identity_token or credential.registry_token):
        return None  # an empty placeholder (docker writes `{}` entries next to a credsStore)
    return credential


def _from_helper(binary: str, name: str, server: str, env: Mapping[str, str]) -> Credential | None:
    """docker-credential-helpers' `get`: the server on stdin, `{"Username", "Secret"}` on stdout."""
    what = f"credential helper docker-credential-{name}"
    server_url = _DOCKER_HUB_KEY if server == "index.docker.io" else server
    try:
        done = subprocess.run([binary, "get"], input=server_url, capture_output=True, text=True,
                              env=dict(env), timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AuthError(f"{what}: no answer within {HELPER_TIMEOUT:.0f}s for {server}") from None
    except OSError as exc:
        raise AuthError(f"{what}: cannot run it ({exc.strerror})") from None
    if done.returncode != 0:
        if "credentials not found" in (done.stdout + done.stderr).lower():
            return None
        first = (done.stderr or done.stdout).strip().splitlines()[:1]
        raise AuthError(f"{what} failed for {server} (exit {done.returncode}): {first[0][:200] if first else ''}")
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer.get("Username") or ""), str(answer["Secret"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AuthError(f"{what}: its answer for {server} is not the helper protocol's JSON") from None
    if username == "<token>":  # docker's convention: the secret is an identity (refresh) token
        return Credential(identity_token=secret, origin=what)
    return Credential(username=username, password=secret, origin=what)
