"""What a manifest holds, read as a model: its files (one per layer), their paths and digests, and
the Hugging Face identity it was published from, if it says.

Read:
- ModelPack raw layers (`application/vnd.cncf.model.*.v1.raw`), and any other non-archive layer of a
  model artifact that names its path (oras pushes files as `application/octet-stream` with a title).
  A raw layer's digest is the file's sha256: fetched in byte ranges, resumed, verified like any file.
- ModelPack tar layers (`*.v1.tar`, `*.v1.tar+gzip`) of ONE regular file whose size the layer's
  `org.cncf.model.file.metadata+json` annotation gives (what modctl writes for a file): read whole
  and unpacked as they arrive, the layer's digest checked over the bytes received. Not resumable: a
  killed pull fetches such a layer again from its first byte.
Refused with exit 2 saying what they are: tar layers of a directory or without that annotation (the
files' sizes are unknown until the whole layer is read, so they could not be planned or verified per
file), zstd layers (no zstd decoder in the Python standard library before 3.14), KitOps ModelKits
(their own tar+gzip layer types), and container images: a KServe modelcar keeps its model under
/models in ordinary image layers, which are not unpacked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InvalidInput
from ..layout import safe_relpath
from ..published import HEX40
from . import mediatypes as mt
from .client import Manifest
from .reference import is_digest

MANIFESTS = (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST)
GO_TYPE_REGULAR = (ord("0"), 0)  # Go's tar.TypeReg and the old TypeRegA: the typeflag of a regular file
INDEXES = (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST)
_ARCHIVE_SUFFIXES = (".tar", ".tar+gzip", ".tar+zstd", ".tar.gzip", ".diff.tar.gzip", "+gzip", "+zstd")
REPO_TYPES = ("model", "dataset", "space")


@dataclass(frozen=True)
class Layer:
    path: str  # relative, checked by safe_relpath
    digest: str  # sha256:<hex>: the file's sha256 for a raw layer
    size: int
    media_type: str
    git_sha1: str | None = None  # the Hub's git blob id of a small file, when the pusher recorded it
    archive: str = ""  # "" for a raw layer; "tar" or "gzip" for a tar layer holding this one file

    @property
    def sha256(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class HubIdentity:
    repo_id: str
    repo_type: str
    revision: str
    commit: str


@dataclass(frozen=True)
class ModelArtifact:
    digest: str  # the manifest's digest: the immutable id the lockfile records
    layers: tuple[Layer, ...]
    hub: HubIdentity | None

    @property
    def snapshot_id(self) -> str:
        """The snapshot folder: the Hub commit if the manifest names one, else the first 40 hex digits
        of the manifest's sha256 (the Source interface wants a commit-like id; 160 bits stay unique)."""
        return self.hub.commit if self.hub else self.digest.split(":", 1)[1][:40]


def child_of_index(index: dict, what: str) -> str:
    """The manifest to read in an index: the one model artifact in it, else its only entry. An index of
    several platform images is a multi-arch container image, not a model."""
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict) and is_digest(str(m.get("digest", "")))]
    models = [m for m in entries if m.get("artifactType") == mt.MODEL_ARTIFACT_TYPE]
    chosen = models if models else entries
    if len(chosen) == 1:
        return str(chosen[0]["digest"])
    platforms = sorted({f"{(m.get('platform') or {}).get('os', '?')}/{(m.get('platform') or {}).get('architecture', '?')}"
                        for m in entries})
    raise InvalidInput(f"{what}: an image index of {len(entries)} manifests ({', '.join(platforms[:6])}), none of "
                       "them a model artifact: this looks like a multi-platform container image, not a model")


def read_artifact(manifest: Manifest, what: str) -> ModelArtifact:
    """The model in `manifest` (an image manifest, not an index), or InvalidInput saying what it is instead."""
    body = manifest.json()
    if manifest.media_type not in MANIFESTS and body.get("mediaType") not in MANIFESTS:
        raise InvalidInput(f"{what}: a manifest of type {manifest.media_type or body.get('mediaType')!r}, "
                           "not an image manifest")
    layers_json = [d for d in body.get("layers") or [] if isinstance(d, dict)]
    config = body.get("config") if isinstance(body.get("config"), dict) else {}
    is_model = mt.MODEL_ARTIFACT_TYPE in (body.get("artifactType"), config.get("mediaType")) or \
        config.get("mediaType") == mt.MODEL_CONFIG
    refuse_archives(layers_json, config, is_model, what)
    layers = [_layer(d, what) for d in layers_json if is_model or d.get("mediaType") in mt.RAW_LAYERS]
    if not layers:
        raise InvalidInput(f"{what}: {_describe(body, config, layers_json)}, not a model: it has no ModelPack layers "
                           "(application/vnd.cncf.model.*.v1.raw) to pull")
    seen: dict[str, str] = {}
    for layer in layers:
        if layer.path in seen:
            raise InvalidInput(f"{what}: two layers claim the path {layer.path} ({seen[layer.path]} and {layer.digest})")
        seen[layer.path] = layer.digest
    return ModelArtifact(digest=manifest.digest, layers=tuple(layers), hub=hub_identity(body, what))


