"""Media types and annotation keys of a model stored in an OCI registry: the CNCF ModelPack spec
(github.com/modelpack/model-spec, specs-go/v1/mediatype.go and annotations.go), the OCI image spec,
and the few manifest annotations of our own that carry the Hub identity. The push side writes these
and the pull side reads them, so both import them from here."""

# OCI image spec: the manifest, index and ordinary container image types.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# ModelPack: the manifest's artifactType and the config blob's media type.
MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"

# ModelPack layer kinds. Each has a raw form (one unarchived, uncompressed file per layer: its digest
# is the file's sha256) and tar forms (.tar, .tar+gzip, .tar+zstd) holding one or more files.
WEIGHT = "weight"
WEIGHT_CONFIG = "weight.config"
DOC = "doc"
CODE = "code"
DATASET = "dataset"
LAYER_KINDS = (WEIGHT, WEIGHT_CONFIG, DOC, CODE, DATASET)
_MODEL_LAYER_PREFIX = "application/vnd.cncf.model."


def raw_layer(kind: str) -> str:
    """`raw_layer("weight")` -> "application/vnd.cncf.model.weight.v1.raw"."""
    return f"{_MODEL_LAYER_PREFIX}{kind}.v1.raw"


def tar_layer(kind: str, compression: str = "") -> str:
    """`tar_layer("doc", "gzip")` -> "application/vnd.cncf.model.doc.v1.tar+gzip"."""
    return f"{_MODEL_LAYER_PREFIX}{kind}.v1.tar" + (f"+{compression}" if compression else "")


WEIGHT_RAW = raw_layer(WEIGHT)
WEIGHT_CONFIG_RAW = raw_layer(WEIGHT_CONFIG)
DOC_RAW = raw_layer(DOC)
CODE_RAW = raw_layer(CODE)
DATASET_RAW = raw_layer(DATASET)
RAW_LAYERS = frozenset(raw_layer(kind) for kind in LAYER_KINDS)
TAR_LAYERS = frozenset(tar_layer(kind, c) for kind in LAYER_KINDS for c in ("", "gzip", "zstd"))

# Layer annotations. The title is the OCI generic one (oras, skopeo); org.cncf.model.filepath is
# ModelPack's; org.cnai.model.filepath is the same key before ModelPack renamed its prefix (July 2025,
# commit 9eb8979), still written by older modctl and KitOps releases.
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
FILEPATH_LEGACY = "org.cnai.model.filepath"
FILEPATH_KEYS = (FILEPATH, FILEPATH_LEGACY, TITLE)  # read in this order: the first present wins
FILE_METADATA = "org.cncf.model.file.metadata+json"  # JSON: name, mode, uid, gid, size, mtime, typeflag
FILE_METADATA_LEGACY = "org.cnai.model.file.metadata+json"
MEDIATYPE_UNTESTED = "org.cncf.model.file.mediatype.untested"

# Manifest annotations of our own: the Hugging Face identity the artifact was published from, so a pull
# rebuilds the HF layout under the original repo id and commit. Namespaced by this project's PyPI name,
# not under org.cncf.* or org.opencontainers.* (reserved for those specs). All four are written together.
HF_REPO_ID = "model-cache-agent.hf.repo_id"  # e.g. "Qwen/Qwen3-0.6B"
HF_REPO_TYPE = "model-cache-agent.hf.repo_type"  # "model", "dataset" or "space"
HF_REVISION = "model-cache-agent.hf.revision"  # the ref asked for, e.g. "main"
HF_COMMIT = "model-cache-agent.hf.commit"  # the 40-hex Hub commit
# Layer annotation of our own: the file's git blob sha1 on the Hub, for small (non-LFS) files whose
# Hub etag is that sha1 rather than the sha256 the layer digest carries.
HF_GIT_SHA1 = "model-cache-agent.hf.git_sha1"
HF_KEYS = (HF_REPO_ID, HF_REPO_TYPE, HF_REVISION, HF_COMMIT)

# OCI generic manifest annotations we set alongside (informative).
CREATED = "org.opencontainers.image.created"
SOURCE = "org.opencontainers.image.source"
REVISION = "org.opencontainers.image.revision"

# KitOps ModelKit (kitops.org): its own config and tar layer types, files named by the title.
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KITOPS_LAYER_PREFIX = "application/vnd.kitops.modelkit."

# KServe modelcar: an ordinary container image with the model under /models.
MODELCAR_ROOT = "models"
