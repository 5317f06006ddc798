"""A model stored in an OCI registry: `oci://REGISTRY/REPOSITORY:TAG` or `…@sha256:DIGEST`.

resolve: the tag (or digest) names a manifest; its digest is the immutable id, recorded in every
lockfile entry (`version.manifest`). The snapshot folder is the Hub commit when the manifest carries
the Hub identity a `push` writes (agent/oci/mediatypes.py HF_*), stored under the original repo id
with `refs/<revision>`, as for a published bucket; otherwise it is the first 40 hex digits of the
manifest digest, under --repo-id. list_files: one file per layer (agent/oci/formats.py says which
formats), a raw layer's etag its sha256 (the Hub's LFS oid, so blob names match a Hub pull; a small
file's git blob sha1 when the pusher recorded it). reader: ranged blob GETs through the shared
transfer, which checks each file's sha256 (= the layer digest) before it is promoted; a one-file tar
layer is read whole and unpacked (TarLayerReader: not resumable), its layer digest checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import AgentError, InvalidInput, NotFound
from ..oci import formats
from ..oci.client import RegistryClient
from ..oci.reference import is_digest, parse_reference
from ..published import HEX40
from .base import (
    RangeGate,
    RangeReader,
    RangesIgnored,
    RemoteFile,
    Source,
    SourceRef,
    register,
)


@register
class OciSource(Source):
    schemes = ("oci",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        ref = parse_reference(text)
        return SourceRef(scheme="oci", bucket=ref.registry, prefix=ref.repository, path=text)

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.reference = parse_reference(ref.path)
        self.on_retry: Callable[[str, float, Exception], None] = lambda reason, delay, exc: None
        self._client: RegistryClient | None = None
        self._artifact: formats.ModelArtifact | None = None
        self._failure: AgentError | None = None  # a manifest read that failed before the pull ran

    # -- the registry -----------------------------------------------------------------------------
    def client(self) -> RegistryClient:
        if self._client is None:
            from ..oci.connect import client_for

            self._client = client_for(self.reference, self.settings)
            self._client.on_retry = lambda reason, delay, exc: self.on_retry(reason, delay, exc)
        return self._client

    def artifact(self) -> formats.ModelArtifact:
        """The model the reference names, read once (an index is followed to its model manifest)."""
        if self._failure is not None:
            raise self._failure
        if self._artifact is None:
            what, repository = self.ref.display(), self.reference.repository
            manifest = self.client().get_manifest(repository, self.reference.identifier)
            if manifest.media_type in formats.INDEXES:
                child = formats.child_of_index(manifest.json(), what)
                manifest = self.client().get_manifest(repository, child)
            self._artifact = formats.read_artifact(manifest, what)
        return self._artifact

    def _known(self) -> formats.ModelArtifact | None:
        """The artifact, or None offline; a failure is kept for resolve() to report (see default_revision)."""
        if self.settings.offline:
            return None
        try:
            return self.artifact()
        except AgentError as exc:
            self._failure = exc
            return None

    # -- the Source interface -----------------------------------------------------------------------
    def default_revision(self) -> str:
        """The Hub revision the manifest names; else the tag; else (a pull by digest) the snapshot id,
        which needs no registry to find in the cache. Offline nothing is read: the tag or the id."""
        found = self._known()
        if found is not None and found.hub is not None:
            return found.hub.revision
        if self.reference.tag and not self.reference.digest:
            return self.reference.tag
        if found is not None:
            return found.snapshot_id
        return self.reference.digest.split(":", 1)[1][:40] if self.reference.digest else "main"

    def layout_repo(self) -> tuple[str, str]:
        from .huggingface import check_repo_id

        named = self.settings.repo_id or self.ref.repo_id  # --repo-id, a models file's repo_id
        if named:  # wins over the manifest's name; nothing read (`wait` needs no registry)
            return "model", check_repo_id(named)
        found = None if self.settings.offline else self.artifact()
        if found is not None and found.hub is not None:
            return found.hub.repo_type, found.hub.repo_id
        raise InvalidInput(f"{self.ref.display()}: this artifact's manifest names no Hugging Face repo "
                           f"(annotation {formats.mt.HF_REPO_ID}): give --repo-id ORG/NAME to store it in the "
                           "Hugging Face cache layout under that name, or pull it with --local-dir DIR")

    def resolve(self, revision: str) -> str:
        from .huggingface import check_revision

        check_revision(revision)
        found = self.artifact()
        self._check_revision(found, revision)
        return found.snapshot_id

    def _check_revision(self, found: formats.ModelArtifact, revision: str) -> None:
        """A Hub identity answers to its revision, its commit and the tag asked for; any other name
        only labels refs/ (as for a bucket). A 40-hex id must be this artifact's."""
        what = self.ref.display()
        if HEX40.match(revision) and revision != found.snapshot_id:
            raise NotFound(f"{what}: the manifest {found.digest} is snapshot {found.snapshot_id[:12]}, not {revision[:12]}")
        hub = found.hub
        if hub is not None and revision not in (hub.revision, hub.commit, self.reference.tag):
            raise NotFound(f"{what}: the artifact holds {hub.repo_id}@{hub.revision} (commit {hub.commit[:12]}), "
                           f"no revision {revision!r}: pull --revision {hub.revision} or --revision {hub.commit}")

    def list_files(self, commit: str) -> list[RemoteFile]:
        found = self.artifact()
        if commit != found.snapshot_id:
            raise NotFound(f"{self.ref.display()}: the manifest {found.digest} is snapshot {found.snapshot_id[:12]}, "
                           f"not {commit[:12]}: the tag moved; pull without --revision to take what it names now")
        return [self.remote_file(layer, found) for layer in found.layers]

    @staticmethod
    def remote_file(layer: formats.Layer, found: formats.ModelArtifact) -> RemoteFile:
        """A Hub pull names a small (non-LFS) file's blob by its git blob sha1: so do we when the pusher
        recorded it (then both hashes are checked); every other file by its sha256, the layer digest.
        A file in a tar layer has no hash of its own to be named by: it is named by its layer's digest,
        and checked by it (the reader hashes the layer's bytes as it unpacks them)."""
        version = {"digest": layer.digest, "manifest": found.digest}
        if layer.archive:
            return RemoteFile(path=layer.path, size=layer.size, etag=f"{layer.sha256}-untar",
                              version={**version, "archive": layer.archive})
        checksums = {"sha256": layer.sha256}
        etag = layer.sha256
        if layer.git_sha1 and found.hub is not None:
            etag = checksums["git_sha1"] = layer.git_sha1
        return RemoteFile(path=layer.path, size=layer.size, etag=etag, checksums=checksums, version=version)

    def reader(self, engine: str, commit: str) -> RangeReader:
        if engine in ("xet", "hf_transfer"):
            raise InvalidInput(f"--engine {engine} is for Hugging Face sources; a registry uses auto or http")
        return OciReader(self.client(), self.reference.repository)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class OciReader(RangeReader):
    """Byte ranges of blobs: the client follows a redirect to storage without the Authorization header,
    checks a 206's Content-Range, and raises RangesIgnored for a 200 (the transfer then streams it)."""

    name = "oci"

    def __init__(self, client: RegistryClient, repository: str):
        self.client = client
        self.repository = repository
        self.untar = TarLayerReader(client, repository)
        self.gate = RangeGate()
        self.used: set[str] = set()  # the readers' names, for the summary's engine

    def for_file(self, file: RemoteFile) -> RangeReader:
        chosen = self.untar if file.version.get("archive") else self
        self.used.add(chosen.name)
        return chosen

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[memoryview]:
        digest = file.version["digest"]
        if not is_digest(digest):  # never from a listing; a guard against a hand-made RemoteFile
            raise InvalidInput(f"{file.path}: no blob digest to read")
        if start == 0 and end == file.size:
            return self.client.read_blob(self.repository, digest, start, end, file.size)
        return self._gated(file, digest, start, end)

    def _gated(self, file: RemoteFile, digest: str, start: int, end: int) -> Iterator[memoryview]:
        """A ranged read that goes alone until the file's first answer shows Range honoured (RangeGate):
        a registry or proxy that ignores Range then sends the blob once, not once per worker."""
        probe, honoured = self.gate.enter(file.path), None
        try:
            pieces = self.client.read_blob(self.repository, digest, start, end, file.size)
            try:
                first = next(pieces, None)
                honoured = True
            except RangesIgnored:
                honoured = False
                raise
        finally:
            if probe:
                self.gate.leave(file.path, honoured)
        if first is not None:
            yield first
            yield from pieces


class TarLayerReader(RangeReader):
    """A one-file tar layer, read whole (not resumable: a tar stream has no offsets to start from) and
    unpacked as it arrives. The layer digest is checked over every byte received, padding and gzip
    trailer included, before the file may be promoted: a mismatch is exit 5."""

    name = "oci-untar"
    ranged = False

    def __init__(self, client: RegistryClient, repository: str):
        self.client = client
        self.repository = repository

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[memoryview]:
        raise NotImplementedError("a tar layer is read whole")

    def fetch_whole(self, file: RemoteFile, dest: str, on_bytes: Callable[[int], None]) -> None:
        from ..oci.untar import unpack_one_file

        digest = file.version["digest"]
        what = f"{self.client.what(self.repository, digest)} ({file.path})"
        unpack_one_file(self.client.read_blob(self.repository, digest), digest, file.version["archive"],
                        file.size, dest, on_bytes, what)
