"""Byte engines for Hub files: xet (hf_xet), hf_transfer, and plain ranged HTTP.

`auto` picks per file: Xet-backed files go through hf_xet when it is installed, everything else
through our ranged HTTP reader, which measured fastest here (see README, Benchmarks).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import InvalidInput
from ..sources.base import RangeReader, RemoteFile

if TYPE_CHECKING:
    from ..sources.huggingface import HubSource


def xet_available() -> bool:
    try:
        import hf_xet  # noqa: F401
    except ImportError:
        return False
    return True


class AutoReader(RangeReader):
    """Chooses per file and remembers what it chose, for the log and the lockfile."""

    name = "auto"

    def __init__(self, http: RangeReader, xet: RangeReader | None):
        self.http, self.xet = http, xet
        self.used: set[str] = set()

    def for_file(self, file: RemoteFile) -> RangeReader:
        chosen = self.xet if (self.xet is not None and file.xet_hash) else self.http
        self.used.add(chosen.name)
        return chosen

    def read_range(self, file, start, end):  # pragma: no cover - callers go through for_file
        return self.for_file(file).read_range(file, start, end)

    def close(self) -> None:
        self.http.close()
        if self.xet is not None:
            self.xet.close()


def hub_reader(source: "HubSource", engine: str, commit: str) -> RangeReader:
    from .hub_http import HubHttpReader

    http = HubHttpReader(source, commit)
    if engine == "http":
        return http
    if engine == "hf_transfer":
        # Checked here: in the child process that runs it, a missing package would only be retried.
        if importlib.util.find_spec("hf_transfer") is None:
            raise InvalidInput("--engine hf_transfer needs the hf_transfer package (pip install hf_transfer)")
        from .hf_transfer import HfTransferReader

        return HfTransferReader(source, commit, http)
    if engine == "xet":
        if not xet_available():
            raise InvalidInput("--engine xet needs the hf_xet package (pip install hf_xet)")
        from .xet import XetReader

        return AutoReader(http, XetReader(source, commit))
    if engine == "auto":
        xet = None
        # HF_HUB_DISABLE_XET: what huggingface_hub honours, so a cluster that turned Xet off gets http
        if xet_available() and not source.settings.xet_disabled:
            from .xet import XetReader

            xet = XetReader(source, commit)
        return AutoReader(http, xet)
    raise InvalidInput(f"unknown engine {engine!r}")
