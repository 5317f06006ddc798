#!/usr/bin/env bash
# Installs the non-Python tools the test suite starts (servers, emulators, linters), idempotently.
# Called by `./dev test`; each block checks for its tool first so a warm machine skips it fast.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {  # apt_install CMD PACKAGE...: install PACKAGE(s) unless CMD is already on PATH
  local cmd="$1"; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if [ ! -f /tmp/.model-agent-apt-updated ]; then
    $sudo apt-get update -qq && touch /tmp/.model-agent-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- metrics (issue 4): promtool, a real Prometheus and a Pushgateway ---------------------------
# (blocks for other tools are added below, one per concern)
# Debian's packages would start the daemons as services; the tests start their own on 127.0.0.1.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-pushgateway >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install promtool prometheus
  apt_install prometheus-pushgateway prometheus-pushgateway
fi

# --- container image (issue 5): buildah + debootstrap, only for the opt-in image test ------------
# tests/test_image.py builds ./Dockerfile when MODEL_AGENT_BUILD_IMAGE=1 (root, no Docker engine:
# buildah --isolation chroot on a debootstrapped base). kubectl (kustomize), kubernetes-validate and
# hadolint, which every run needs, come from PyPI through the `test` extra instead.
if [ "${MODEL_AGENT_BUILD_IMAGE:-}" = "1" ]; then
  apt_install buildah buildah
  apt_install debootstrap debootstrap
fi

# --- object stores (issue 3): Azurite, the Azure Blob emulator, from npm ---------------------------
# Into a project-local prefix (.tools/, git-ignored), never globally. azurite 3.35 is the last line
# that runs on Node 20. SeaweedFS, moto and fake-gcs-server come from PyPI with the `test` extra.
if [ ! -x .tools/node_modules/.bin/azurite-blob ]; then
  apt_install npm nodejs npm
  npm install --silent --no-audit --no-fund --prefix .tools azurite@3.35 >/dev/null
fi

# --- durability (issue 11): strace, to see the fsync of links and copies before the marker ---------
apt_install strace strace

# --- egress proxies (issue 12): Debian's squid, the proxy the object-store tests go through -------
# tests/objstore/squid.py starts its own squid on 127.0.0.1 with its own config; the package's
# service must not start (same policy-rc.d guard as for prometheus above).
if ! command -v squid >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install squid squid
fi

# --- registries (issue 16): Debian's docker-registry (the CNCF distribution registry 2.8), skopeo as
# the independent client, and htpasswd (apache2-utils) for the registry's bcrypt users. tests/oci/
# starts its own registries on 127.0.0.1; the package's service must not start (policy-rc.d as above).
if ! command -v docker-registry >/dev/null 2>&1 || ! command -v skopeo >/dev/null 2>&1 \
   || ! command -v htpasswd >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install docker-registry docker-registry
  apt_install skopeo skopeo
  apt_install htpasswd apache2-utils
fi
