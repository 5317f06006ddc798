# syntax=docker/dockerfile:1
# model-agent container image: one entrypoint for the download Job, the node-cache DaemonSet and the
# consumers' `wait` init container (see k8s/ and the README's "Kubernetes" section).
#
#   docker build -t model-agent:0.2.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/model-agent:0.2.0 --push .   # arm64 nodes too
#   docker run --rm --read-only --tmpfs /tmp -v "$PWD/cache:/cache" model-agent:0.2.0 pull Qwen/Qwen3-0.6B
#
# BASE_IMAGE is an argument so an offline build can substitute a locally made base with the same
# shape (a Debian with python3 and its venv module); tests/test_image.py does that.
ARG BASE_IMAGE=python:3.12-slim-bookworm

# ---- builder: a venv with model-agent and its dependencies, nothing else ------------------------
FROM ${BASE_IMAGE} AS builder
# The venv lives at the same path in both stages: its scripts' shebangs point at /opt/venv/bin/python.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY agent ./agent
# The image carries every source's SDK (s3, gcs, azure): one image serves every Job. A slimmer one
# for a single store: docker build --build-arg EXTRAS='[s3]' .
ARG EXTRAS="[all]"
# Byte-compile in the builder: the runtime's root filesystem is read-only, so Python could never
# write __pycache__ there, and every start would re-compile in memory.
RUN /opt/venv/bin/pip install --no-cache-dir ".${EXTRAS}" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
 && /opt/venv/bin/model-agent --version

# ---- runtime: the base plus the venv; no compiler, no pip cache, no source tree -----------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="model-agent" \
      org.opencontainers.image.description="Put model weights on a Kubernetes cache volume once, correctly" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
# Writable places a read-only root filesystem still needs: HOME and TMPDIR point at /tmp, which the
# manifests mount as an emptyDir. HF_HOME sits on the cache volume (mounted at /cache), so the
# cache dir is /cache/huggingface/hub, the same path consumers are given. No token is baked in:
# it arrives at run time through --token-file from a mounted Secret.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid (distroless' "nonroot"), so Kubernetes' runAsNonRoot can verify it
# without an /etc/passwd entry, and volume ownership (fsGroup, a chown'ed hostPath) can name it.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["model-agent"]
CMD ["--help"]
