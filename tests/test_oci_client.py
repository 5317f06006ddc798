"""The registry client (agent/oci/) against real registries: Debian's docker-registry (distribution
2.8) behind a private CA in three auth modes, our token server, a redirect to a second host, and
skopeo as the independent client that writes what we read and reads what we write."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import time

import pytest

from agent.errors import (
    AuthError,
    CertificateError,
    IntegrityError,
    InvalidInput,
    NotFound,
)
from tests.oci.artifacts import MANIFEST, model_layout, skopeo_push, skopeo_raw
from tests.oci.servers import PASSWORD, REFRESH_TOKEN, USER, sha256_digest

pytestmark = pytest.mark.skipif(not (shutil.which("docker-registry") and shutil.which("skopeo")),
                                reason="docker-registry and skopeo: scripts/install-test-tools.sh")

FILES = {"model.safetensors": os.urandom(300_000), "nested/dir/tokenizer.json": b'{"vocab": {}}',
         "config.json": b'{"model_type": "test"}'}


@pytest.fixture(scope="session")
def layout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oci-layout")
    return folder, model_layout(folder, FILES)


def client_for(registry, credential=None, **options):
    from agent.oci.client import RegistryClient

    return RegistryClient(registry.host, credential=credential, ca_bundle=str(registry.pki.ca), **options)


def login():
    from agent.oci.auth import Credential

    return Credential(username=USER, password=PASSWORD)


def read_all(client, repository, digest, start=0, end=None) -> bytes:
    return b"".join(bytes(piece) for piece in client.read_blob(repository, digest, start, end))


# -- references --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("oci://registry.example.com/org/model:v1", "registry.example.com", "org/model", "v1", None),
    ("oci://127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", "latest", None),
    ("oci://localhost/m@sha256:" + "a" * 64, "localhost", "m", None, "sha256:" + "a" * 64),
    ("oci://r.io/m__x.y-z--w:Tag_1.0@sha256:" + "b" * 64, "r.io", "m__x.y-z--w", "Tag_1.0", "sha256:" + "b" * 64),
    ("oci://[::1]:5000/m:t", "[::1]:5000", "m", "t", None),
])
def test_reference_parses_the_docker_grammar(text, registry, repository, tag, digest):
    from agent.oci.reference import parse_reference

    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert ref.display().startswith(f"oci://{registry}/{repository}")


@pytest.mark.parametrize("text", [
    "oci://", "oci://registry.example.com", "oci://registry.example.com/", "oci://r.io/Upper/case:v1",
    "oci://r.io/m:", "oci://r.io/m:-bad", "oci://r.io/m@sha256:abc", "oci://r.io/m@md5:" + "a" * 64,
    "oci://r.io/m:" + "t" * 129, "oci://r.io/a//b:v1", "oci://r.io/m_:v1", "oci://-r.io/m:v1",
    "oci://r.io/" + "a" * 256, "oci://user:pw@r.io/m:v1", "s3://r.io/m:v1", "oci://r.io/m:v1?x=1",
])
def test_malformed_reference_is_invalid_input(text):
    from agent.oci.reference import parse_reference

    with pytest.raises(InvalidInput) as info:
        parse_reference(text)
    assert info.value.exit_code == 2
    assert "pw" not in str(info.value) or "pw" not in text


# -- credentials -------------------------------------------------------------------------------------------

def test_credentials_from_docker_config_files_and_helpers(tmp_path):
    from agent.oci.auth import find_credential

    host = "registry.example.com:5000"
    docker = tmp_path / "docker"
    docker.mkdir()
    encoded = base64.b64encode(b"alice:from-docker-config").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {f"https://{host}/v1/": {"auth": encoded}}}))
    env = {"DOCKER_CONFIG": str(docker), "HOME": str(tmp_path / "home"), "PATH": os.environ["PATH"]}
    found = find_credential(host, env)
    assert (found.username, found.password) == ("alice", "from-docker-config")
    assert "from-docker-config" not in repr(found) and "from-docker-config" not in str(found)

    podman = tmp_path / "auth.json"  # REGISTRY_AUTH_FILE (podman, skopeo) comes before the docker config
    podman.write_text(json.dumps({"auths": {host: {"username": "bob", "password": "pw-podman"}}}))
    assert find_credential(host, {**env, "REGISTRY_AUTH_FILE": str(podman)}).username == "bob"

    explicit = tmp_path / "explicit.json"  # --registry-auth-file comes first of all
    explicit.write_text(json.dumps({"auths": {host: {"identitytoken": "refresh-me"}}}))
    assert find_credential(host, env, auth_file=str(explicit)).identity_token == "refresh-me"
    with pytest.raises(InvalidInput):
        find_credential(host, env, auth_file=str(tmp_path / "missing.json"))
    assert find_credential("other.example.com", env) is None  # anonymous
    home = tmp_path / "home"  # no DOCKER_CONFIG: ~/.docker/config.json
    (home / ".docker").mkdir(parents=True)
    shutil.copy(docker / "config.json", home / ".docker" / "config.json")
    assert find_credential(host, {"HOME": str(home)}).username == "alice"

    bin_dir = tmp_path / "bin"  # a credential helper on PATH speaks the docker-credential-* protocol
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread server\n[ "$1" = get ] && [ "$server" = "%s" ] && '
                      'echo \'{"ServerURL": "x", "Username": "carol", "Secret": "pw-helper"}\' && exit 0\n'
                      'echo "credentials not found in native keychain"; exit 1\n' % host)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": encoded}},
                                                    "credHelpers": {host: "fake"}}))
    with_helper = {**env, "PATH": f"{bin_dir}:{env['PATH']}"}
    assert find_credential(host, with_helper).password == "pw-helper"
    assert find_credential(host, env).username == "alice"  # helper not on PATH: the auths entry
    (docker / "config.json").write_text(json.dumps({"credsStore": "fake"}))
    assert find_credential(host, with_helper).username == "carol"
    assert find_credential("elsewhere.example.com", with_helper) is None  # the store has none for it


# -- reads -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["anonymous", "basic", "token"])
def test_reads_what_skopeo_pushed(registries, layout, mode):
    folder, manifest_bytes = layout
    registry = getattr(registries, mode)
    skopeo_push(folder, registry, f"read-{mode}/model")
    client = client_for(registry, None if mode == "anonymous" else login())

    manifest = client.get_manifest(f"read-{mode}/model", "v1")
    raw = skopeo_raw(registry, f"read-{mode}/model:v1")
    assert manifest.data == raw == manifest_bytes
    assert manifest.digest == sha256_digest(raw) and manifest.media_type == MANIFEST
    assert client.get_manifest(f"read-{mode}/model", manifest.digest).data == raw  # by digest
    assert client.head_manifest(f"read-{mode}/model", "v1") == manifest.digest
    assert client.head_manifest(f"read-{mode}/model", "no-such-tag") is None
    for layer in json.loads(manifest.data)["layers"]:
        path = layer["annotations"]["org.opencontainers.image.title"]
        assert client.stat_blob(f"read-{mode}/model", layer["digest"]) == len(FILES[path])
        assert read_all(client, f"read-{mode}/model", layer["digest"]) == FILES[path]
    weights = json.loads(manifest.data)["layers"][0]["digest"]
    assert read_all(client, f"read-{mode}/model", weights, 1000, 201_000) == FILES["model.safetensors"][1000:201_000]


def test_wrong_credentials_are_auth_errors_without_the_secret(registries, layout):
    from agent.oci.auth import Credential

    skopeo_push(layout[0], registries.basic, "denied/model")
    for registry in (registries.basic, registries.token):
        wrong = Credential(username=USER, password="not-the-password-123")
        with pytest.raises(AuthError) as info:
            client_for(registry, wrong).get_manifest("denied/model", "v1")
        assert info.value.exit_code == 3 and "not-the-password-123" not in str(info.value)
    with pytest.raises(AuthError):  # no credential where the registry demands one
        client_for(registries.basic).get_manifest("denied/model", "v1")


def test_missing_tag_and_repository_are_not_found(registries, layout):
    skopeo_push(layout[0], registries.anonymous, "present/model")
    client = client_for(registries.anonymous)
    for repository, reference in [("present/model", "no-such-tag"), ("absent/model", "v1"),
                                  ("present/model", "sha256:" + "0" * 64)]:
        with pytest.raises(NotFound) as info:
            client.get_manifest(repository, reference)
        assert info.value.exit_code == 4 and repository in str(info.value)
    assert client.stat_blob("present/model", "sha256:" + "0" * 64) is None
    with pytest.raises(NotFound):
        read_all(client, "present/model", "sha256:" + "0" * 64)


def test_bearer_tokens_are_cached_per_scope_and_refreshed_once_on_401(registries, layout):
    server = registries.token_server
    skopeo_push(layout[0], registries.token, "public/bearer")
    client = client_for(registries.token, login())
    before = len(server.requests)
    manifest = client.get_manifest("public/bearer", "v1")
    client.get_manifest("public/bearer", manifest.digest)
    assert len(server.requests) - before == 1  # one token for the scope, reused
    assert server.requests[-1]["scope"] == "repository:public/bearer:pull"

    server.expires_in = 2  # a token is fetched again when its expires_in has (nearly) run out
    short = client_for(registries.token, login())
    before = len(server.requests)
    short.get_manifest("public/bearer", "v1")
    short.get_manifest("public/bearer", "v1")
    assert len(server.requests) - before == 1
    time.sleep(1.6)
    short.get_manifest("public/bearer", "v1")
    assert len(server.requests) - before == 2
    server.expires_in = 300

    server.expired_next = 1  # the registry refuses the next token: one refresh, then it works
    other = client_for(registries.token, login())
    before = len(server.requests)
    assert other.get_manifest("public/bearer", "v1").digest == manifest.digest
    assert len(server.requests) - before == 2

    server.expired_next = 10  # every token refused: a second 401 is an AuthError, not a loop
    with pytest.raises(AuthError):
        client_for(registries.token, login()).get_manifest("public/bearer", "v1")
    server.expired_next = 0

    anonymous = client_for(registries.token)  # the bearer flow with no credential at all
    assert anonymous.get_manifest("public/bearer", "v1").digest == manifest.digest
    assert server.requests[-1]["user"] is None
    skopeo_push(layout[0], registries.token, "private/bearer")
    with pytest.raises(AuthError):  # a token without the access asked for
        anonymous.get_manifest("private/bearer", "v1")

    from agent.oci.auth import (
        Credential,  # an identity token: docker's OAuth2 refresh-token POST
    )
    refresh = client_for(registries.token, Credential(identity_token=REFRESH_TOKEN))
    assert refresh.get_manifest("public/bearer", "v1").digest == manifest.digest
    assert server.requests[-1]["method"] == "POST"


def test_blob_redirect_to_another_host_drops_authorization(registries, layout):
    skopeo_push(layout[0], registries.token, "redirected/model")
    client = client_for(registries.token, login())
    manifest = json.loads(client.get_manifest("redirected/model", "v1").data)
    weights = manifest["layers"][0]["digest"]
    before = len(registries.blob_store.requests)
    assert read_all(client, "redirected/model", weights) == FILES["model.safetensors"]
    assert read_all(client, "redirected/model", weights, 5, 105) == FILES["model.safetensors"][5:105]
    seen = registries.blob_store.requests[before:]
    assert len(seen) == 2 and not any(r["authorization"] for r in seen)


def test_untrusted_registry_certificate_is_refused_then_trusted_by_ssl_cert_file(registries, monkeypatch):
    from agent.oci.client import RegistryClient

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(CertificateError):
        RegistryClient(registries.anonymous.host).get_manifest("any/thing", "v1")
    monkeypatch.setenv("SSL_CERT_FILE", str(registries.pki.ca))
    with pytest.raises(NotFound):  # trusted now: the registry answers
        RegistryClient(registries.anonymous.host).get_manifest("any/thing", "v1")


def test_corrupted_manifest_is_an_integrity_error(registries, layout):
    skopeo_push(layout[0], registries.anonymous, "corrupt/model")
    client = client_for(registries.anonymous)
    digest = client.get_manifest("corrupt/model", "v1").digest
    stored = registries.anonymous.blob_file(digest)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
        for reference in ("v1", digest):
            with pytest.raises(IntegrityError) as info:
                client.get_manifest("corrupt/model", reference)
            assert info.value.exit_code == 5 and digest in str(info.value)
    finally:
        stored.write_bytes(original)


# -- uploads -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["basic", "token"])
def test_chunked_upload_resumes_from_the_registrys_offset_then_manifest_last(registries, tmp_path, mode):
    registry = getattr(registries, mode)
    repository = f"upload-{mode}/model"
    data = os.urandom(700_000)
    digest = sha256_digest(data)
    blob = tmp_path / "weights.bin"
    blob.write_bytes(data)

    first = client_for(registry, login())
    upload = first.start_upload(repository)
    upload = first.upload_chunk(upload, data[:250_000])  # then the pusher is killed
    assert upload.offset == 250_000

    second = client_for(registry, login())  # a new process knows only the upload's location
    resumed = second.upload_status(repository, upload.location)
    assert resumed.offset == 250_000
    second.push_blob(repository, digest, blob, len(data), chunk_size=200_000, resume=resumed)
    assert second.stat_blob(repository, digest) == len(data)
    assert read_all(second, repository, digest) == data

    config = b"{}"
    second.push_blob(repository, sha256_digest(config), None, 2, data=config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                      "digest": sha256_digest(config), "size": 2},
                           "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw",
                                       "digest": digest, "size": len(data)}]}).encode()
    assert second.put_manifest(repository, "v1", manifest, MANIFEST) == sha256_digest(manifest)
    assert skopeo_raw(registry, f"{repository}:v1") == manifest


def test_wrong_digest_at_the_end_of_an_upload_is_an_integrity_error(registries, tmp_path):
    client = client_for(registries.basic, login())
    data = b"these are not the bytes you hashed"
    with pytest.raises(IntegrityError):
        client.push_blob("upload-bad/model", sha256_digest(b"other"), None, len(data), data=data)


def test_cross_repository_mount_sends_no_bytes(registries):
    data = os.urandom(50_000)
    digest = sha256_digest(data)
    client = client_for(registries.token, login())
    client.push_blob("mount-src/model", digest, None, len(data), data=data)
    assert client.stat_blob("mount-dst/model", digest) is None
    assert client.start_upload("mount-dst/model", mount=digest, mount_from="mount-src/model") is None  # mounted
    assert client.stat_blob("mount-dst/model", digest) == len(data)
    assert hashlib.sha256(read_all(client, "mount-dst/model", digest)).hexdigest() == digest.split(":")[1]
    # a mount the registry cannot do (blob unknown there) opens an ordinary upload instead
    missing = sha256_digest(b"never pushed")
    upload = client.start_upload("mount-dst/model", mount=missing, mount_from="mount-src/model")
    assert upload is not None and upload.offset == 0


def test_resume_from_a_stale_location_starts_a_new_upload(registries, tmp_path):
    """A push killed during a PATCH kept the Location from before it, while the registry kept some of
    the chunk: distribution cancels such an upload, and the push starts a new one."""
    from agent.oci.upload import UploadLost

    data = os.urandom(300_000)
    digest = sha256_digest(data)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(data)
    client = client_for(registries.basic, login())
    stale = client.upload_chunk(client.start_upload("stale/model"), data[:100_000])
    client.upload_chunk(stale, data[100_000:200_000])  # acknowledged, but its Location was never saved
    with pytest.raises(UploadLost):
        client_for(registries.basic, login()).upload_status("stale/model", stale.location)
    seen = []
    assert client.push_blob("stale/model", digest, blob, len(data), chunk_size=128_000, resume=stale,
                            on_upload=seen.append)
    assert [u.offset for u in seen] == [0, 128_000, 256_000, 300_000]
    assert read_all(client, "stale/model", digest) == data
    assert not client.push_blob("stale/model", digest, blob, len(data))  # already there: nothing sent


def test_plain_http_only_when_asked(registries, layout):
    from agent.oci.client import RegistryClient

    with pytest.raises(InvalidInput) as info:  # TLS to a plain-HTTP port: say so at once, no retries
        RegistryClient(registries.plain.host).get_manifest("plain/model", "v1")
    assert "--plain-http" in str(info.value)
    client = RegistryClient(registries.plain.host, plain_http=True)
    data = os.urandom(10_000)
    client.push_blob("plain/model", sha256_digest(data), None, len(data), data=data)
    assert read_all(client, "plain/model", sha256_digest(data)) == data


def test_unreachable_registry_is_transient_after_the_retry_budget(registries):
    from agent.errors import TransientError
    from agent.oci.client import RegistryClient
    from agent.retry import RetryPolicy
    from tests.objstore.servers import free_port

    client = RegistryClient(f"127.0.0.1:{free_port()}", policy=RetryPolicy(max_failures=2, base_delay=0.01))
    with pytest.raises(TransientError) as info:
        client.get_manifest("any/model", "v1")
    assert info.value.exit_code == 7 and "connection" in str(info.value)
