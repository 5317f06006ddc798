"""A small ModelPack artifact as an OCI image layout on disk, and skopeo copying it into a registry:
content written by another client than ours, for our client to read."""

from __future__ import annotations

import json
from pathlib import Path

from .servers import Registry, sha256_digest, skopeo

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"


def _blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def model_layout(layout: Path, files: dict[str, bytes], tag: str = "v1") -> bytes:
    """An OCI layout holding one ModelPack manifest (raw layers, one per file) under `tag`; returns the
    manifest's bytes."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layers = []
    for path, data in files.items():
        layers.append({"mediaType": WEIGHT_RAW, "digest": _blob(layout, data), "size": len(data),
                       "annotations": {"org.opencontainers.image.title": path, "org.cncf.model.filepath": path}})
    config = json.dumps({"descriptor": {"name": "test-model"}, "modelfs": {
        "type": "layers", "diffIds": [layer["digest"] for layer in layers]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": MODEL_ARTIFACT,
        "config": {"mediaType": MODEL_CONFIG, "digest": _blob(layout, config), "size": len(config)},
        "layers": layers, "annotations": {"org.huggingface.repo_id": "test/model"},
    }, indent=1).encode()
    digest = _blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MANIFEST, "digest": digest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return manifest


def skopeo_push(layout: Path, registry: Registry, repository: str, tag: str = "v1") -> None:
    """skopeo writes the artifact: the independent client. Tried twice: once in a full suite run (1 in
    ~1,000) skopeo's push to the token registry exited 1 with a cause we could not reproduce; a second
    failure fails the test with skopeo's own words."""
    args = ("copy", "--quiet", "--preserve-digests", "--dest-cert-dir", str(registry.pki.cert_dir),
            *registry.skopeo_creds(), f"oci:{layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}")
    if skopeo(*args, check=False).returncode != 0:
        done = skopeo(*args, check=False)
        assert done.returncode == 0, f"skopeo copy to {registry.mode}: {done.stderr.decode(errors='replace')[-1500:]}"


def skopeo_raw(registry: Registry, reference: str) -> bytes:
    """`skopeo inspect --raw`: the manifest bytes as an independent client reads them."""
    creds = ["--creds", "model-agent:s3cret-registry-password"] if registry.mode != "anonymous" else []
    return skopeo("inspect", "--raw", "--cert-dir", str(registry.pki.cert_dir), *creds,
                  f"docker://{registry.host}/{reference}").stdout
