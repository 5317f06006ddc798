"""An OCI registry as DEST: `oci://REGISTRY/REPOSITORY:TAG`, the snapshot as a ModelPack artifact.

A registry is not a bucket. Blobs are stored by digest and invisible until a manifest names them, and
the manifest PUT moves the tag in one step. So `publish.Publisher` drives this destination by digest
(`published`, `missing`, `upload`, `publish`): nothing to unpublish first and nothing stale to remove.
A push killed anywhere leaves the tag on the manifest it named before, whole.

- `published()`: the tag's manifest now, as the Hub identity in its annotations (another model, or an
  artifact without that identity, is refused unless --overwrite).
- `missing(items)`: a HEAD per blob by digest; a blob another repository of this registry holds (one
  this staging cache pushed the snapshot to before) is mounted there, no byte sent, when the registry
  and the credential allow it.
- `upload(item)`: chunked PATCHes of --chunk-size. After each acknowledged chunk the upload's Location
  and offset are saved in the staging cache (`<model>/.model-agent/oci-uploads/`), so a killed push
  resumes the blob from the offset the registry reports (agent/oci/upload.py starts a new upload when
  the registry dropped the old one or a chunk broke half-way).
- `publish(lock)`: the config blob, then the manifest under the tag, last (the registry also refuses
  a manifest naming a blob it lacks).
Credentials come from the docker config files (agent/oci/auth.py); none is ever in a message.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..errors import AuthError, InvalidInput, NotFound
from ..layout import atomic_write
from ..oci import mediatypes as mt
from ..oci.client import RegistryClient
from ..oci.connect import client_for
from ..oci.modelpack import build_artifact, published_lock
from ..oci.reference import parse_reference
from ..oci.upload import Upload as BlobUpload
from ..published import PublishedLock
from ..sources.base import SourceRef
from .base import Destination, Stored, Upload, register

UPLOADS_DIR = "oci-uploads"  # under the staged model's .model-agent/: one record per blob upload under way
PUSHED_NAME = "oci-pushed.json"  # the repositories this staging cache pushed the model to: mount sources
HASH_PIECE = 8 << 20


@register
class RegistryDestination(Destination):
    schemes = ("oci",)

    @staticmethod
    def parse(text: str) -> SourceRef:
        ref = parse_reference(text)
        if ref.digest is not None:
            raise InvalidInput(f"push to {ref.display()}: a registry destination needs a tag "
                               "(oci://REGISTRY/REPOSITORY:TAG); a digest names a manifest that already exists")
        return SourceRef(scheme="oci", path=ref.display())

    def __init__(self, ref: SourceRef, settings):
        super().__init__(ref, settings)
        self.reference = parse_reference(ref.path)
        self.repository, self.tag = self.reference.repository, self.reference.identifier
        self.client: RegistryClient = client_for(self.reference, settings)
        self.source = self.client  # Publisher reports retries through `dest.source.on_retry`
        self._sha256: dict[str, str] = {}  # path -> hex: each file's layer digest
        self._records: Path | None = None  # the staged model's .model-agent/ folder
        self._mounts = True  # off after the credential was refused a mount's source

    # -- what the tag holds ------------------------------------------------------------------------
    def published(self) -> PublishedLock | None:
        """The Hub identity of the manifest the tag names, None when there is no such tag (or repository).
        InvalidInput when the tag names something else: a manifest without that identity."""
        try:
            manifest = self.client.get_manifest(self.repository, self.tag)
        except NotFound:
            return None
        return published_lock(manifest.json(), manifest.digest, self.display())

    # -- blobs -------------------------------------------------------------------------------------
    def missing(self, items: list[Upload]) -> list[Upload]:
        """The files whose blob the repository lacks, one per digest (a file twice in a snapshot is one
        blob), after mounting what another repository of this registry holds."""
        self._records = _records_folder(items)
        unique: dict[str, Upload] = {}
        for item in items:
            digest = self._sha256[item.path] = item.sha256 or _sha256_file(item.local)
            unique.setdefault(digest, replace(item, sha256=digest))
        blobs, source = list(unique.values()), self._mount_source()

        def lacks(item: Upload) -> bool:
            if self.client.stat_blob(self.repository, _digest(item)) == item.size:
                return False
            return source is None or not self._mount(item, source)

        # A HEAD (and a mount) is a round trip with no bytes: as many at once as there are connections.
        with ThreadPoolExecutor(max(1, min(len(blobs), self.settings.workers, 16)), thread_name_prefix="oci-head") as pool:
            return [u for u, absent in zip(blobs, pool.map(lacks, blobs)) if absent]

    def _mount(self, item: Upload, source: str) -> bool:
        """Link the blob from `source` (True), or keep the upload the registry opened instead for
        `upload` to continue (unless a killed push's upload of it is on record: that one resumes). A
        credential refused the source's pull turns mounts off for this push."""
        if not self._mounts:
            return False
        try:
            upload = self.client.start_upload(self.repository, mount=_digest(item), mount_from=source)
        except AuthError:
            self._mounts = False
            return False
        if upload is None:
            return True
        if self._load(item) is None:
            self._save(item, upload)
        return False

    def upload(self, item: Upload, on_bytes: Callable[[int], None]) -> None:
        record = self._record_path(item)
        progress = _Progress(on_bytes)

        def on_upload(state: BlobUpload) -> None:
            progress.at(state.offset)
            self._save(item, state)

        self.client.push_blob(self.repository, _digest(item), item.local, item.size, resume=self._load(item),
                              chunk_size=self.settings.chunk_size, on_upload=on_upload)
        if record is not None:
            record.unlink(missing_ok=True)

    # -- the last step -----------------------------------------------------------------------------
    def publish(self, lock: PublishedLock) -> str:
        """The config blob, then the manifest under the tag: the tag moves only now. Returns its digest."""
        artifact = build_artifact(lock, self._sha256)
        config = artifact.config_blob
        self.client.push_blob(self.repository, config.digest, None, config.size, data=artifact.config)
        digest = self.client.put_manifest(self.repository, self.tag, artifact.manifest, mt.OCI_MANIFEST)
        self._remember_pushed()
        return digest

    # -- the staging cache's records ---------------------------------------------------------------
    def _record_path(self, item: Upload) -> Path | None:
        if self._records is None:
            return None
        key = hashlib.sha256(f"{self.client.registry}/{self.repository}@{_digest(item)}".encode()).hexdigest()
        return self._records / UPLOADS_DIR / f"{key[:40]}.json"

    def _save(self, item: Upload, state: BlobUpload) -> None:
        """The upload's Location (the registry signs the offset into it) and offset: where a re-run resumes."""
        path = self._record_path(item)
        if path is not None:
            atomic_write(path, json.dumps({"registry": self.client.registry, "repository": self.repository,
                                           "digest": _digest(item), "location": state.location,
                                           "offset": state.offset}).encode())

    def _load(self, item: Upload) -> BlobUpload | None:
        path = self._record_path(item)
        try:
            record = json.loads(path.read_bytes()) if path is not None else None
            if record and (record["registry"], record["repository"], record["digest"]) == (
                    self.client.registry, self.repository, _digest(item)):
                return BlobUpload(self.repository, str(record["location"]), int(record["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none, or unreadable: a new upload
        return None

    def _pushed(self) -> dict:
        try:
            pushed = json.loads((self._records / PUSHED_NAME).read_bytes()) if self._records else {}
            return pushed if isinstance(pushed, dict) else {}
        except (OSError, ValueError):
            return {}

    def _mount_source(self) -> str | None:
        """The repository of this registry this staging cache last pushed the model to, if another."""
        earlier = [r for r in self._pushed().get(self.client.registry, []) if r != self.repository]
        return earlier[-1] if earlier else None

    def _remember_pushed(self) -> None:
        if self._records is None:
            return
        pushed = self._pushed()
        repositories = [r for r in pushed.get(self.client.registry, []) if r != self.repository][-7:]
        pushed[self.client.registry] = [*repositories, self.repository]
        try:
            atomic_write(self._records / PUSHED_NAME, json.dumps(pushed).encode())
        except OSError:
            pass  # only a hint for mounts: the push itself is done

    # -- the bucket-shaped interface: unused by a registry (see publish.Publisher) -----------------
    def read_record(self, name: str) -> bytes | None:
        return None  # a registry holds no records: the manifest is the lockfile

    def write_record(self, name: str, data: bytes) -> None:
        return None

    def delete_record(self, name: str) -> None:
        return None  # the tag flips atomically: nothing to unpublish first

    def stored(self) -> dict[str, Stored]:
        return {}  # blobs are found by digest (`missing`), not listed by path

    def remove(self, paths: list[str]) -> None:
        return None  # blobs no manifest names are invisible; the registry's GC reclaims them

    def close(self) -> None:
        self.client.close()


class _Progress:
    """Acknowledged offsets -> on_bytes: what this process sent (a resumed upload's earlier bytes are
    not counted; a new upload after the registry dropped one takes the dropped bytes back)."""

    def __init__(self, on_bytes: Callable[[int], None]):
        self.on_bytes = on_bytes
        self.base: int | None = None  # the offset the registry held when this process took over
        self.counted = 0
        self._lock = threading.Lock()

    def at(self, offset: int) -> None:
        with self._lock:
            if self.base is None or offset < self.base:
                self.base = offset if self.base is None else 0
            now = offset - self.base
            delta, self.counted = now - self.counted, now
        if delta:
            self.on_bytes(delta)


def _digest(item: Upload) -> str:
    return "sha256:" + str(item.sha256)


def _records_folder(items: list[Upload]) -> Path | None:
    """The staged model's `.model-agent/`: the items are its verified blobs (`<model>/blobs/<etag>`)."""
    for item in items:
        if item.local.parent.name == "blobs":
            return item.local.parent.parent / ".model-agent"
    return None


def _sha256_file(path: Path) -> str:
    """The sha256 of a staged file the lock names by its git sha1 only (a small Hub file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(HASH_PIECE):
            h.update(piece)
    return h.hexdigest()
