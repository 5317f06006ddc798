"""A published snapshot as a CNCF ModelPack artifact: the manifest and config `push ... oci://` writes.

One **raw** layer per file (the file's bytes as they are: its digest is the file's sha256, the value
the Hub publishes as the LFS oid), its media type by kind (weights, weight configs and tokenizers,
docs, code), annotated with its relative path under the OCI title, ModelPack's `org.cncf.model.filepath`
and the same key before ModelPack renamed its prefix (`org.cnai.model.filepath`, read by older modctl
and KitOps). The config (`application/vnd.cncf.model.config.v1+json`) names the model and lists the
layers' diff ids (a raw layer's diff id is its digest). The manifest's annotations carry the Hub
identity (repo id and type, revision, commit), so a pull rebuilds the HF layout under them.

Nothing time-dependent goes in: the same snapshot always makes the same bytes, so the same manifest
digest (a re-push is a no-op, and a digest pinned anywhere stays valid).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

from ..published import NotOurs
from ..published import HEX40, HEX64, PublishedFile, PublishedLock
from . import mediatypes as mt

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".onnx_data", ".h5",
                    ".msgpack", ".tflite", ".pb", ".ot", ".npz", ".mlmodel", ".engine", ".plan", ".nemo", ".pdparams")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".model", ".tiktoken", ".vocab", ".spm", ".txt", ".jinja", ".toml")
_DOC_SUFFIXES = (".md", ".rst", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".html", ".cff")
_DOC_NAMES = ("readme", "license", "licence", "notice", "copying", "citation", "use_policy", "acceptable_use")
_CODE_SUFFIXES = (".py", ".ipynb", ".sh", ".js", ".ts", ".c", ".cc", ".cpp", ".cu", ".h", ".hpp", ".go", ".rs", ".java")
_FORMATS = {".safetensors": "safetensors", ".gguf": "gguf", ".onnx": "onnx", ".bin": "pytorch", ".pt": "pytorch",
            ".pth": "pytorch", ".h5": "tensorflow", ".tflite": "tflite", ".msgpack": "flax"}


@dataclass(frozen=True)
class Blob:
    """A descriptor's three fields: what the registry must hold before the manifest may name it."""

    media_type: str
    digest: str  # sha256:<hex>
    size: int

    def descriptor(self, annotations: dict[str, str] | None = None) -> dict:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if annotations:
            out["annotations"] = annotations
        return out


@dataclass(frozen=True)
class Artifact:
    manifest: bytes
    config: bytes
    config_blob: Blob
    layers: tuple[Blob, ...]


def layer_kind(path: str) -> str:
    """ModelPack's kind of a file, from its name: the layer media type says what a runtime may skip
    (a serving engine needs weights and configs, not docs). Unknown names count as configs: small
    side files of a model repo (a chat template, a processor preset) are read with its weights."""
    name = posixpath.basename(path).lower()
    suffix = posixpath.splitext(name)[1]
    if name.endswith(".index.json"):  # model.safetensors.index.json: the shard map, read with the config
        return mt.WEIGHT_CONFIG
    if suffix in _WEIGHT_SUFFIXES:
        return mt.WEIGHT
    if suffix in _CODE_SUFFIXES:
        return mt.CODE
    if suffix in _DOC_SUFFIXES or posixpath.splitext(name)[0] in _DOC_NAMES:
        return mt.DOC
    return mt.WEIGHT_CONFIG


def model_format(paths: list[str]) -> str:
    """The weights' format for the config (`safetensors`, `gguf`, ...), or "" when none is known."""
    found = {_FORMATS[s] for p in paths if (s := posixpath.splitext(p.lower())[1]) in _FORMATS
             and layer_kind(p) == mt.WEIGHT}
    return found.pop() if len(found) == 1 else ""


def build_artifact(lock: PublishedLock, sha256: dict[str, str]) -> Artifact:
    """The manifest and config of `lock`'s files, in path order. `sha256[path]` is each file's sha256 hex
    (the layer digest): the lock's own, or one computed from the staged bytes of a small git file."""
    files = sorted(lock.files, key=lambda f: f.path)
    layers, descriptors = [], []
    for f in files:
        blob = Blob(mt.raw_layer(layer_kind(f.path)), "sha256:" + sha256[f.path], f.size)
        annotations = {mt.TITLE: f.path, mt.FILEPATH: f.path, mt.FILEPATH_LEGACY: f.path}
        if f.git_sha1:  # the Hub's etag of a small file: the HF cache names its blob by it
            annotations[mt.HF_GIT_SHA1] = f.git_sha1
        layers.append(blob)
        descriptors.append(blob.descriptor(annotations))
    settings = {"format": model_format([f.path for f in files])}
    config = _json({
        "descriptor": {"name": lock.repo_id, "revision": lock.commit},
        "modelfs": {"type": "layers", "diffIds": [blob.digest for blob in layers]},
        "config": {k: v for k, v in settings.items() if v},
    })
    config_blob = Blob(mt.MODEL_CONFIG, sha256_of(config), len(config))
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODEL_ARTIFACT_TYPE,
        "config": config_blob.descriptor(),
        "layers": descriptors,
        "annotations": identity_annotations(lock),
    })
    return Artifact(manifest=manifest, config=config, config_blob=config_blob, layers=tuple(layers))


def identity_annotations(lock: PublishedLock) -> dict[str, str]:
    return {mt.HF_REPO_ID: lock.repo_id, mt.HF_REPO_TYPE: lock.repo_type, mt.HF_REVISION: lock.revision,
            mt.HF_COMMIT: lock.commit, mt.REVISION: lock.commit}


def published_lock(manifest: dict, digest: str, what: str) -> PublishedLock:
    """What a manifest `push` wrote says it holds: its Hub identity and files. InvalidInput for any other
    manifest (an artifact another tool pushed, a container image): not a model this agent published."""
    notes = manifest.get("annotations") if isinstance(manifest.get("annotations"), dict) else {}
    repo_id, commit = str(notes.get(mt.HF_REPO_ID) or ""), str(notes.get(mt.HF_COMMIT) or "")
    if not repo_id or not HEX40.match(commit):
        kind = manifest.get("artifactType") or manifest.get("mediaType") or "a manifest"
        raise NotOurs(f"{what} names {digest[:19]}..., {kind} without the Hub identity model-agent writes "
                           f"({mt.HF_REPO_ID}, {mt.HF_COMMIT}): not a model published by model-agent")
    files = []
    for layer in manifest.get("layers") or []:
        layer_notes = layer.get("annotations") or {}
        path = next((layer_notes[k] for k in mt.FILEPATH_KEYS if layer_notes.get(k)), None)
        sha256 = str(layer.get("digest", "")).removeprefix("sha256:")
        if path and HEX64.match(sha256):
            git_sha1 = layer_notes.get(mt.HF_GIT_SHA1)
            files.append(PublishedFile(str(path), int(layer.get("size") or 0), git_sha1 or sha256, sha256, git_sha1))
    return PublishedLock(repo_id=repo_id, repo_type=str(notes.get(mt.HF_REPO_TYPE) or "model"),
                         revision=str(notes.get(mt.HF_REVISION) or commit), commit=commit, files=tuple(files),
                         source=what)


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(value: dict) -> bytes:
    # Compact, in insertion order, as Go's encoding/json writes it: stable bytes for a stable digest.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
