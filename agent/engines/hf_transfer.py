"""hf_transfer, called directly on the resolved file URL (huggingface_hub 1.0+ no longer uses it).

hf_transfer fetches one whole file with many parallel ranges from Rust. It neither resumes nor
truncates an existing file and keeps no record of which ranges landed, so its partial files
cannot be resumed: a file interrupted under this engine starts again from zero (files already
complete are kept). Retries inside hf_transfer are enabled; ours wrap it.
"""

from __future__ import annotations

import os
import threading

from .. import httpio
from ..errors import Retryable
from ..sources.base import RangeReader, RemoteFile


# hf_transfer buffers max_files x chunk_size per call: one large file at a time keeps peak RSS flat
# (about 8 x 8 MiB) whatever the model size; it parallelizes within the file on its own.
CHUNK_SIZE = 8 * 2**20
_ONE_AT_A_TIME = threading.Semaphore(1)


class HfTransferReader(RangeReader):
    name = "hf_transfer"
    ranged = False

    def __init__(self, source, commit: str, http):
        self.http = http  # resolves redirects and serves small files
        self.commit = commit
        self.settings = source.settings

    def read_range(self, file, start, end):
        return self.http.read_range(file, start, end)

    def resolved_url(self, file: RemoteFile) -> str:
        resp, url = self.http.open(file, {"Range": "bytes=0-0"})
        httpio.drain(resp)
        if resp.status not in (200, 206):
            raise httpio.classify_status(resp.status, resp.headers, self.http.what(file))
        return url

    def fetch_whole(self, file: RemoteFile, dest: str, on_bytes) -> None:
        import hf_transfer

        url = self.resolved_url(file)
        headers = self.http.headers_for(url)  # carries the token only if the URL is on the Hub
        with open(dest, "wb"):
            pass  # hf_transfer writes into an existing file without truncating it
        try:
            with _ONE_AT_A_TIME:
                self._download(hf_transfer, url, dest, headers, on_bytes)
        except Exception as exc:  # noqa: BLE001 - hf_transfer raises plain exceptions
            os.truncate(dest, 0)
            raise Retryable("hf_transfer", f"{self.http.what(file)}: hf_transfer failed ({type(exc).__name__})") from None

    def _download(self, hf_transfer, url: str, dest: str, headers: dict, on_bytes) -> None:
        hf_transfer.download(
            url=url,
            filename=dest,
            max_files=max(self.settings.workers, 8),
            chunk_size=CHUNK_SIZE,
            parallel_failures=4,
            max_retries=4,
            headers=headers,
            callback=on_bytes,
        )
