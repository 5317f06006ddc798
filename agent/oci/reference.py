"""`oci://REGISTRY/REPOSITORY[:TAG][@DIGEST]` parsed once into a typed value.

The grammar is docker's, from distribution/reference's regexp.go (v0.6): a repository is
path components of lower-case alphanumerics joined by one `.`, one or two `_`, or any number of `-`;
a tag is `[\\w][\\w.-]{0,127}`; the repository's name is at most 255 characters. Unlike a docker
image name, the registry is never implied (no `docker.io`, no `library/`): `oci://` always names the
registry first, so `localhost:5000` and `ghcr.io` need no heuristic. With neither tag nor digest the
tag is `latest`, as docker does. A digest must be `sha256:` and 64 lower-case hex digits: the only
algorithm registries and ModelPack use, and the file's sha256 a raw layer's digest equals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidInput

SCHEME = "oci://"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255  # distribution/reference's NameTotalLengthMax

_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN_AND_PORT = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(rf"^(?P<registry>{_DOMAIN_AND_PORT})/(?P<repository>{_REMOTE_NAME})"
                        rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$", re.ASCII)
SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], as written
    repository: str
    tag: str | None  # None when only a digest was given
    digest: str | None  # sha256:<hex>, when given: then it, not the tag, names the manifest

    @property
    def identifier(self) -> str:
        """What names the manifest in `/v2/<repository>/manifests/<identifier>`: the digest if given."""
        return self.digest or self.tag or DEFAULT_TAG

    def display(self) -> str:
        """The reference as a user writes it (it never holds a credential)."""
        text = f"{SCHEME}{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_digest(identifier: str) -> bool:
    return SHA256_DIGEST.match(identifier) is not None


def parse_reference(text: str) -> Reference:
    """Parse `oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`; anything else is InvalidInput (exit 2)."""
    usage = f"expected {SCHEME}REGISTRY/REPOSITORY:TAG or {SCHEME}REGISTRY/REPOSITORY@sha256:DIGEST"
    if not text.startswith(SCHEME):
        raise InvalidInput(f"invalid registry reference {_shown(text)}: {usage}")
    body = text[len(SCHEME):]
    if "@" in body.split("/", 1)[0]:  # user info: `oci://user:password@host/...` must never be echoed
        raise InvalidInput(f"invalid registry reference: credentials in the reference; {usage} and put "
                           "credentials in a docker config file (--registry-auth-file)")
    m = _REFERENCE.match(body)
    if m is None:
        raise InvalidInput(f"invalid registry reference {_shown(text)}: {usage} (repository: lower-case "
                           "letters, digits and . _ - separators; tag: up to 128 of [A-Za-z0-9_.-])")
    repository, digest = m.group("repository"), m.group("digest")
    if len(repository) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidInput(f"invalid registry reference {_shown(text)}: the repository name is "
                           f"{len(repository)} characters, more than {NAME_TOTAL_LENGTH_MAX}")
    if digest is not None and not is_digest(digest):
        raise InvalidInput(f"invalid registry reference {_shown(text)}: the digest must be sha256: and 64 "
                           "lower-case hex digits")
    tag = m.group("tag") or (None if digest else DEFAULT_TAG)
    return Reference(registry=m.group("registry"), repository=repository, tag=tag, digest=digest)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 300 else text[:300] + "...")
