"""`model-agent --version`: this tool's version and those of the libraries that move the bytes.

A bug report needs them: a transfer bug is as often in hf_xet or an SDK as in the agent. Read from
the installed distributions' metadata, so nothing is imported (a broken SDK cannot break --version).
"""

from __future__ import annotations

from importlib import metadata

from . import __version__

DISTRIBUTION = "model-cache-agent"
# The engines first, then the cloud SDKs (each an optional extra: s3, gcs, azure).
LIBRARIES = ("huggingface_hub", "hf_xet", "hf_transfer", "botocore", "google-cloud-storage", "azure-storage-blob")


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    width = max(map(len, LIBRARIES))
    lines = [f"model-agent {__version__} ({DISTRIBUTION})"]
    lines += [f"  {name:<{width}}  {_installed(name)}" for name in LIBRARIES]
    return "\n".join(lines)