def refuse_archives(layers: list[dict], config: dict, is_model: bool, what: str) -> None:
    """Exit 2 for the formats this agent does not unpack, saying which (see the module's docstring)."""
    if config.get("mediaType") == mt.KITOPS_CONFIG or any(
            str(d.get("mediaType", "")).startswith(mt.KITOPS_LAYER_PREFIX) for d in layers):
        raise InvalidInput(f"{what}: a KitOps ModelKit (tar layers of its own types): not read by model-agent; "
                           "push it as a ModelPack artifact (kit pack --use-model-pack, modctl, model-agent push)")
    zstd = sorted({str(d.get("mediaType")) for d in layers if str(d.get("mediaType", "")).endswith("+zstd")})
    if zstd and is_model:
        raise InvalidInput(f"{what}: zstd-compressed layers ({', '.join(zstd)}): not read by model-agent (no zstd "
                           "decoder in its Python); repack with raw or gzip layers (modctl build --raw)")
    archives = [d for d in layers if str(d.get("mediaType", "")).endswith(_ARCHIVE_SUFFIXES)]
    if archives and not is_model and not any(d.get("mediaType") in mt.RAW_LAYERS for d in layers):
        raise InvalidInput(f"{what}: {_describe({}, config, layers)}, not a model artifact: an ordinary container "
                           "image (a KServe modelcar keeps its model under /models in such layers, which model-agent "
                           "does not unpack); pull a ModelPack artifact instead")


def _describe(body: dict, config: dict, layers: list[dict]) -> str:
    kind = body.get("artifactType") or config.get("mediaType") or "no config type"
    types = sorted({str(d.get("mediaType")) for d in layers})
    return f"an image manifest ({kind}; {len(layers)} layer(s){': ' + ', '.join(types[:3]) if types else ''})"


def _layer(desc: dict, what: str) -> Layer:
    annotations = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
    digest, media_type = str(desc.get("digest", "")), str(desc.get("mediaType", ""))
    path = next((annotations[k] for k in mt.FILEPATH_KEYS if annotations.get(k)), None)
    if path is None:
        raise InvalidInput(f"{what}: layer {digest} ({media_type}) names no file path (annotation {mt.FILEPATH} "
                           f"or {mt.TITLE})")
    path = safe_relpath(str(path), context=what)
    if not is_digest(digest):
        raise InvalidInput(f"{what}: layer {path} has digest {digest[:80]!r}: expected sha256: and 64 hex digits")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{what}: layer {path} has no valid size ({size!r})")
    git_sha1 = annotations.get(mt.HF_GIT_SHA1)
    if git_sha1 is not None and not HEX40.match(str(git_sha1)):
        raise InvalidInput(f"{what}: layer {path}: {mt.HF_GIT_SHA1} is {str(git_sha1)[:60]!r}, not a 40-hex git blob id")
    if media_type.endswith(_ARCHIVE_SUFFIXES):
        return Layer(path=path, digest=digest, size=_tar_file_size(annotations, path, media_type, what),
                     media_type=media_type, archive="gzip" if media_type.endswith("gzip") else "tar")
    return Layer(path=path, digest=digest, size=size, media_type=media_type, git_sha1=git_sha1)


def _tar_file_size(annotations: dict, path: str, media_type: str, what: str) -> int:
    """The size of the one regular file a tar layer holds, from its file metadata annotation."""
    text = annotations.get(mt.FILE_METADATA) or annotations.get(mt.FILE_METADATA_LEGACY)
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("typeflag") not in GO_TYPE_REGULAR or \
            not isinstance(meta.get("size"), int) or meta["size"] < 0:
        kind = "a directory" if isinstance(meta, dict) and meta.get("typeflag") == ord("5") else \
            f"no regular file named in {mt.FILE_METADATA}"
        raise InvalidInput(f"{what}: layer {path} ({media_type}) is a tar of {kind}: its files' sizes are unknown "
                           "until the whole layer is read; model-agent reads raw layers and one-file tar layers "
                           "(modctl build --raw makes raw ones)")
    return meta["size"]


def hub_identity(body: dict, what: str) -> HubIdentity | None:
    """The Hub repo, revision and commit in the manifest's annotations, or None when it names no repo."""
    from ..sources.huggingface import check_repo_id, check_revision

    annotations = body.get("annotations") if isinstance(body.get("annotations"), dict) else {}
    repo_id = annotations.get(mt.HF_REPO_ID)
    if not repo_id:
        return None
    commit = str(annotations.get(mt.HF_COMMIT, ""))
    if not HEX40.match(commit):
        raise InvalidInput(f"{what}: the manifest names Hub repo {repo_id!r} but its {mt.HF_COMMIT} is "
                           f"{commit[:60]!r}, not a 40-hex commit")
    repo_type = str(annotations.get(mt.HF_REPO_TYPE) or "model")
    if repo_type not in REPO_TYPES:
        raise InvalidInput(f"{what}: {mt.HF_REPO_TYPE} is {repo_type[:40]!r}: expected one of {', '.join(REPO_TYPES)}")
    revision = check_revision(str(annotations.get(mt.HF_REVISION) or "main"))
    return HubIdentity(repo_id=check_repo_id(str(repo_id)), repo_type=repo_type, revision=revision, commit=commit)
